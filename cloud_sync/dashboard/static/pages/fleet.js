// What several pages read: every device's desired-vs-reported state (a call per device, a few at a time).

import { get, pool } from "../api.js";

// Past this many devices the per-device states are not fetched (the page says so): a call each.
export const MAX_STATES = 300;

export async function fleetStates(list) {
  const live = list.filter((d) => !d.revoked).slice(0, MAX_STATES);
  const states = await pool(live, 8, (d) => get(`/v1/devices/${encodeURIComponent(d.device_id)}/state`));
  const byId = new Map();
  live.forEach((d, i) => { if (states[i] && !states[i].error) byId.set(d.device_id, states[i]); });
  return byId;
}

// (model, version, state) -> device count, from the states' per-model lines.
export function versionCounts(states) {
  const counts = new Map();
  for (const state of states.values()) {
    for (const m of state.models || []) {
      const version = m.reported_version || m.desired_version;
      const key = `${m.name}\u0000${version}\u0000${m.state || "UNKNOWN"}`;
      counts.set(key, (counts.get(key) || 0) + 1);
    }
  }
  return [...counts.entries()].map(([key, n]) => {
    const [model, version, state] = key.split("\u0000");
    return { model, version: Number(version), state, devices: n };
  }).sort((a, b) => a.model.localeCompare(b.model) || a.version - b.version || a.state.localeCompare(b.state));
}

export function shortState(state) {
  return String(state || "").replace(/^MODEL_STATE_/, "").replace(/^MODEL_ROLE_/, "").toLowerCase();
}

export function stateTone(state) {
  const s = shortState(state);
  if (s === "active") return "ok";
  if (s === "failed") return "bad";
  return "warn";
}
