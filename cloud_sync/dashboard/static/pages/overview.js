// The fleet at a glance: presence, which versions run where, the five figures per version, and the charts.

import { get, query } from "../api.js";
import { h, replace, table, num, pct, badge } from "../dom.js";
import { modelCharts } from "../charts.js";
import { fleetStates, versionCounts, shortState, stateTone, MAX_STATES } from "./fleet.js";

export async function overview(main, ctx) {
  const cards = h("div", { class: "cards", "aria-live": "polite" });
  const versions = h("div");
  const figures = h("div");
  const chartBox = h("div");
  const pick = h("select", { id: "chart-model" });
  // A point a step, about 90 points a line: 10 s steps over the default 15 minutes.
  const span = h("select", { id: "chart-span" }, [[300, "5 min"], [900, "15 min"], [3600, "1 hour"], [21600, "6 hours"], [86400, "24 hours"]]
    .map(([v, t]) => h("option", { value: v, selected: v === 900 }, t)));
  replace(main,
    h("h1", {}, "Fleet overview"),
    cards,
    h("h2", {}, "Model versions on the devices"), versions,
    h("h2", {}, "The five figures per version, fleet-wide, last hour"), figures,
    h("h2", {}, "Over time"),
    h("div", { class: "row" }, h("label", { for: "chart-model" }, "Model"), pick, h("label", { for: "chart-span" }, "Last"), span),
    chartBox);

  const { models } = await get("/v1/models");
  const names = [...new Set(models.map((m) => m.name))];
  replace(pick, names.map((n) => h("option", { value: n }, n)));
  let charts = null;
  const showCharts = () => {
    if (charts) charts.destroy();
    const sinceS = Number(span.value);
    charts = pick.value ? modelCharts(chartBox, pick.value, { sinceS, stepS: Math.max(10, Math.round(sinceS / 90)) }) : null;
    if (!charts) replace(chartBox, h("p", { class: "muted" }, "No model registered yet: push one with `fleetctl models push`."));
    return charts ? charts.update() : Promise.resolve();
  };
  for (const input of [pick, span]) input.addEventListener("change", () => showCharts().catch(ctx.failed));
  ctx.cleanup.push(() => charts && charts.destroy());

  async function refresh() {
    const { devices } = await get("/v1/devices");
    const live = devices.filter((d) => !d.revoked);
    const online = live.filter((d) => d.online === true).length;
    const offline = live.filter((d) => d.online === false).length;
    replace(cards,
      card(live.length, "devices"),
      card(online, "online", "ok"),
      card(offline, "offline", offline ? "bad" : ""),
      card(live.length - online - offline, "never seen"),
      card(devices.length - live.length, "revoked"));
    const states = await fleetStates(devices);
    const counts = versionCounts(states);
    replace(versions,
      live.length > MAX_STATES ? h("p", { class: "muted" }, `The first ${MAX_STATES} devices of ${live.length}.`) : null,
      table(["Model", "Version", "State", "Devices"],
        counts.map((c) => [c.model, `v${c.version}`, badge(shortState(c.state), stateTone(c.state)), h("td", { class: "num" }, num(c.devices))]),
        { empty: "No device has a model assigned yet." }));
    const running = [...new Map(counts.map((c) => [`${c.model}:${c.version}`, c])).keys()].slice(0, 12);
    const shown = await Promise.all(running.map((ref) => get(`/v1/models/compare${query({ a: ref, b: ref, since_s: 3600 })}`).then((c) => c.a)));
    replace(figures, table(
      ["Version", "Devices", "p50 ms", "p99 ms", "Requests/s", "Error rate", "CPU-s / inference", "J / inference"],
      shown.map((f) => [`${f.model}:${f.version}`, n(f.devices), n(f.p50_ms, 2), n(f.p99_ms, 2), n(f.requests_per_s, 1),
        h("td", { class: "num" }, pct(f.error_rate)), n(f.cpu_seconds_per_inference, 5), n(f.joules_per_inference, 4)]),
      { empty: "No telemetry in the last hour." }));
  }

  await Promise.all([refresh(), showCharts()]);
  ctx.every(5000, () => Promise.all([refresh(), charts ? charts.update() : Promise.resolve()]));
}

function card(value, label, tone) {
  return h("div", { class: "card" }, h("div", { class: `n ${tone || ""}` }, num(value)), h("div", { class: "l" }, label));
}

function n(value, digits) {
  return h("td", { class: "num" }, num(value, digits));
}
