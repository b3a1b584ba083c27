// The admin API as the dashboard calls it: the bearer token kept in sessionStorage, errors with the API's message.

const KEY = "edgefleet.dashboard.token";

export class ApiError extends Error {
  constructor(status, detail) {
    super(detail);
    this.status = status;
  }
}

export function savedToken() {
  return sessionStorage.getItem(KEY);
}

export function saveToken(token) {
  if (token) sessionStorage.setItem(KEY, token);
  else sessionStorage.removeItem(KEY);
}

export async function api(method, path, body, token = savedToken()) {
  const init = { method, headers: { Authorization: `Bearer ${token || ""}`, Accept: "application/json" } };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (exc) {
    throw new ApiError(0, `cloud-sync cannot be reached (${exc.message}); is it running?`);
  }
  if (!response.ok) {
    let detail = `${response.status} ${response.statusText}`;
    try {
      const answer = await response.json();
      if (answer && answer.detail) detail = answer.detail;
    } catch { /* not JSON: the status line says it */ }
    throw new ApiError(response.status, detail);
  }
  return response.status === 204 ? null : response.json();
}

export const get = (path) => api("GET", path);

export function query(params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) if (v !== "" && v !== null && v !== undefined) q.set(k, String(v));
  const text = q.toString();
  return text ? `?${text}` : "";
}

// Run `fn` over `items`, `limit` at a time (the device states behind the fleet's counts).
export async function pool(items, limit, fn) {
  const out = new Array(items.length);
  let next = 0;
  async function worker() {
    while (next < items.length) {
      const i = next++;
      try { out[i] = await fn(items[i]); } catch (exc) { out[i] = { error: exc }; }
    }
  }
  await Promise.all(Array.from({ length: Math.min(limit, items.length) }, worker));
  return out;
}
