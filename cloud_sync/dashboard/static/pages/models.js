// Models: every registered version (size, sha256, signature), the devices running it, and compare A vs B.

import { api, get, query } from "../api.js";
import { h, replace, table, num, pct, when, field } from "../dom.js";
import { fleetStates } from "./fleet.js";

const FIGURES = [
  ["devices", "Devices", 0], ["requests", "Requests", 0], ["p50_ms", "p50 ms", 2], ["p95_ms", "p95 ms", 2],
  ["p99_ms", "p99 ms", 2], ["requests_per_s", "Requests/s", 1], ["error_rate", "Error rate", "pct"],
  ["cpu_seconds_per_inference", "CPU-s / inference", 5], ["joules_per_inference", "J / inference", 4],
];

export async function models(main, ctx) {
  const list = h("div");
  const problem = h("div", { class: "alert", role: "alert" });
  const a = h("select", { id: "compare-a", name: "a" });
  const b = h("select", { id: "compare-b", name: "b" });
  const selector = h("input", { id: "compare-selector", name: "selector", placeholder: "site=lab (empty: every device)", spellcheck: "false" });
  const since = h("input", { id: "compare-since", name: "since_s", type: "number", value: "3600", min: "1", step: "1", inputmode: "numeric" });
  const compareError = h("div", { class: "alert", role: "alert", id: "compare-error" });
  const compared = h("div", { "aria-live": "polite" });
  const form = h("form", { class: "grid", id: "compare", novalidate: true, onsubmit: async (event) => {
    event.preventDefault();
    replace(compareError);
    try {
      const c = await get(`/v1/models/compare${query({ a: a.value, b: b.value, selector: selector.value.trim(), since_s: since.value.trim() })}`);
      replace(compared, h("p", { class: "muted" }, `${c.a.model}:${c.a.version} vs ${c.b.model}:${c.b.version} on ${c.selector_text || "every device"} (${c.devices_selected} devices), last ${num(c.since_s)} s.`),
        table(["Figure", `A ${c.a.model}:${c.a.version}`, `B ${c.b.model}:${c.b.version}`, "B / A"],
          FIGURES.map(([key, label, digits]) => [label,
            digits === "pct" ? pct(c.a[key]) : num(c.a[key], digits), digits === "pct" ? pct(c.b[key]) : num(c.b[key], digits),
            c.relative[key] === undefined ? "" : c.relative[key] === null ? "—" : `${num(c.relative[key], 2)}×`])));
    } catch (exc) {
      replace(compareError, exc.message);
      replace(compared);
    }
  } },
  field("Version A", a), field("Version B", b), field("Devices", selector, "key=value,…"), field("Window (s)", since),
  h("div", {}, h("button", { type: "submit" }, "Compare")));
  replace(main, h("h1", {}, "Models"), problem, list, h("h2", {}, "Compare two versions on the five figures"), h("div", { class: "panel" }, form, compareError, compared));

  async function refresh() {
    const [{ models: found }, { devices }] = await Promise.all([get("/v1/models"), get("/v1/devices")]);
    const states = await fleetStates(devices);
    const running = new Map();
    for (const [id, state] of states) {
      for (const m of state.models || []) {
        if (m.reported_version && /ACTIVE/.test(m.state)) {
          const key = `${m.name}:${m.reported_version}`;
          running.set(key, [...(running.get(key) || []), id]);
        }
      }
    }
    const refs = found.map((m) => `${m.name}:${m.version}`);
    for (const select of [a, b]) {
      const was = select.value;
      replace(select, refs.map((r) => h("option", { value: r }, r)));
      if (refs.includes(was)) select.value = was;
    }
    if (!a.dataset.chosen && refs.length > 1) { a.value = refs[refs.length - 2]; b.value = refs[refs.length - 1]; a.dataset.chosen = "1"; }
    replace(list, table(["Version", "Size", "sha256", "Signature", "Expires", "Runs on", ctx.session.can("admin") ? "Actions" : null].filter(Boolean),
      found.map((m) => {
        const ref = `${m.name}:${m.version}`;
        const on = running.get(ref) || [];
        const cells = [h("strong", {}, ref), h("td", { class: "num" }, `${num(m.size)} B`), h("code", { title: m.sha256 }, `${m.sha256.slice(0, 12)}…`),
          `serial ${m.serial}, key ${m.key_id}, ${when(m.signed_at_ms)}`, when(m.expires_at_ms),
          on.length ? h("span", { title: on.join(", ") }, `${on.length} device${on.length === 1 ? "" : "s"}: ${on.slice(0, 4).join(", ")}${on.length > 4 ? ", …" : ""}`) : h("span", { class: "muted" }, "none")];
        if (ctx.session.can("admin")) {
          cells.push(h("button", { type: "button", class: "quiet", "aria-label": `Delete ${ref}`, onclick: async () => {
            if (!confirm(`Delete ${ref} and the blobs no other version uses?`)) return;
            try { await api("DELETE", `/v1/models/${encodeURIComponent(m.name)}/${m.version}`); replace(problem); await refresh(); } catch (exc) { replace(problem, exc.message); }
          } }, "Delete"));
        }
        return cells;
      }), { empty: "No model registered yet: `fleetctl models push DIR`." }));
  }
  await refresh();
  ctx.every(10000, refresh);
}
