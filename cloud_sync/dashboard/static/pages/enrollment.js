// Joining devices (admin), on the Devices page: mint one-time enrollment tokens and list them, or add a device
// directly with a device token. Each secret is shown once.

import { api, get } from "../api.js";
import { h, replace, table, when, labelsText, parseSelector, badge, field, parseDuration, shownOnce } from "../dom.js";

const STATE_TONE = { unused: "ok", used: null, expired: "warn" };

// "site=lab" -> {labels} or {error} naming the field (labels, unlike a selector, may not be "*").
function parseLabels(text) {
  if (text.trim() === "*") return { error: "labels: key=value, comma-separated (e.g. site=lab,cam=front)" };
  const chosen = parseSelector(text);
  return chosen.error ? { error: chosen.error.replace(/^selector:/, "labels:") } : { labels: chosen.selector };
}

export function enrollmentSections(ctx, devicesChanged) {
  const list = h("div", { id: "enrollment-list" });
  async function refresh() {
    const { tokens } = await get("/v1/enrollment-tokens");
    replace(list, table(["Token", "State", "Device", "Expires / used", "Labels"],
      tokens.map((t) => [h("code", {}, t.token_id), badge(t.state, STATE_TONE[t.state]), t.used_by || t.device_id || h("span", { class: "muted" }, "from its hostname"),
        t.used_at_ms ? `used ${when(t.used_at_ms)}` : when(t.expires_at_ms), h("code", {}, labelsText(t.labels))]),
      { empty: "No enrollment token minted yet." }));
  }
  ctx.every(10000, refresh);
  return {
    refresh,
    element: h("div", {},
      h("section", { class: "panel", "aria-labelledby": "enroll-title" }, h("h2", { id: "enroll-title" }, "Enroll a device"),
        h("p", { class: "muted" }, "A one-time token the device trades for its identity with edge-agent enroll (fleetctl devices token create)."),
        mintForm(refresh), h("h3", {}, "Enrollment tokens"), list),
      h("section", { class: "panel", "aria-labelledby": "add-title" }, h("h2", { id: "add-title" }, "Add a device directly"),
        h("p", { class: "muted" }, "Registers the device and makes its device token, for a device you configure by hand (cloud.device_id, cloud.token_file)."),
        addForm(devicesChanged))),
  };
}

function mintForm(minted) {
  const labels = h("input", { id: "enroll-labels", name: "labels", placeholder: "site=lab,cam=front", spellcheck: "false" });
  const expires = h("input", { id: "enroll-expires", name: "expires", value: "24h", spellcheck: "false" });
  const device = h("input", { id: "enroll-device", name: "device_id", placeholder: "empty: from its hostname", spellcheck: "false" });
  const alert = h("div", { class: "alert", role: "alert", id: "enroll-error" });
  const made = h("div", { id: "enroll-made" });
  const button = h("button", { type: "submit", id: "enroll-mint" }, "Mint enrollment token");
  const form = h("form", { class: "grid", id: "enroll", novalidate: true, onsubmit: async (event) => {
    event.preventDefault();
    replace(alert);
    replace(made);
    const chosen = parseLabels(labels.value);
    const seconds = parseDuration(expires.value);
    const problem = chosen.error || (seconds === null ? "expires: a number with s, m, h or d, e.g. 24h (60 s to 30 days)" : "");
    if (problem) {
      replace(alert, problem);
      return;
    }
    const body = { labels: chosen.labels, expires_in_s: seconds };
    if (device.value.trim()) body.device_id = device.value.trim();
    button.disabled = true;
    try {
      const t = await api("POST", "/v1/enrollment-tokens", body);
      replace(made, shownOnce("enroll-secret", "The enrollment token", t.token,
        h("div", {}, h("p", {}, `It enrolls one device${t.device_id ? ` as ${t.device_id}` : ""} until ${when(t.expires_at_ms)}. On the device:`),
          h("pre", { id: "enroll-command" }, `edge-agent enroll --url HOST:PORT --token ${t.token}`),
          h("p", { class: "muted" }, "HOST:PORT: cloud-sync's gRPC address as the device reaches it (server.public_grpc_target or grpc.listen; grpc.enrollment_listen where devices need client certificates), not this page's."))));
      await minted();
    } catch (exc) {
      replace(alert, exc.message);
    } finally {
      button.disabled = false;
    }
  } },
  field("Labels", labels, "key=value, comma-separated"), field("Expires in", expires, "s, m, h or d: 60 s to 30 days"),
  field("Device id", device, "optional"), h("div", {}, button));
  return h("div", {}, form, alert, made);
}

function addForm(added) {
  const id = h("input", { id: "add-device-id", name: "device_id", placeholder: "cam-17", spellcheck: "false", required: true });
  const labels = h("input", { id: "add-device-labels", name: "labels", placeholder: "site=lab", spellcheck: "false" });
  const alert = h("div", { class: "alert", role: "alert", id: "add-device-error" });
  const made = h("div", { id: "add-device-made" });
  const button = h("button", { type: "submit", id: "add-device" }, "Add device");
  const form = h("form", { class: "grid", id: "device-add", novalidate: true, onsubmit: async (event) => {
    event.preventDefault();
    replace(alert);
    replace(made);
    const chosen = parseLabels(labels.value);
    const problem = !id.value.trim() ? "device_id: the new device's id, e.g. cam-17" : chosen.error || "";
    if (problem) {
      replace(alert, problem);
      return;
    }
    button.disabled = true;
    try {
      const d = await api("POST", "/v1/devices", { device_id: id.value.trim(), labels: chosen.labels });
      replace(made, shownOnce("device-secret", `The device token of ${d.device_id}`, d.token,
        h("p", { class: "muted" }, "Put it in the file the device's cloud.token_file names (mode 0600).")));
      id.value = "";
      await added();
    } catch (exc) {
      replace(alert, exc.message);
    } finally {
      button.disabled = false;
    }
  } },
  field("Device id", id), field("Labels", labels, "key=value, comma-separated"), h("div", {}, button));
  return h("div", {}, form, alert, made);
}
