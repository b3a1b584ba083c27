"""What makes an MQTT message on a device topic acceptable: pure checks, each failure named by a reason.

Whether the topic's device is *registered* is checked by the subscriber's writer (it needs the database).
"""

from __future__ import annotations

import math

from google.protobuf.message import DecodeError

from cloud_sync.errors import InvalidArgument
from cloud_sync.store.devices import check_device_id
from edgefleet.proto.edgefleet.v1.telemetry_pb2 import ModelVersionTelemetry, Telemetry

__all__ = [
    "DEFAULT_MAX_PAYLOAD_BYTES",
    "MAX_FUTURE_SKEW_MS",
    "REASONS",
    "Rejected",
    "check_status",
    "check_telemetry",
    "parse_topic",
    "window_end_ms",
]

# Telemetry of a device serving a dozen model versions is about 1 KiB; 64 KiB leaves room for hundreds.
DEFAULT_MAX_PAYLOAD_BYTES = 64 * 1024
# PostgreSQL's BIGINT (and SQLite's INTEGER) are signed 64-bit: larger uint64 counters are not sane anyway.
_MAX_COUNT = 2**63 - 1
_MAX_MODELS = 1024
_MAX_NAME_CHARS = 256
_MAX_WINDOW_S = 7 * 86_400.0
_INF = math.inf
TELEMETRY_CONTENT_TYPE = Telemetry.DESCRIPTOR.full_name

# How far past the cloud's clock a device may stamp its telemetry and still have its windows placed at its own
# time. Clocks kept by NTP agree within milliseconds; a device without a real-time clock, or with a broken
# one, can be decades off either way.
MAX_FUTURE_SKEW_MS = 60_000

# Every reason a message is ignored (the `reason` label of cloud_sync_telemetry_rejected_total).
REASONS = (
    "invalid_topic",  # not {prefix}/devices/{id}/telemetry|status
    "invalid_device_id",  # the topic's id is not a valid device id
    "unregistered",  # a valid id that no registered (non-revoked) device has
    "oversized",  # payload past the size limit
    "content_type",  # an MQTT 5 content type other than the message's
    "undecodable",  # not a Telemetry protobuf
    "device_mismatch",  # the message's device_id is not the topic's
    "invalid_values",  # NaN, infinities, negative or impossible figures
    "invalid_status",  # a status payload other than b"online" / b"offline"
    "overloaded",  # a QoS 0 message while the writer is behind (QoS 1 ones wait: they are never dropped)
    "store_failed",  # the database refused the message itself (not an outage: those are retried)
)


