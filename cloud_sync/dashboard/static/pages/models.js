// Models: every registered version (size, sha256, signature), the devices running it, and compare A vs B.

import { api, get, query } from "../api.js";
import { h, replace, table, num, pct, when, field, parseDuration } from "../dom.js";
import { fleetStates } from "./fleet.js";
import { assignmentsSection } from "./assignments.js";

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
  const { models: registered } = await get("/v1/models");
  const assignments = assignmentsSection(ctx, [...new Set(registered.map((m) => m.name))]);
  const signing = ctx.session.can("operator") ? signForm(() => refresh()) : null;
  replace(main, h("h1", {}, "Models"), problem, list, signing ? signing.element : null,
    assignments.element,
    h("h2", {}, "Compare two versions on the five figures"), h("div", { class: "panel" }, form, compareError, compared));

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
    for (const select of signing ? [a, b, signing.version] : [a, b]) {
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
  await Promise.all([refresh(), assignments.refresh()]);
  ctx.every(10000, refresh);
}

// Sign a version again with a new expiry (fleetctl models sign): a new, higher serial, and devices that see it
// refuse the older envelope from then on.
function signForm(done) {
  const version = h("select", { id: "sign-version", name: "version" });
  const expires = h("input", { id: "sign-expires", name: "expires", value: "30d", spellcheck: "false" });
  const alert = h("div", { class: "alert", role: "alert", id: "sign-error" });
  const note = h("div", { class: "note", role: "status", id: "sign-saved" });
  const button = h("button", { type: "submit", id: "sign" }, "Sign again");
  const form = h("form", { class: "grid", id: "sign-again", novalidate: true, onsubmit: async (event) => {
    event.preventDefault();
    replace(alert);
    replace(note);
    const seconds = parseDuration(expires.value);
    const at = version.value.lastIndexOf(":");
    const problem = at <= 0 ? "version: register a model first (`fleetctl models push`)"
      : seconds === null ? "expires: a number with s, m, h or d, e.g. 30d (60 s to 5 years)" : "";
    if (problem) {
      replace(alert, problem);
      return;
    }
    button.disabled = true;
    try {
      const m = await api("POST", `/v1/models/${encodeURIComponent(version.value.slice(0, at))}/${encodeURIComponent(version.value.slice(at + 1))}/sign`, { expires_in_s: seconds });
      replace(note, `Signed ${m.name}:${m.version} again: serial ${m.serial}, expires ${when(m.expires_at_ms)}.`);
      await done();
    } catch (exc) {
      replace(alert, exc.message);
    } finally {
      button.disabled = false;
    }
  } }, field("Version", version), field("Expires in", expires, "s, m, h or d: 60 s to 5 years"), h("div", {}, button));
  return { version, element: h("section", { class: "panel", "aria-labelledby": "sign-title" }, h("h2", { id: "sign-title" }, "Sign a version again"), form, alert, note) };
}
