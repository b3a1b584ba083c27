// Devices: the fleet filtered by label, presence and last seen; one device's state, ledger, outbox and figures.

import { api, get } from "../api.js";
import { h, replace, table, num, pct, ago, when, labelsText, parseSelector, badge, field } from "../dom.js";
import { fleetStates, shortState, stateTone, MAX_STATES } from "./fleet.js";
import { enrollmentSections } from "./enrollment.js";

const SEEN = [["", "any time"], ["60", "in the last minute"], ["3600", "in the last hour"], ["86400", "in the last day"], ["-3600", "not in the last hour"]];

export async function devices(main, ctx) {
  const labels = h("input", { id: "filter-labels", name: "labels", placeholder: "site=lab,cam=1", spellcheck: "false" });
  const presence = h("select", { id: "filter-presence", name: "presence" },
    ["any", "online", "offline", "never seen", "revoked"].map((p) => h("option", { value: p }, p)));
  const seen = h("select", { id: "filter-seen", name: "seen" }, SEEN.map(([v, t]) => h("option", { value: v }, t)));
  const problem = h("div", { class: "alert", role: "alert", id: "filter-error" });
  const list = h("div");
  const form = h("form", { class: "grid panel", onsubmit: (e) => e.preventDefault(), "aria-label": "Filter devices" },
    field("Labels", labels, "key=value, comma-separated"), field("Presence", presence), field("Last seen", seen));
  const joining = ctx.session.can("admin") ? enrollmentSections(ctx, () => refresh()) : null;
  replace(main, h("h1", {}, "Devices"), form, problem, list, joining ? joining.element : null);
  let shown = { devices: [], states: new Map() };

  function render() {
    const chosen = parseSelector(labels.value);
    replace(problem, chosen.error || "");
    if (chosen.error) return;
    const now = Date.now();
    const rows = shown.devices.filter((d) => {
      const matches = Object.entries(chosen.selector).every(([k, v]) => d.labels[k] === v);
      const p = presence.value;
      const state = d.revoked ? "revoked" : d.online === true ? "online" : d.online === false ? "offline" : "never seen";
      const window = Number(seen.value);
      const recent = !seen.value || (window > 0 ? d.last_seen_ms && now - d.last_seen_ms <= window * 1000 : !d.last_seen_ms || now - d.last_seen_ms > -window * 1000);
      return matches && (p === "any" || p === state) && recent;
    });
    replace(list, h("p", { class: "muted", "aria-live": "polite" }, `${rows.length} of ${shown.devices.length} devices.`),
      table(["Device", "Labels", "Presence", "Last seen", "Models", "Generation", "Converged"],
        rows.map((d) => [
          h("a", { href: `#/device/${encodeURIComponent(d.device_id)}`, class: "nowrap" }, d.device_id),
          h("code", {}, labelsText(d.labels)),
          d.revoked ? badge("revoked", "bad") : d.online === null ? badge("never seen") : badge(d.online ? "online" : "offline", d.online ? "ok" : "bad"),
          h("span", { title: when(d.last_seen_ms) }, ago(d.last_seen_ms)),
          modelsCell(shown.states.get(d.device_id)),
          d.desired_generation === null ? "—" : `${d.reported_generation ?? "—"} / ${d.desired_generation}`,
          d.converged === null ? "—" : d.converged ? badge("yes", "ok") : badge(d.state_error ? "error" : "not yet", d.state_error ? "bad" : "warn"),
        ]), { empty: "No device matches." }),
      shown.devices.length > MAX_STATES ? h("p", { class: "muted" }, `Models shown for the first ${MAX_STATES} devices.`) : null);
  }
  for (const input of [labels, presence, seen]) input.addEventListener("input", render);

  async function refresh() {
    const { devices: found } = await get("/v1/devices");
    shown = { devices: found, states: await fleetStates(found) };
    render();
  }
  await refresh();
  if (joining) await joining.refresh();
  ctx.every(5000, refresh);
}

function modelsCell(state) {
  if (!state) return "—";
  return h("div", {}, (state.models || []).map((m) => h("div", {},
    `${m.name} v${m.reported_version ?? "—"}`, m.desired_version !== m.reported_version ? ` → v${m.desired_version}` : "", " ",
    badge(shortState(m.state), stateTone(m.state)), m.reason ? h("span", { class: "muted" }, ` ${m.reason}`) : null)));
}

// As fleetctl devices quarantine prints it: a record the device declared was never sent, so none of it is kept.
const QUARANTINE_SHOWN = 100;
function quarantineSize(q) {
  if (q.record === null) return "not sent";
  return q.record_bytes < q.record_size ? `${num(q.record_size)} B (first ${num(q.record_bytes)} kept)` : `${num(q.record_size)} B`;
}

