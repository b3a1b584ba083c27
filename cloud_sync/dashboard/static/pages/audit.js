// The audit log: every change, by whom (a token's name, a gate, the controller), with before/after and why.

import { get, query } from "../api.js";
import { h, replace, when, field } from "../dom.js";

export async function audit(main, ctx) {
  const actor = h("input", { id: "audit-actor", name: "actor", placeholder: "ops-alice or gate:error_rate", spellcheck: "false" });
  const action = h("input", { id: "audit-action", name: "action", placeholder: "rollout.abort", spellcheck: "false" });
  const target = h("input", { id: "audit-target", name: "target", placeholder: "rollout/ro-…", spellcheck: "false" });
  const alert = h("div", { class: "alert", role: "alert", id: "audit-error" });
  const rows = h("tbody");
  const more = h("button", { type: "button", class: "quiet", id: "audit-more", hidden: true }, "Older records");
  let filters = {};
  let oldest = null;

  async function load(append) {
    const page = await get(`/v1/audit${query({ ...filters, limit: 50, before_id: append ? oldest : "" })}`);
    if (!append) rows.replaceChildren();
    for (const r of page.records) rows.append(row(r));
    oldest = page.records.length ? page.records[page.records.length - 1].id : oldest;
    more.hidden = page.records.length < 50;
    if (!append && !page.records.length) rows.append(h("tr", {}, h("td", { colspan: "6", class: "muted" }, "No record matches.")));
  }
  more.addEventListener("click", () => load(true).catch((exc) => replace(alert, exc.message)));
  const form = h("form", { class: "grid", id: "audit-filter", novalidate: true, onsubmit: async (event) => {
    event.preventDefault();
    replace(alert);
    filters = { actor: actor.value.trim(), action: action.value.trim(), target: target.value.trim() };
    try { await load(false); } catch (exc) { replace(alert, exc.message); }
  } }, field("Who", actor), field("Action", action), field("Target", target), h("div", {}, h("button", { type: "submit" }, "Filter")));

  replace(main, h("h1", {}, "Audit log"), h("div", { class: "panel" }, form), alert,
    h("div", { class: "scroll" }, h("table", {}, h("thead", {}, h("tr", {}, ["When", "Who", "Action", "Target", "Reason", "Before → after"].map((t) => h("th", { scope: "col" }, t)))), rows)),
    h("p", {}, more));
  try {
    await load(false);
  } catch (exc) {
    replace(alert, exc.status === 404 ? "This cloud-sync keeps no audit log yet (it has no /v1/audit): upgrade it." : exc.message);
  }
  ctx.every(10000, async () => { if (oldest === null || rows.children.length <= 50) await load(false); });
}

function row(r) {
  const change = r.before || r.after
    ? h("details", {}, h("summary", {}, "show"), h("pre", {}, `before: ${JSON.stringify(r.before, null, 1)}\nafter: ${JSON.stringify(r.after, null, 1)}`))
    : "";
  return h("tr", {}, h("td", {}, h("time", { datetime: new Date(r.at_ms).toISOString() }, when(r.at_ms))),
    h("td", {}, r.actor, h("span", { class: "muted" }, ` (${r.actor_kind})`)), h("td", {}, h("code", {}, r.action)),
    h("td", {}, h("code", {}, r.target)), h("td", {}, r.reason || ""), h("td", {}, change));
}
