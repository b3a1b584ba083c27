// Results: the latest stored results, oldest first, as `fleetctl results tail --follow` prints them (a line each:
// when the device made it, the device, its seq, the version, the kind, what it says), new ones as they arrive.

import { get, query } from "../api.js";
import { h, replace, when, field } from "../dom.js";

const KINDS = { 1: "result", 2: "event", 3: "sampled input" };
const MAX_ROWS = 500;
// KServe datatypes the summary reads: [bytes, DataView getter] (little-endian, as raw contents are).
const TYPES = {
  FP32: [4, "getFloat32"], FP64: [8, "getFloat64"], INT8: [1, "getInt8"], INT16: [2, "getInt16"], INT32: [4, "getInt32"],
  INT64: [8, "getBigInt64"], UINT8: [1, "getUint8"], UINT16: [2, "getUint16"], UINT32: [4, "getUint32"], UINT64: [8, "getBigUint64"],
};

export async function results(main, ctx) {
  const device = h("input", { id: "results-device", name: "device_id", placeholder: "every device", spellcheck: "false", value: ctx.args[0] || "" });
  const last = h("input", { id: "results-last", name: "last", type: "number", min: "0", max: "10000", step: "1", value: "20", inputmode: "numeric" });
  const alert = h("div", { class: "alert", role: "alert", id: "results-error" });
  const said = h("p", { class: "muted", "aria-live": "polite" });
  const rows = h("tbody", { id: "results-rows" });
  const box = h("div", { class: "scroll", hidden: true },
    h("table", {}, h("thead", {}, h("tr", {}, ["Made (UTC)", "Device", "Seq", "Version", "Kind", "What it says"].map((t) => h("th", { scope: "col" }, t)))), rows));
  let cursor = null;
  let shownFor = "";

  async function start() {
    const id = device.value.trim();
    const n = last.value.trim() === "" ? NaN : Number(last.value);
    if (!Number.isInteger(n) || n < 0 || n > 10000) throw new Error("last: how many of the newest results to start with, 0 to 10000 (0: from the first)");
    // A mistyped id would show nothing and wait forever: the API's 404 names it instead.
    if (id) await get(`/v1/devices/${encodeURIComponent(id)}`);
    const { after_id } = n ? await get(`/v1/results/cursor${query({ device_id: id, last: n })}`) : { after_id: 0 };
    shownFor = id;
    cursor = after_id;
    rows.replaceChildren();
    await more(false);
  }

  async function more(following) {
    if (cursor === null) return;
    for (;;) {
      // Following, stay 2 s behind the newest (as fleetctl): on PostgreSQL a lower id can still be committing.
      const page = await get(`/v1/results${query({ device_id: shownFor, after_id: cursor, limit: 1000, settle_ms: following ? 2000 : 0 })}`);
      for (const r of page.results) rows.append(row(r));
      cursor = page.next_after_id;
      if (page.results.length < 1000) break;
    }
    while (rows.children.length > MAX_ROWS) rows.firstChild.remove();
    box.hidden = !rows.children.length;
    replace(said, rows.children.length ? `${rows.children.length} results${shownFor ? ` of ${shownFor}` : ""}, oldest first; new ones appear as devices upload them.` : "No result stored yet; new ones appear as devices upload them.");
  }

  const form = h("form", { class: "grid", id: "results-filter", novalidate: true, onsubmit: async (event) => {
    event.preventDefault();
    replace(alert);
    try { await start(); } catch (exc) { replace(alert, exc.message); }
  } }, field("Device", device, "empty: every device"), field("Start with the newest", last, "0: from the first"), h("div", {}, h("button", { type: "submit" }, "Show")));
  replace(main, h("h1", {}, "Results"), h("div", { class: "panel" }, form), alert, said, box);
  try { await start(); } catch (exc) { replace(alert, exc.message); }
  ctx.every(3000, () => more(true));
}

function row(r) {
  return h("tr", {}, h("td", { class: "nowrap" }, h("time", { datetime: new Date(r.created_at_ms).toISOString() }, utc(r.created_at_ms))),
    h("td", {}, r.device_id), h("td", {}, `#${r.seq}`), h("td", { class: "nowrap" }, `${r.model}:${r.version}`),
    h("td", {}, KINDS[r.kind] || `kind ${r.kind}`), h("td", {}, summary(r)));
}

function utc(ms) {
  return new Date(ms).toISOString().replace("T", " ").replace(/\.\d+Z$/, "");
}

// The top class of a kept inference result, as fleetctl prints it; other payloads by their size and type.
export function summary(r) {
  if (r.payload_type !== "inference.ModelInferResponse") return `${r.payload_bytes} bytes of ${r.payload_type}`;
  try {
    const bytes = Uint8Array.from(atob(r.payload), (c) => c.charCodeAt(0));
    const outputs = [];
    const raws = [];
    for (const [no, value] of fields(bytes)) {
      if (no === 5) outputs.push(tensor(value));
      if (no === 6) raws.push(value);
    }
    return outputs.map((t, i) => outputSummary(t, raws[i])).join("; ");
  } catch {
    return `${r.payload_bytes} bytes (not a readable ModelInferResponse)`;
  }
}

function outputSummary(t, raw) {
  const [size, getter] = TYPES[t.datatype] || [];
  const count = t.shape.reduce((a, b) => a * b, 1);
  if (!size || t.shape.length !== 2 || t.shape[0] !== 1 || !(t.shape[1] > 0 && t.shape[1] <= 1000)) return `${t.name}: ${t.datatype}[${t.shape.join(", ")}]`;
  if (!raw || raw.length !== count * size) throw new Error("size mismatch");
  const view = new DataView(raw.buffer, raw.byteOffset, raw.length);
  let best = 0;
  let top = -Infinity;
  for (let i = 0; i < count; i++) {
    const v = Number(view[getter](i * size, true));
    if (v > top) { top = v; best = i; }
  }
  return `${t.name}: argmax ${best} (${top.toFixed(3)})`;
}

// InferOutputTensor: name = 1, datatype = 2, shape = 3 (packed or not).
function tensor(bytes) {
  const t = { name: "", datatype: "", shape: [] };
  const text = new TextDecoder();
  for (const [no, value, wire] of fields(bytes)) {
    if (no === 1) t.name = text.decode(value);
    else if (no === 2) t.datatype = text.decode(value);
    else if (no === 3 && wire === 0) t.shape.push(value);
    else if (no === 3 && wire === 2) for (let at = 0; at < value.length;) { const [n, next] = varint(value, at); t.shape.push(n); at = next; }
  }
  return t;
}

// A protobuf message's fields: [number, value, wire type]; varints as numbers, length-delimited as bytes.
function* fields(bytes) {
  let at = 0;
  while (at < bytes.length) {
    const [key, next] = varint(bytes, at);
    at = next;
    const wire = key % 8;
    const no = Math.floor(key / 8);
    if (wire === 0) { const [v, n] = varint(bytes, at); at = n; yield [no, v, wire]; }
    else if (wire === 2) { const [len, n] = varint(bytes, at); at = n + len; if (at > bytes.length) throw new Error("truncated"); yield [no, bytes.subarray(n, at), wire]; }
    else if (wire === 1) at += 8;
    else if (wire === 5) at += 4;
    else throw new Error(`wire type ${wire}`);
  }
}

function varint(bytes, at) {
  let value = 0;
  let scale = 1;
  for (;;) {
    if (at >= bytes.length) throw new Error("truncated");
    const b = bytes[at++];
    value += (b & 0x7f) * scale;
    if (b < 0x80) return [value, at];
    scale *= 128;
  }
}
