// Admin-API tokens (admin): who may use the API with which role; make one (shown once) or revoke one.

import { api, get } from "../api.js";
import { h, replace, table, when, badge, field, shownOnce } from "../dom.js";

const ROLE_TONE = { admin: "bad", operator: "warn", viewer: "ok" };

export async function tokens(main, ctx) {
  if (!ctx.session.can("admin")) {
    replace(main, h("h1", {}, "API tokens"), h("p", { class: "alert" }, `Tokens need the admin role; this token is ${ctx.session.role}.`));
    return;
  }
  const list = h("div");
  const problem = h("div", { class: "alert", role: "alert", id: "token-list-error" });
  replace(main, h("h1", {}, "API tokens"),
    h("p", { class: "muted" }, "Each person or script gets a token of its own with the role it needs (fleetctl tokens). Revoking one signs it out within 5 s on every replica."),
    problem, list, createForm(() => refresh()));

  async function refresh() {
    const { tokens: found } = await get("/v1/tokens");
    replace(list, table(["Name", "Role", "Created", "By", "State", "Actions"],
      found.map((t) => [h("strong", { class: "nowrap" }, t.name), badge(t.role, ROLE_TONE[t.role]), when(t.created_at_ms), t.created_by || "—",
        t.revoked_at_ms ? h("span", { class: "muted" }, `revoked ${when(t.revoked_at_ms)}`) : badge("live", "ok"),
        t.revoked_at_ms ? "" : h("button", { type: "button", class: "quiet", "aria-label": `Revoke token ${t.name}`, onclick: async () => {
          if (!confirm(`Revoke the token ${t.name}? Whoever uses it is refused from now on (within 5 s on other replicas).`)) return;
          try { await api("DELETE", `/v1/tokens/${encodeURIComponent(t.name)}`); replace(problem); await refresh(); } catch (exc) { replace(problem, exc.message); }
        } }, "Revoke")]),
      { empty: "No token made yet: only the bootstrap admin token (cloud-sync admin-token) works." }));
  }
  await refresh();
  ctx.every(10000, refresh);
}

function createForm(done) {
  const name = h("input", { id: "token-name", name: "name", placeholder: "ops-alice", spellcheck: "false", required: true, maxlength: "64" });
  const role = h("select", { id: "token-role", name: "role" }, ["viewer", "operator", "admin"].map((r) => h("option", { value: r }, r)));
  const alert = h("div", { class: "alert", role: "alert", id: "token-error" });
  const made = h("div", { id: "token-made" });
  const button = h("button", { type: "submit", id: "token-create" }, "Create token");
  const form = h("form", { class: "grid", id: "token-new", novalidate: true, onsubmit: async (event) => {
    event.preventDefault();
    replace(alert);
    replace(made);
    if (!name.value.trim()) {
      replace(alert, "name: a name for the token's holder, 1-64 letters, digits and . _ - (e.g. ops-alice)");
      return;
    }
    button.disabled = true;
    try {
      const t = await api("POST", "/v1/tokens", { name: name.value.trim(), role: role.value });
      replace(made, shownOnce("token-secret", `The ${t.role} token ${t.name}`, t.token,
        h("p", { class: "muted" }, "Sign in with it here, or give it to fleetctl: FLEETCTL_TOKEN or --token-file.")));
      name.value = "";
      await done();
    } catch (exc) {
      replace(alert, exc.message);
    } finally {
      button.disabled = false;
    }
  } },
  field("Name", name, "who holds it: 1-64 letters, digits, . _ -"), field("Role", role, "viewer reads; operator also runs rollouts; admin also tokens, policies, devices"),
  h("div", {}, button));
  return h("section", { class: "panel", "aria-labelledby": "token-title" }, h("h2", { id: "token-title" }, "Create a token"), form, alert, made);
}
