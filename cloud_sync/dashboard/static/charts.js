// Latency, throughput and error rate per model version over time (uPlot), fed from GET /v1/models/series.

import { get, query } from "./api.js";
import { h, replace } from "./dom.js";

const COLORS = ["#1f5fbf", "#d1495b", "#2a9d8f", "#e9a23b", "#6a4c93", "#3d5a80", "#8d6e63", "#00798c"];
const FIGURES = [
  { key: "latency", title: "Latency (ms): p99 solid, p50 dashed", unit: "ms" },
  { key: "requests_per_s", title: "Throughput (requests/s)", unit: "req/s" },
  { key: "error_rate", title: "Error rate (%)", unit: "%" },
];

function columns(answer, key) {
  const times = [...new Set(answer.versions.flatMap((v) => v.points.map((p) => p.t_ms)))].sort((a, b) => a - b);
  const at = new Map(times.map((t, i) => [t, i]));
  const data = [times.map((t) => t / 1000)];
  const series = [{}];
  answer.versions.forEach((v, n) => {
    const color = COLORS[n % COLORS.length];
    const fields = key === "latency" ? [["p99_ms", "p99", null], ["p50_ms", "p50", [6, 4]]] : [[key, "", null]];
    for (const [name, suffix, dash] of fields) {
      const column = new Array(times.length).fill(null);
      for (const p of v.points) {
        const value = p[name];
        column[at.get(p.t_ms)] = value === null ? null : key === "error_rate" ? value * 100 : value;
      }
      data.push(column);
      series.push({ label: `v${v.version}${suffix ? " " + suffix : ""}`, stroke: color, width: 2, dash, points: { show: times.length < 3 }, spanGaps: false });
    }
  });
  return { data, series };
}

function sizeOf(el) {
  return { width: Math.max(260, el.clientWidth - 16), height: 200 };
}

// Charts of `model` in `into`, redrawn by `update()`: a fresh series set (a new version) makes new charts.
export function modelCharts(into, model, { sinceS = 3600, stepS = 10 } = {}) {
  const boxes = FIGURES.map((f) => h("figure", { class: "chart", "aria-label": `${f.title} of ${model}` }, h("h3", {}, f.title), h("div", { class: "plot" })));
  const status = h("p", { class: "muted", "aria-live": "polite" });
  replace(into, h("div", { class: "charts" }, boxes), status);
  let plots = [];
  let shape = "";
  const observer = new ResizeObserver(() => plots.forEach((p, i) => p.setSize(sizeOf(boxes[i]))));
  observer.observe(into);

  async function update() {
    const answer = await get(`/v1/models/series${query({ model, since_s: sinceS, step_s: stepS })}`);
    const points = answer.versions.reduce((n, v) => n + v.points.length, 0);
    replace(status, points
      ? `${answer.versions.map((v) => `v${v.version}`).join(", ")}: a point per ${answer.step_s} s over the last ${Math.round(sinceS / 60)} min; updated ${new Date().toLocaleTimeString("en-GB")}.`
      : `No telemetry of ${model} in the last ${Math.round(sinceS / 60)} min.`);
    const made = FIGURES.map((f) => columns(answer, f.key));
    const now = JSON.stringify(made.map((m) => m.series.map((s) => s.label)));
    if (now !== shape || plots.length === 0) {
      plots.forEach((p) => p.destroy());
      plots = made.map((m, i) => {
        const plotBox = boxes[i].querySelector(".plot");
        plotBox.replaceChildren();
        return new window.uPlot({
          ...sizeOf(boxes[i]),
          series: m.series,
          // The whole window asked for, whatever part of it has points (one point alone spans years otherwise);
          // each y axis from 0 (the error rate to at least 1 %).
          scales: {
            x: { time: true, range: () => [Date.now() / 1000 - sinceS, Date.now() / 1000] },
            y: { range: (u, min, max) => [0, Math.max((max || 0) * 1.1, 1)] },
          },
          axes: [{}, { size: 60 }],
          legend: { live: true },
        }, m.data, plotBox);
      });
      shape = now;
    } else {
      plots.forEach((p, i) => p.setData(made[i].data, true));
    }
  }

  function destroy() {
    observer.disconnect();
    plots.forEach((p) => p.destroy());
    plots = [];
  }
  return { update, destroy };
}