class Rejected(Exception):
    """A message to ignore; `reason` is one of REASONS."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def parse_topic(topic: str, prefix: str) -> tuple[str, str]:
    """(device id, kind) of `{prefix}/devices/{id}/{kind}`, kind being `telemetry` or `status`."""
    head = f"{prefix}/devices/"
    if not topic.startswith(head):
        raise Rejected("invalid_topic", topic)
    device_id, _, kind = topic[len(head) :].partition("/")
    if kind not in ("telemetry", "status"):
        raise Rejected("invalid_topic", topic)
    try:
        check_device_id(device_id)
    except InvalidArgument as exc:
        raise Rejected("invalid_device_id", exc.message) from None
    return device_id, kind


def check_status(payload: bytes) -> bool:
    """True for b"online", False for b"offline"."""
    if payload == b"online":
        return True
    if payload == b"offline":
        return False
    raise Rejected("invalid_status", repr(payload[:32]))


def check_telemetry(
    device_id: str,
    payload: bytes,
    *,
    max_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
    content_type: str | None = None,
) -> Telemetry:
    """The Telemetry in `payload`, published on `device_id`'s topic, if it is acceptable; raises Rejected.

    The topic's device id is trusted only because the broker's ACL (acl.py, docs/mqtt.md) lets a device
    publish under its own `devices/{id}/` and nowhere else; the message's own device_id must agree with it.
    """
    if len(payload) > max_bytes:
        raise Rejected("oversized", f"{len(payload)} bytes, limit {max_bytes}")
    if content_type and content_type != TELEMETRY_CONTENT_TYPE:
        raise Rejected("content_type", content_type[:64])
    try:
        message = Telemetry.FromString(payload)
    except DecodeError as exc:
        raise Rejected("undecodable", str(exc)) from None
    if message.device_id != device_id:
        raise Rejected("device_mismatch", f"message device_id {message.device_id[:64]!r} on {device_id}'s topic")
    problem = _insane(message)
    if problem:
        raise Rejected("invalid_values", problem)
    return message


def window_end_ms(timestamp_ms: int, received_at_ms: int) -> int:
    """Where a telemetry window ends on the cloud's time line, which every "last N minutes" query reads.

    The device's own time when it is plausible: not past the cloud's clock by more than MAX_FUTURE_SKEW_MS.
    Earlier times are kept (a device that was offline sends its held window late, and it belongs to the
    past); a time in the future is a wrong clock, and the window is placed when it was received. Otherwise a
    message stamped 2**62 would sit in every "recent" query forever, and rollout gates read those.
    """
    return timestamp_ms if timestamp_ms <= received_at_ms + MAX_FUTURE_SKEW_MS else received_at_ms


def _insane(m: Telemetry) -> str:
    """What is wrong with a decoded message's figures ('' when nothing).

    Written as plain comparisons: this runs on paho's thread for every message (about 4 us). A comparison
    with NaN is false, so `0.0 <= x < _INF` also rejects NaN; uint64 fields cannot be negative.
    """
    if m.timestamp_ms <= 0 or m.agent_start_ms < 0 or m.seq > _MAX_COUNT:
        return "timestamp_ms, agent_start_ms or seq out of range"
    if not 0.0 <= m.window_s <= _MAX_WINDOW_S:
        return f"window_s {m.window_s}"
    if len(m.models) > _MAX_MODELS:
        return f"{len(m.models)} model versions (at most {_MAX_MODELS})"
    o, s = m.outbox, m.system
    if max(
        o.depth,
        o.bytes,
        o.produced_total,
        o.evicted_total,
        o.acked_seq,
        o.delivered_total,
        o.rejected_total,
        o.quarantined,
    ) > _MAX_COUNT or not (0.0 <= o.upload_lag_s < _INF):
        return "outbox figures out of range"
    if (
        not (0.0 <= s.cpu_percent < _INF and 0.0 <= s.gpu_percent < _INF and 0.0 <= s.power_w < _INF)
        or max(s.memory_used_bytes, s.memory_total_bytes) > _MAX_COUNT
    ):
        return "system figures out of range"
    if not -273.15 <= s.temperature_c <= 1000.0:
        return f"temperature_c {s.temperature_c}"
    seen: set[tuple[str, int]] = set()
    for v in m.models:
        name, version = v.name, v.version
        if not 0 < len(name) <= _MAX_NAME_CHARS or version < 1:
            return f"{_where(v)}: a model needs a name (at most {_MAX_NAME_CHARS} characters) and a version >= 1"
        if (name, version) in seen:
            return f"{_where(v)} appears twice"
        seen.add((name, version))
        requests, compared = v.requests, v.shadow_compared
        if max(requests, v.inferences, compared) > _MAX_COUNT or v.errors > requests or v.shadow_agreed > compared:
            return f"{_where(v)}: counts out of range (errors > requests, agreed > compared, or past 2**63)"
        lat = v.latency
        if not 0.0 <= lat.p50_ms <= lat.p95_ms <= lat.p99_ms < _INF:
            return f"{_where(v)}: latency percentiles not finite, negative or out of order"
        if not (0.0 <= v.mean_batch_size < _INF and 0.0 <= v.cpu_seconds < _INF and 0.0 <= v.energy_joules < _INF):
            return f"{_where(v)}: mean_batch_size, cpu_seconds or energy_joules not finite or negative"
    return ""


def _where(v: ModelVersionTelemetry) -> str:
    return f"model {v.name[:64]!r} version {v.version}"
