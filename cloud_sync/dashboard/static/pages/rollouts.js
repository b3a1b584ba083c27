// Rollouts: the list and a create form; one rollout's stages, gates (live value vs threshold), events, actions.

import { api, get } from "../api.js";
import { h, replace, table, num, when, ago, badge, field, parseSelector } from "../dom.js";

const TONE = { running: "ok", completed: "ok", paused: "warn", aborted: "bad" };
const EXAMPLE_STAGES = "shadow:10%:60s,active:10%:60s,active:100%";
const EXAMPLE_GATES = "max_error_rate=0.01,max_p99_ratio=1.5,min_devices=1";

function stageText(r) {
  const total = (r.stages || []).length || (r.stages_text || "").split(",").length;
  return `${Math.min(r.stage_index + 1, total)}/${total}`;
}

export async function rollouts(main, ctx) {
  const list = h("div");
  const filter = h("select", { id: "rollout-state", name: "state" }, ["", "running", "paused", "completed", "aborted"].map((s) => h("option", { value: s }, s || "any")));
  // The list first: watching is what most visits are for (and on a phone the form would fill the screen).
  replace(main, h("h1", {}, "Rollouts"), h("div", { class: "row" }, h("label", { for: "rollout-state" }, "State"), filter), list,
    ctx.session.can("operator") ? await createForm(ctx) : null);

  async function refresh() {
    const { rollouts: found } = await get(`/v1/rollouts${filter.value ? `?state=${filter.value}` : ""}`);
    replace(list, table(["Rollout", "Model", "Selector", "State", "Stage", "Updated", "Reason"],
      found.map((r) => [h("a", { href: `#/rollout/${r.id}`, class: "nowrap" }, r.id), `${r.model} v${r.from_version} → v${r.to_version}`,
        h("code", {}, r.selector_text || "every device"), badge(r.state, TONE[r.state]), stageText(r), ago(r.updated_at_ms), r.reason || ""]),
      { empty: "No rollout yet." }));
  }
  filter.addEventListener("change", () => refresh().catch(ctx.failed));
  await refresh();
  ctx.every(3000, refresh);
}

async function createForm(ctx) {
  const { models } = await get("/v1/models");
  const names = [...new Set(models.map((m) => m.name))];
  const model = h("select", { id: "new-model", name: "model", required: true }, names.map((n) => h("option", { value: n }, n)));
  const version = h("input", { id: "new-version", name: "to_version", type: "number", min: "1", step: "1", required: true, inputmode: "numeric" });
  const selector = h("input", { id: "new-selector", name: "selector", placeholder: "site=lab (empty: every device)", spellcheck: "false" });
  const stages = h("input", { id: "new-stages", name: "stages", value: EXAMPLE_STAGES, spellcheck: "false", required: true });
  const gates = h("input", { id: "new-gates", name: "gates", placeholder: EXAMPLE_GATES, spellcheck: "false" });
  const shadow = h("input", { id: "new-shadow", name: "shadow_sample_rate", type: "number", min: "0", max: "1", step: "0.01", value: "0.1" });
  const alert = h("div", { class: "alert", role: "alert", id: "create-error" });
  const button = h("button", { type: "submit", id: "create-rollout" }, "Start rollout");
  const form = h("form", { class: "grid", id: "create", novalidate: true, onsubmit: async (event) => {
    event.preventDefault();
    replace(alert);
    const chosen = parseSelector(selector.value);
    const to = Number(version.value);
    const rate = Number(shadow.value);
    const problem = !model.value ? "model: register a model first (`fleetctl models push`)"
      : !version.value.trim() || !Number.isInteger(to) || to < 1 ? "to_version: a version number, 1 or more"
        : chosen.error ? chosen.error
          : !stages.value.trim() ? `stages: e.g. ${EXAMPLE_STAGES}`
            : shadow.value.trim() === "" || !(rate >= 0 && rate <= 1) ? "shadow_sample_rate: a number from 0 to 1" : "";
    if (problem) {
      replace(alert, problem);
      return;
    }
    const body = { model: model.value, to_version: to, selector: chosen.selector, stages: stages.value.trim(), shadow_sample_rate: rate };
    if (gates.value.trim()) body.gates = gates.value.trim();
    button.disabled = true;
    try {
      const made = await api("POST", "/v1/rollouts", body);
      ctx.go(`#/rollout/${made.id}`);
    } catch (exc) {
      replace(alert, exc.message);
    } finally {
      button.disabled = false;
    }
  } },
  field("Model", model), field("To version", version), field("Devices", selector, "key=value,…"),
  field("Stages", stages, "mode:percent:bake, …"), field("Gates", gates, "empty: the defaults"), field("Shadow sample rate", shadow, "0 to 1"),
  h("div", {}, button));
  return h("section", { class: "panel", "aria-labelledby": "create-title" }, h("h2", { id: "create-title" }, "Start a rollout"), form, alert);
}

