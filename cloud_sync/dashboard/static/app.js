// The dashboard's shell: sign-in, the hash router (#/page/arg), each page's polling, and who may do what.

import { api, ApiError, savedToken, saveToken } from "./api.js";
import { h, field, replace } from "./dom.js";
import { overview } from "./pages/overview.js";
import { devices, device } from "./pages/devices.js";
import { models } from "./pages/models.js";
import { rollouts, rollout } from "./pages/rollouts.js";
import { policies } from "./pages/policies.js";
import { audit } from "./pages/audit.js";
import { results } from "./pages/results.js";
import { tokens } from "./pages/tokens.js";

const ROLES = ["viewer", "operator", "admin"];
const PAGES = {
  overview: [overview, "Overview"],
  devices: [devices, "Devices"],
  device: [device, "Device"],
  models: [models, "Models"],
  rollouts: [rollouts, "Rollouts"],
  rollout: [rollout, "Rollout"],
  policies: [policies, "Policies"],
  results: [results, "Results"],
  audit: [audit, "Audit log"],
  tokens: [tokens, "API tokens"],
};
// The page a detail page belongs to, for the navigation's current link.
const SECTION = { device: "devices", rollout: "rollouts" };

const main = document.getElementById("main");
let session = null;
let current = null;

// Whoami before the backend had roles answered 404: then the one token there is is the admin's.
async function whoami(token) {
  try {
    return await api("GET", "/v1/whoami", undefined, token);
  } catch (exc) {
    if (exc instanceof ApiError && exc.status === 404) return { name: "admin-token", role: "admin" };
    throw exc;
  }
}

function can(role) {
  return session !== null && ROLES.indexOf(session.role) >= ROLES.indexOf(role);
}

function signIn(message) {
  stop();
  session = null;
  document.getElementById("nav").hidden = true;
  document.getElementById("who").hidden = true;
  document.title = "Sign in · Edgefleet";
  const input = h("input", { id: "token", name: "token", type: "password", autocomplete: "off", required: true, spellcheck: "false" });
  const alert = h("div", { class: "alert", role: "alert", id: "signin-error" }, message || "");
  const form = h("form", { class: "panel signin", novalidate: true, onsubmit: async (event) => {
    event.preventDefault();
    const token = input.value.trim();
    if (!token) {
      replace(alert, "Enter an admin-API token: `cloud-sync admin-token` prints the admin's, `fleetctl tokens create` makes others.");
      input.focus();
      return;
    }
    button.disabled = true;
    try {
      const who = await whoami(token);
      saveToken(token);
      start(who);
    } catch (exc) {
      replace(alert, exc.message);
      input.focus();
    } finally {
      button.disabled = false;
    }
  } });
  const button = h("button", { type: "submit" }, "Sign in");
  replace(form,
    h("h1", {}, "Sign in"),
    h("p", { class: "muted" }, "With an admin-API token. It stays in this tab only (session storage) and is sent to this server's API, nothing else."),
    field("Token", input),
    alert,
    h("p", {}, button));
  replace(main, form);
  input.focus();
}

function start(who) {
  session = { ...who, can };
  document.getElementById("nav").hidden = false;
  document.getElementById("who").hidden = false;
  replace(document.getElementById("who-name"), `${who.name} · ${who.role}`);
  // Pages a role may not use are not offered (the API refuses them too).
  for (const link of document.querySelectorAll("#nav a[data-role]")) link.hidden = !can(link.dataset.role);
  if (!location.hash || location.hash === "#" || location.hash === "#/") location.hash = "#/overview";
  else route();
}

function stop() {
  if (current) for (const fn of current.cleanup) fn();
  current = null;
}

function route() {
  if (!session) return;
  stop();
  const [name, ...rest] = location.hash.replace(/^#\/?/, "").split("/");
  const entry = PAGES[name];
  if (!entry) {
    location.hash = "#/overview";
    return;
  }
  const [page, title] = entry;
  const section = SECTION[name] || name;
  for (const link of document.querySelectorAll("#nav a")) {
    if (link.getAttribute("href") === `#/${section}`) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  const ctx = {
    session,
    args: rest.map(decodeURIComponent),
    cleanup: [],
    // Poll `fn` every `ms` while the page is shown (a page's live figures); errors show on the page.
    every(ms, fn) {
      const id = setInterval(() => fn().catch(ctx.failed), ms);
      ctx.cleanup.push(() => clearInterval(id));
    },
    failed(exc) {
      if (exc instanceof ApiError && exc.status === 401) {
        saveToken(null);
        signIn(`Signed out: ${exc.message}`);
        return;
      }
      if (ctx !== current) return;
      const where = main.querySelector("#page-error") || main.insertBefore(h("div", { class: "alert", role: "alert", id: "page-error" }), main.firstChild);
      replace(where, exc.message);
    },
    go(hash) { location.hash = hash; },
  };
  current = ctx;
  document.title = `${title} · Edgefleet`;
  replace(main, h("p", { class: "muted" }, "Loading…"));
  // aria-busy until the page's first data is shown (screen readers wait for it; so do the browser tests).
  main.setAttribute("aria-busy", "true");
  main.dataset.page = name;
  Promise.resolve(page(main, ctx)).catch(ctx.failed).finally(() => { if (ctx === current) main.setAttribute("aria-busy", "false"); });
  main.focus({ preventScroll: true });
}

document.getElementById("sign-out").addEventListener("click", () => {
  saveToken(null);
  history.replaceState(null, "", location.pathname);
  signIn("Signed out.");
});
window.addEventListener("hashchange", route);

const token = savedToken();
if (token) whoami(token).then(start, (exc) => { saveToken(null); signIn(exc.message); });
else signIn();
