// Assignments, on the Models page: which version of a model the devices a selector matches should run (fleetctl
// models assign / unassign); operators set and remove them. A rollout changes them on its own as it goes.

import { api, get } from "../api.js";
import { h, replace, table, num, when, field, parseSelector } from "../dom.js";

export function assignmentsSection(ctx, names) {
  const list = h("div", { id: "assignment-list" });
  const problem = h("div", { class: "alert", role: "alert", id: "assignment-list-error" });
  const operator = ctx.session.can("operator");

  async function refresh() {
    const { assignments } = await get("/v1/assignments");
    replace(list, table(["Model", "Version", "Selector", "Priority", "Updated", operator ? "Actions" : null].filter(Boolean),
      assignments.map((a) => {
        const where = a.selector_text || "every device";
        const cells = [h("strong", {}, a.model), `v${a.version}`, h("code", {}, where), h("td", { class: "num" }, num(a.priority)), when(a.updated_at_ms)];
        if (operator) {
          cells.push(h("button", { type: "button", class: "quiet", "aria-label": `Unassign ${a.model} from ${where}`, onclick: async () => {
            if (!confirm(`Unassign ${a.model} from ${where}? Its devices keep what they run unless another assignment applies.`)) return;
            try { await api("DELETE", "/v1/assignments", { model: a.model, selector: a.selector }); replace(problem); await refresh(); } catch (exc) { replace(problem, exc.message); }
          } }, "Unassign"));
        }
        return cells;
      }), { empty: "No assignment: no device is told to run a model." }));
  }
  ctx.every(10000, refresh);
  return {
    refresh,
    element: h("section", { "aria-labelledby": "assign-title" }, h("h2", { id: "assign-title" }, "Assignments: which devices run which version"),
      problem, list, operator ? assignForm(names, refresh) : null),
  };
}

function assignForm(names, done) {
  const model = h("select", { id: "assign-model", name: "model" }, names.map((n) => h("option", { value: n }, n)));
  const version = h("input", { id: "assign-version", name: "version", type: "number", min: "1", step: "1", inputmode: "numeric" });
  const selector = h("input", { id: "assign-selector", name: "selector", placeholder: "site=lab (empty: every device)", spellcheck: "false" });
  const priority = h("input", { id: "assign-priority", name: "priority", type: "number", step: "1", value: "0", inputmode: "numeric" });
  const alert = h("div", { class: "alert", role: "alert", id: "assign-error" });
  const note = h("div", { class: "note", role: "status", id: "assign-saved" });
  const button = h("button", { type: "submit", id: "assign" }, "Assign");
  const form = h("form", { class: "grid", id: "assign-set", novalidate: true, onsubmit: async (event) => {
    event.preventDefault();
    replace(alert);
    replace(note);
    const chosen = parseSelector(selector.value);
    const v = Number(version.value);
    const p = Number(priority.value);
    const problem = !model.value ? "model: register a model first (`fleetctl models push`)"
      : !version.value.trim() || !Number.isInteger(v) || v < 1 ? "version: a version number, 1 or more"
        : chosen.error ? chosen.error
          : priority.value.trim() === "" || !Number.isInteger(p) ? "priority: a whole number" : "";
    if (problem) {
      replace(alert, problem);
      return;
    }
    button.disabled = true;
    try {
      const a = await api("PUT", "/v1/assignments", { model: model.value, version: v, selector: chosen.selector, priority: p });
      replace(note, `Assigned ${a.model} v${a.version} to ${a.selector_text || "every device"}: their desired states are written.`);
      await done();
    } catch (exc) {
      replace(alert, exc.message);
    } finally {
      button.disabled = false;
    }
  } },
  field("Model", model), field("Version", version), field("Devices", selector, "key=value,…"),
  field("Priority", priority, "higher wins where assignments overlap"), h("div", {}, button));
  return h("div", { class: "panel spaced" }, h("h3", {}, "Assign a version"), form, alert, note);
}
