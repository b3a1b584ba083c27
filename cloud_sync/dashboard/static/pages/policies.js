// Policies: the documents, the effective policy of any device, and (admin) setting or deleting one.

import { api, get } from "../api.js";
import { h, replace, table, num, when, field, parseSelector, labelsText } from "../dom.js";

export async function policies(main, ctx) {
  const list = h("div");
  const problem = h("div", { class: "alert", role: "alert", id: "policy-list-error" });
  const device = h("input", { id: "effective-device", name: "device_id", placeholder: "cam-1", spellcheck: "false", value: ctx.args[0] || "" });
  const effectiveError = h("div", { class: "alert", role: "alert", id: "effective-error" });
  const effective = h("div", { "aria-live": "polite" });
  async function show() {
    replace(effectiveError);
    replace(effective);
    const id = device.value.trim();
    if (!id) {
      replace(effectiveError, "device_id: enter a device id (the Devices page lists them)");
      return;
    }
    try {
      const e = await get(`/v1/devices/${encodeURIComponent(id)}/effective-policy`);
      replace(effective, h("p", {}, `${e.device_id}: policy ${e.policy_hash || "(none)"} from `,
        e.sources.length ? e.sources.map((s) => typeof s === "string" ? s : s.name || JSON.stringify(s)).join(" ← ") : "no policy (the defaults)"),
      h("pre", { id: "effective-document" }, JSON.stringify(e.policy, null, 2)));
    } catch (exc) {
      replace(effectiveError, exc.message);
    }
  }
  const lookup = h("form", { class: "grid", id: "effective", novalidate: true, onsubmit: (event) => { event.preventDefault(); show(); } }, field("Device", device), h("div", {}, h("button", { type: "submit" }, "Show effective policy")));

  replace(main, h("h1", {}, "Policies"), problem, list,
    ctx.session.can("admin") ? setForm(ctx, () => refresh()) : null,
    h("section", { class: "panel", "aria-labelledby": "effective-title" }, h("h2", { id: "effective-title" }, "Effective policy of a device"), lookup, effectiveError, effective));

  async function refresh() {
    const { policies: found } = await get("/v1/policies");
    replace(list, table(["Name", "Selector", "Priority", "Document", "Version", "Updated", ctx.session.can("admin") ? "Actions" : null].filter(Boolean),
      found.map((p) => {
        const cells = [h("strong", {}, p.name), h("code", {}, labelsText(p.selector) || "every device"), h("td", { class: "num" }, num(p.priority)),
          h("pre", {}, JSON.stringify(p.document, null, 1)), num(p.version), when(p.updated_at_ms)];
        if (ctx.session.can("admin")) {
          cells.push(h("button", { type: "button", class: "quiet", "aria-label": `Delete policy ${p.name}`, onclick: async () => {
            if (!confirm(`Delete policy ${p.name}? Its devices get their new effective policy at once.`)) return;
            try { await api("DELETE", `/v1/policies/${encodeURIComponent(p.name)}`); replace(problem); await refresh(); } catch (exc) { replace(problem, exc.message); }
          } }, "Delete"));
        }
        return cells;
      }), { empty: "No policy: every device runs its own config." }));
  }
  await refresh();
  if (device.value) await show();
  ctx.every(10000, refresh);
}

function setForm(ctx, done) {
  const name = h("input", { id: "policy-name", name: "name", placeholder: "lab-tuning", spellcheck: "false", required: true });
  const selector = h("input", { id: "policy-selector", name: "selector", placeholder: "site=lab (empty: every device)", spellcheck: "false" });
  const priority = h("input", { id: "policy-priority", name: "priority", type: "number", step: "1", value: "0", inputmode: "numeric" });
  const documentText = h("textarea", { id: "policy-document", name: "document", rows: "6", spellcheck: "false", placeholder: '{"inference": {"max_batch_size": 8}}' });
  const alert = h("div", { class: "alert", role: "alert", id: "policy-error" });
  const note = h("div", { class: "note", role: "status", id: "policy-saved" });
  const form = h("form", { class: "grid", id: "policy-set", novalidate: true, onsubmit: async (event) => {
    event.preventDefault();
    replace(alert);
    replace(note);
    const chosen = parseSelector(selector.value);
    let doc;
    let problem = !name.value.trim() ? "name: a policy name (a-z, 0-9, '.', '_', '-')" : chosen.error || "";
    if (!problem && !Number.isInteger(Number(priority.value))) problem = "priority: a whole number";
    if (!problem) {
      try {
        doc = JSON.parse(documentText.value || "{}");
        if (doc === null || typeof doc !== "object" || Array.isArray(doc)) problem = "document: a JSON object, e.g. {\"inference\": {\"max_batch_size\": 8}}";
      } catch (exc) {
        problem = `document: not JSON (${exc.message})`;
      }
    }
    if (problem) {
      replace(alert, problem);
      return;
    }
    try {
      const saved = await api("PUT", `/v1/policies/${encodeURIComponent(name.value.trim())}`, { selector: chosen.selector, priority: Number(priority.value), document: doc });
      replace(note, `Saved ${saved.name} (version ${saved.version}).`);
      await done();
    } catch (exc) {
      replace(alert, exc.message);
    }
  } },
  field("Name", name), field("Devices", selector, "key=value,…"), field("Priority", priority, "higher wins where policies overlap"),
  h("label", { class: "wide" }, "Document (JSON)", documentText), h("div", {}, h("button", { type: "submit", id: "policy-save" }, "Save policy")));
  return h("section", { class: "panel", "aria-labelledby": "set-title" }, h("h2", { id: "set-title" }, "Create or replace a policy"), form, alert, note);
}