export async function device(main, ctx) {
  const id = ctx.args[0] || "";
  const body = h("div");
  const problem = h("div", { class: "alert", role: "alert" });
  replace(main, h("p", {}, h("a", { href: "#/devices" }, "← Devices")), h("h1", {}, "Device ", h("code", {}, id)), problem, body);

  async function refresh() {
    const [d, { quarantine }] = await Promise.all([get(`/v1/devices/${encodeURIComponent(id)}`),
      get(`/v1/devices/${encodeURIComponent(id)}/quarantine?limit=${QUARANTINE_SHOWN}`)]);
    const up = d.uplink;
    const t = d.telemetry;
    const outbox = t ? t.outbox || {} : {};
    const sums = up.stored + up.evicted + up.rejected;
    const revoke = ctx.session.can("admin") && !d.revoked
      ? h("button", { type: "button", class: "danger", id: "revoke", onclick: async () => {
        if (!confirm(`Revoke ${id}? It can no longer connect.`)) return;
        try { await api("POST", `/v1/devices/${encodeURIComponent(id)}/revoke`); await refresh(); } catch (exc) { replace(problem, exc.message); }
      } }, "Revoke device") : null;
    replace(body,
      h("dl", { class: "facts panel" },
        h("dt", {}, "Labels"), h("dd", {}, h("code", {}, labelsText(d.labels) || "none")),
        h("dt", {}, "Presence"), h("dd", {}, d.revoked ? badge("revoked", "bad") : d.online === null || d.online === undefined ? "never seen" : badge(d.online ? "online" : "offline", d.online ? "ok" : "bad"), ` last seen ${ago(d.last_seen_ms)}`),
        h("dt", {}, "Registered"), h("dd", {}, when(d.created_at_ms)),
        h("dt", {}, "Ledger"), h("dd", { id: "ledger" }, `stored ${num(up.stored)} + evicted ${num(up.evicted)} + rejected ${num(up.rejected)} = ${num(sums)}; the device produced ${num(up.device_produced)} `,
          sums === up.device_produced ? badge("reconciled", "ok") : badge(`${num(up.device_produced - sums)} in flight`, "warn")),
        h("dt", {}, "Outbox"), h("dd", { id: "outbox" }, !t ? "no telemetry yet" : !t.outbox ? "not reported by the device"
          : `${num(outbox.depth ?? 0)} records (${num(outbox.bytes ?? 0)} bytes) waiting, upload lag ${num(outbox.upload_lag_s ?? 0, 1)} s`),
        h("dt", {}, "Duplicates ignored"), h("dd", {}, num(up.duplicates_total)),
        h("dt", {}, "Effective policy"), h("dd", {}, h("a", { href: `#/policies/${encodeURIComponent(id)}` }, "show"))),
      revoke ? h("p", { class: "actions" }, revoke) : null,
      h("h2", {}, "Models: desired vs reported"),
      d.state ? table(["Model", "Desired", "Reported", "State", "Reason", "Progress"],
        d.state.models.map((m) => [m.name, m.desired_version ?? "—", m.reported_version ?? "—", badge(shortState(m.state), stateTone(m.state)), m.reason || "", pct(m.progress, 0)]),
        { empty: "No model desired." }) : h("p", { class: "muted" }, "No desired state yet."),
      d.state && d.state.problems && d.state.problems.length ? h("div", { class: "alert" }, d.state.problems.join("; ")) : null,
      h("h2", {}, "Recent figures"),
      table(["Version", "Requests", "p99 ms", "Requests/s", "Error rate"],
        (d.recent_models || []).map((w) => [`${w.model}:${w.version}`, ...[num(w.requests), num(w.p99_ms, 2), num(w.requests_per_s, 1), pct(w.error_rate)].map((v) => h("td", { class: "num" }, v))]),
        { empty: "No telemetry windows recently." }),
      h("h2", {}, "Quarantined records"),
      h("div", { id: "quarantine" }, table(["Seq", "Source", "Received", "Size", "Reason"],
        quarantine.map((q) => [`#${q.seq}`, q.source, when(q.received_at_ms), quarantineSize(q), q.reason]),
        { empty: "None: every record this device sent was stored." }),
      quarantine.length === QUARANTINE_SHOWN ? h("p", { class: "muted" }, `The oldest ${QUARANTINE_SHOWN}; fleetctl devices quarantine ${id} --after ${quarantine[quarantine.length - 1].seq} lists the rest.`) : null));
  }
  await refresh();
  ctx.every(5000, refresh);
}
