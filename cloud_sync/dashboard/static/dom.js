// Building the page: h(tag, attributes, ...children), plus the small formatting helpers every page uses.

export function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else if (key === "class") el.className = value;
    else if (key === "text") el.textContent = value;
    else if (value === true) el.setAttribute(key, "");
    else el.setAttribute(key, String(value));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    if (Array.isArray(child)) append(el, child);
    else el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

export function replace(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

export function table(headers, rows, { caption, empty = "None." } = {}) {
  if (!rows.length) return h("p", { class: "muted" }, empty);
  const head = h("tr", {}, headers.map((t) => h("th", { scope: "col", class: /^(#|p50|p95|p99|requests|error rate|size|devices$|priority|cpu|j \/)/i.test(t) ? "num" : null }, t)));
  return h("div", { class: "scroll" },
    h("table", {}, caption ? h("caption", { class: "muted" }, caption) : null, h("thead", {}, head),
      h("tbody", {}, rows.map((cells) => h("tr", {}, cells.map((c) => c instanceof Node && c.tagName === "TD" ? c : h("td", {}, c)))))));
}

export function num(value, digits = 1) {
  if (value === null || value === undefined) return "—";
  if (typeof value !== "number") return String(value);
  return Number.isInteger(value) ? value.toLocaleString("en") : value.toLocaleString("en", { maximumFractionDigits: digits });
}

export function pct(value, digits = 2) {
  return value === null || value === undefined ? "—" : `${(value * 100).toFixed(digits)} %`;
}

export function when(ms) {
  if (!ms) return "never";
  const d = new Date(ms);
  return `${d.toLocaleDateString("en-CA")} ${d.toLocaleTimeString("en-GB")}`;
}

export function ago(ms) {
  if (!ms) return "never";
  const s = Math.max(0, (Date.now() - ms) / 1000);
  if (s < 60) return `${Math.round(s)} s ago`;
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  if (s < 86400) return `${Math.round(s / 3600)} h ago`;
  return `${Math.round(s / 86400)} d ago`;
}

export function labelsText(labels) {
  return Object.entries(labels || {}).map(([k, v]) => `${k}=${v}`).join(",");
}

// "site=lab,cam=1" -> {site: "lab", cam: "1"}; a message naming the bad term otherwise ("" and "*": every device).
export function parseSelector(text) {
  const trimmed = text.trim();
  if (trimmed === "" || trimmed === "*") return { selector: {} };
  const selector = {};
  for (const term of trimmed.split(",")) {
    const at = term.indexOf("=");
    if (at <= 0 || at === term.length - 1) return { error: `selector: ${JSON.stringify(term)} is not key=value (e.g. site=lab)` };
    selector[term.slice(0, at).trim()] = term.slice(at + 1).trim();
  }
  return { selector };
}

export function badge(text, tone) {
  return h("span", { class: `badge ${tone || ""}` }, text);
}

export function field(labelText, input, hint) {
  return h("label", {}, labelText, hint ? h("span", { class: "hint" }, hint) : null, input);
}

// "24h" -> 86400 (a number with s, m, h or d; a bare number is seconds), as fleetctl's --expires; null if not one.
export function parseDuration(text) {
  const m = /^(\d+(?:\.\d+)?)\s*([smhd]?)$/.exec(text.trim());
  return m ? Math.round(Number(m[1]) * { "": 1, s: 1, m: 60, h: 3600, d: 86400 }[m[2]]) : null;
}

// A secret the API shows only once (a token): selectable text, a Copy button, and the "copy it now" warning.
export function shownOnce(id, label, value, extra) {
  const text = h("input", { id, class: "secret", readonly: true, value, spellcheck: "false", "aria-label": label, onfocus: (e) => e.target.select() });
  const said = h("span", { class: "muted" });
  const copy = h("button", { type: "button", class: "quiet", onclick: async () => {
    text.select();
    try {
      await navigator.clipboard.writeText(value);
      replace(said, "Copied.");
    } catch {
      // No clipboard API off a secure origin (plain http to another host): the text is selected instead.
      replace(said, "Selected: press Ctrl+C (⌘C) to copy.");
    }
  } }, "Copy");
  return h("div", { class: "note once", role: "status" },
    h("strong", {}, `${label}: copy it now. `), "It is shown only this once (cloud-sync keeps only its sha256).",
    h("div", { class: "row" }, text, copy, said), extra || null);
}