export async function rollout(main, ctx) {
  const id = ctx.args[0] || "";
  const head = h("div");
  const actions = h("div");
  const stages = h("div");
  const gates = h("div");
  const events = h("div");
  const reason = h("input", { id: "action-reason", name: "reason", maxlength: "1000", placeholder: "why (kept in the events and the audit log)" });
  const alert = h("div", { class: "alert", role: "alert", id: "action-error" });
  replace(main, h("p", {}, h("a", { href: "#/rollouts" }, "← Rollouts")), h("h1", {}, "Rollout ", h("code", {}, id)),
    head, actions, alert, h("h2", {}, "Stages"), stages, h("h2", {}, "Gates: the live value against its threshold"), gates,
    h("h2", {}, "Events"), events);
  let buttons = null;

  function renderActions(r) {
    if (!ctx.session.can("operator")) {
      replace(actions);
      return;
    }
    const live = r.state === "running" || r.state === "paused";
    const wanted = { pause: r.state === "running", resume: r.state === "paused", promote: live, abort: live };
    if (buttons === null) {
      buttons = {};
      for (const [verb, label, style] of [["pause", "Pause", "quiet"], ["resume", "Resume", "quiet"], ["promote", "Promote to next stage", "quiet"], ["abort", "Abort", "danger"]]) {
        buttons[verb] = h("button", { type: "button", class: style, id: `rollout-${verb}`, onclick: () => act(verb) }, label);
      }
      replace(actions, h("div", { class: "panel actions" }, field("Reason", reason, "optional"), Object.values(buttons)));
    }
    for (const [verb, on] of Object.entries(wanted)) buttons[verb].disabled = !on;
    if (!live) replace(actions, h("p", { class: "muted" }, `The rollout has ${r.state}: nothing left to steer.`));
  }

  async function act(verb) {
    replace(alert);
    if (reason.value.length > 1000) {
      replace(alert, `reason: at most 1000 characters (${reason.value.length} given)`);
      return;
    }
    if (verb === "abort" && !confirm(`Abort ${id}? Every device it touched goes back to the version it came from.`)) return;
    try {
      const body = reason.value.trim() ? { reason: reason.value.trim() } : {};
      const r = await api("POST", `/v1/rollouts/${encodeURIComponent(id)}/${verb}`, body);
      reason.value = "";
      render(r, null);
      await refresh();
    } catch (exc) {
      replace(alert, exc.message);
    }
  }

  function render(r, found) {
    replace(head, h("div", { class: "panel row" },
      h("span", {}, h("strong", {}, `${r.model} v${r.from_version} → v${r.to_version}`)),
      h("span", {}, "on ", h("code", {}, r.selector_text || "every device"), ` (${num(r.matched_devices)} devices)`),
      h("span", { id: "rollout-state-badge" }, badge(r.state, TONE[r.state])),
      h("span", { id: "rollout-stage" }, `stage ${stageText(r)}`),
      h("span", { class: "muted" }, `started ${when(r.created_at_ms)}`),
      r.reason ? h("span", {}, r.reason) : null));
    renderActions(r);
    replace(stages, h("ol", { class: "stages", "aria-label": "Stages" }, (r.progress || []).map((s) =>
      h("li", { class: s.status, "aria-current": s.status === "current" ? "step" : null },
        h("strong", {}, `${s.index + 1}. ${s.text}`), h("br"), `${num(s.devices)} devices · ${s.status}`))));
    const ev = r.last_evaluation;
    const values = ev && ev.values ? Object.entries(ev.values) : [];
    replace(gates, ev ? h("p", { class: "muted" }, `Last evaluation: ${ev.decision}${ev.reason ? ` — ${ev.reason}` : ""}`) : null,
      table(["Gate", "Value", "Threshold", ""], values.map(([gate, v]) => [h("code", {}, gate), num(v.value, 4), num(v.threshold, 4),
        v.ok === true ? badge("ok", "ok") : v.ok === false ? badge("failing", "bad") : v.threshold === null || v.threshold === undefined ? h("span", { class: "muted" }, "not set") : badge("no data yet", "warn")]),
      { empty: "No gate evaluated yet." }));
    if (found) {
      replace(events, h("ol", { class: "timeline", "aria-label": "Events" }, found.slice().reverse().map((e) => h("li", { class: e.kind },
        h("div", {}, h("strong", {}, e.kind), ` by ${e.actor} · stage ${e.stage_index + 1} · `, h("time", { datetime: new Date(e.at_ms).toISOString() }, when(e.at_ms))),
        e.reason ? h("div", {}, e.reason) : null,
        e.values && Object.keys(e.values).length ? h("details", {}, h("summary", {}, "values"), h("pre", {}, JSON.stringify(e.values, null, 2))) : null))));
    }
  }

  async function refresh() {
    const [r, { events: found }] = await Promise.all([get(`/v1/rollouts/${encodeURIComponent(id)}`), get(`/v1/rollouts/${encodeURIComponent(id)}/events`)]);
    render(r, found);
  }
  await refresh();
  ctx.every(2000, refresh);
}
