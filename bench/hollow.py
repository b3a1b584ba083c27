"""Hollow devices: thousands of light MQTT clients speaking the device's control protocol, with no inference.

Each hollow device connects to the broker as its device (client id = device id, last will `offline`, status
`online`, both retained), subscribes to `{prefix}/devices/{id}/desired` (QoS 1; retained, so the current
state comes on every connect) and answers each newer DesiredState with a ReportedState on
`{prefix}/devices/{id}/reported` (retained, QoS 1, MQTT 5 content type as the agent's): the same generation,
every ACTIVE model ACTIVE (SHADOW ones READY), the desired policy_hash, converged. What a real agent that
converges at once would say; nothing downloaded, loaded or run.

With `telemetry_s`, each device also publishes a Telemetry message every `telemetry_s` seconds on
`{prefix}/devices/{id}/telemetry` (QoS 1, the agent's content type), with made-up figures per model version it
serves: `requests_per_s` requests, a fixed latency, no errors; a SHADOW version compares `shadow_sample_rate`
of the active one's requests and agrees on all of them. A `Behaviour` makes chosen versions bad, as the bad
rollout candidates of models/build.py are: `errors` (a share of its requests fail), `slow` (latency and CPU
x40), `disagree` (as a SHADOW it agrees on few rows) or `fail` (it never loads: reported FAILED, and the
device goes on serving the version it served before). Requests are counted per version for the seconds it
served in the window, so a switch mid-window splits the window. Every version a device ever served ACTIVE is
recorded (`ran_active`), so a test can say which devices never ran a candidate.

One thread drives every client with paho's external-loop API (`socket()`, `loop_read`/`loop_write`/
`loop_misc` on one selector): no paho thread and no socketpair per client, so one process holds 10 000
devices in one file descriptor each. `HollowProcess` runs a fleet (or several shards) in child processes
(`python -m bench.hollow`), so that the process that measures is not the one that answers.
For benchmarks and tests (bench/bench_control_fanout.py, bench/bench_rollout.py); not a device simulator:
no inference, no downloads, no delays, and figures that are made up (only their relations mean something).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import platform
import resource
import selectors
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from paho.mqtt.client import Client, ConnectFlags, DisconnectFlags, MQTTMessage
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edgefleet.proto.edgefleet.v1.state_pb2 import (
    MODEL_ROLE_ACTIVE,
    MODEL_ROLE_SHADOW,
    MODEL_STATE_ACTIVE,
    MODEL_STATE_FAILED,
    MODEL_STATE_READY,
    AgentInfo,
    DesiredState,
    ModelRole,
    ModelStatus,
    ReportedState,
)
from edgefleet.proto.edgefleet.v1.telemetry_pb2 import LatencySummary, ModelVersionTelemetry, Telemetry

__all__ = [
    "BAD_KINDS",
    "Behaviour",
    "HollowFleet",
    "HollowProcess",
    "HollowStats",
    "device_ids",
    "parse_bad",
    "raise_fd_limit",
    "reported_for",
]

# The agent's MQTT 5 content types (edge_runtime/sync/mqtt.py; not imported: the cloud-side bench runs without it).
REPORTED_CONTENT_TYPE = ReportedState.DESCRIPTOR.full_name
TELEMETRY_CONTENT_TYPE = Telemetry.DESCRIPTOR.full_name
STATUS_CONTENT_TYPE = "text/plain"
STATUS_ONLINE = b"online"
STATUS_OFFLINE = b"offline"
AGENT_VERSION = "hollow"
# Connects started per turn of the loop: the broker's CONNACKs and SUBACKs are read between batches, so a
# fleet of 10 000 does not hold 10 000 half-open connections (nor the listen backlog) at once.
CONNECT_BATCH = 200
MISC_INTERVAL_S = 1.0  # keepalive pings and reconnects
RECONNECT_DELAY_S = 1.0
SELECT_TIMEOUT_S = 0.05
# How a bad version behaves (Behaviour.bad): fails requests, is slow, disagrees in shadow, never loads.
BAD_KINDS = ("errors", "slow", "disagree", "fail")
FAIL_REASON = "hollow: this version fails to load (a bad candidate)"
ModelKey = tuple[str, int]  # (model name, version)


@dataclass(frozen=True)
class Behaviour:
    """The figures hollow devices report per model version, and which versions are bad and how."""

    bad: Mapping[int, str] = field(default_factory=dict)  # version -> one of BAD_KINDS (any model name)
    requests_per_s: float = 20.0  # answered by the ACTIVE version of each model
    p50_ms: float = 2.0
    p95_ms: float = 3.0
    p99_ms: float = 4.0
    cpu_s_per_request: float = 0.002
    error_share: float = 0.25  # `errors`: the share of its requests that fail
    slow_factor: float = 40.0  # `slow`: latency and CPU times this (models/build.py's digits v4: ~40x)
    agree_share: float = 0.1  # `disagree`: the share of compared rows that agree (v3's shifted labels)

    def __post_init__(self) -> None:
        for version, kind in self.bad.items():
            if kind not in BAD_KINDS or version < 1:
                raise ValueError(f"bad version {version}={kind}: a version >= 1 and one of {', '.join(BAD_KINDS)}")
        if self.requests_per_s <= 0 or not 0 <= self.error_share <= 1 or not 0 <= self.agree_share <= 1:
            raise ValueError("requests_per_s must be > 0, error_share and agree_share within 0..1")

    def kind(self, version: int) -> str:
        return self.bad.get(version, "")


def parse_bad(text: str) -> tuple[int, str]:
    """`3=disagree` -> (3, "disagree"); ValueError naming what is wrong."""
    version, sep, kind = text.partition("=")
    if not sep or not version.strip().isdigit() or int(version) < 1 or kind.strip() not in BAD_KINDS:
        raise ValueError(f"--bad {text!r}: VERSION=KIND, a version >= 1 and a kind of {', '.join(BAD_KINDS)}")
    return int(version), kind.strip()


def device_ids(count: int, prefix: str = "hollow-") -> list[str]:
    """`count` device ids that sort in creation order: hollow-00000, hollow-00001, ..."""
    width = max(5, len(str(count - 1)))
    return [f"{prefix}{i:0{width}d}" for i in range(count)]


def raise_fd_limit(wanted: int) -> int:
    """Raise this process's open-file soft limit towards `wanted` (at most the hard limit); the new limit.

    Child processes (the broker, hollow shards) inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        return target
    return soft


def reported_for(desired: DesiredState, agent: AgentInfo | None = None, failing: Iterable[int] = ()) -> ReportedState:
    """What a device that converged at once reports for `desired`; versions in `failing` never load (FAILED,
    with a reason, and the device not converged), as the agent reports a load it keeps retrying."""
    failed = set(failing)
    models = []
    for m in desired.models:
        status = ModelStatus(name=m.name, version=m.version, role=m.role, backend="hollow", sha256=m.sha256)
        if m.version in failed:
            status.state, status.reason, status.package_fault = MODEL_STATE_FAILED, FAIL_REASON, True
        else:
            status.state = MODEL_STATE_ACTIVE if m.role == MODEL_ROLE_ACTIVE else MODEL_STATE_READY
            status.progress = 1.0
        models.append(status)
    return ReportedState(
        device_id=desired.device_id,
        generation=desired.generation,
        models=models,
        policy_hash=desired.policy_hash,
        agent=agent,
        reported_at_ms=time.time_ns() // 1_000_000,
        converged=not any(m.version in failed for m in desired.models),
    )


@dataclass(frozen=True)
class HollowStats:
    """What the fleet did since it started (a snapshot). Times are time.time() seconds, 0.0 if never."""

    devices: int
    connected: int
    subscribed: int
    connects: int  # successful CONNACKs, reconnects included
    disconnects: int
    desired_received: int  # newer DesiredStates answered
    desired_ignored: int  # retained deletions, stale or repeated generations
    desired_rejected: int  # undecodable, or naming another device
    reported_sent: int
    first_desired_at: float
    last_desired_at: float
    cpu_s: float  # this process's CPU seconds (all shards summed by HollowProcess)
    telemetry_sent: int = 0  # Telemetry messages handed to paho while connected

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def total(cls, parts: Sequence[HollowStats]) -> HollowStats:
        def first(values: Iterable[float]) -> float:
            found = [v for v in values if v]
            return min(found) if found else 0.0

        sums = {
            name: sum(getattr(p, name) for p in parts)
            for name in (
                "devices",
                "connected",
                "subscribed",
                "connects",
                "disconnects",
                "desired_received",
                "desired_ignored",
                "desired_rejected",
                "reported_sent",
                "telemetry_sent",
            )
        }
        return cls(
            **sums,
            first_desired_at=first(p.first_desired_at for p in parts),
            last_desired_at=max((p.last_desired_at for p in parts), default=0.0),
            cpu_s=sum(p.cpu_s for p in parts),
        )


class _Device:
    """One hollow device's client and what it last accepted."""

    __slots__ = (
        "client",
        "connected",
        "desired_topic",
        "device_id",
        "generation",
        "next_telemetry_at",
        "ran",
        "reported",
        "retry_at",
        "segment_at",
        "seq",
        "serving",
        "shadow_rates",
        "subscribed",
        "usage",
        "window_at",
    )

    def __init__(self, device_id: str, client: Client, desired_topic: str) -> None:
        self.device_id = device_id
        self.client = client
        self.desired_topic = desired_topic
        self.connected = False
        self.subscribed = False
        self.generation = 0
        self.reported: bytes | None = None  # the newest reported state, sent again on every connect
        self.retry_at = 0.0  # when to try again after a failed connect or a dropped connection
        # Telemetry: what it serves now (role per version), since when (monotonic), and the seconds each
        # version served ACTIVE and SHADOW in the window not yet published.
        self.serving: dict[ModelKey, ModelRole.ValueType] = {}
        self.shadow_rates: dict[ModelKey, float] = {}
        self.usage: dict[ModelKey, list[float]] = {}
        self.segment_at = 0.0
        self.window_at = 0.0
        self.next_telemetry_at = 0.0
        self.seq = 0
        self.ran: set[ModelKey] = set()  # every version it ever served ACTIVE


def _properties(packet_type: int, content_type: str) -> Properties:
    props = Properties(packet_type)  # type: ignore[no-untyped-call]  # paho leaves __init__ unannotated
    props.ContentType = content_type
    return props


class HollowFleet:
    """Hollow devices in this process, on one thread (`start` ... `close`). Thread-safe `stats()`."""

    def __init__(
        self,
        host: str,
        port: int,
        ids: Sequence[str],
        *,
        topic_prefix: str = "edgefleet/v1",
        keepalive_s: int = 60,
        presence: bool = True,
        telemetry_s: float | None = None,
        behaviour: Behaviour | None = None,
    ) -> None:
        if not ids:
            raise ValueError("a hollow fleet needs at least one device id")
        if len(set(ids)) != len(ids):
            raise ValueError("hollow device ids must be distinct")
        if telemetry_s is not None and not 0.05 <= telemetry_s <= 3600:
            raise ValueError(f"telemetry_s {telemetry_s}: seconds within 0.05..3600 (None: no telemetry)")
        self._telemetry_s = telemetry_s
        self._behaviour = behaviour or Behaviour()
        self._failing = {v for v, kind in self._behaviour.bad.items() if kind == "fail"}
        self._started_ms = time.time_ns() // 1_000_000
        self.host, self.port = host, port
        self.prefix = topic_prefix
        self._keepalive = keepalive_s
        self._presence = presence
        self._selector = selectors.DefaultSelector()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="hollow-fleet", daemon=True)
        self._counts = dict.fromkeys(
            ("connects", "disconnects", "received", "ignored", "rejected", "sent", "telemetry"), 0
        )
        self._first_desired = 0.0
        self._last_desired = 0.0
        self._agent = AgentInfo(
            agent_version=AGENT_VERSION, python_version=platform.python_version(), hostname=socket.gethostname()
        )
        self._reported_props = _properties(PacketTypes.PUBLISH, REPORTED_CONTENT_TYPE)
        self._status_props = _properties(PacketTypes.PUBLISH, STATUS_CONTENT_TYPE)
        self._telemetry_props = _properties(PacketTypes.PUBLISH, TELEMETRY_CONTENT_TYPE)
        self._devices = [self._device(device_id) for device_id in ids]
        self._pending = list(reversed(self._devices))  # not yet connected for the first time (popped)
        self._telemetry_due: collections.deque[_Device] = collections.deque()  # by next_telemetry_at

    def _device(self, device_id: str) -> _Device:
        client = Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=device_id,
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        base = f"{self.prefix}/devices/{device_id}"
        device = _Device(device_id, client, f"{base}/desired")
        client.user_data_set(device)
        client.max_queued_messages_set(0)
        if self._presence:
            client.will_set(
                f"{base}/status",
                STATUS_OFFLINE,
                qos=1,
                retain=True,
                properties=_properties(PacketTypes.WILLMESSAGE, STATUS_CONTENT_TYPE),
            )
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        client.on_socket_open = self._socket_open
        client.on_socket_close = self._socket_close
        client.on_socket_register_write = self._register_write
        client.on_socket_unregister_write = self._unregister_write
        return device

    # -- the caller's side --------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the thread; it connects every device (in batches) and keeps them connected. Returns at once."""
        self._thread.start()

    def wait_subscribed(self, timeout: float) -> HollowStats:
        """Block until every device is connected and subscribed; RuntimeError naming how far it got."""
        deadline = time.monotonic() + timeout
        while True:
            stats = self.stats()
            if self._failure is not None:
                raise RuntimeError(f"the hollow fleet's thread failed: {self._failure!r}") from self._failure
            if stats.subscribed >= stats.devices and stats.connected >= stats.devices:
                return stats
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"hollow fleet: {stats.connected} of {stats.devices} connected and {stats.subscribed} subscribed "
                    f"after {timeout:g} s (is the broker's max_connections or the open-file limit too low?)"
                )
            time.sleep(0.02)

    def stats(self) -> HollowStats:
        with self._lock:
            c = self._counts
            connected = sum(1 for d in self._devices if d.connected)
            subscribed = sum(1 for d in self._devices if d.subscribed)
            return HollowStats(
                devices=len(self._devices),
                connected=connected,
                subscribed=subscribed,
                connects=c["connects"],
                disconnects=c["disconnects"],
                desired_received=c["received"],
                desired_ignored=c["ignored"],
                desired_rejected=c["rejected"],
                reported_sent=c["sent"],
                first_desired_at=self._first_desired,
                last_desired_at=self._last_desired,
                cpu_s=time.process_time(),
                telemetry_sent=c["telemetry"],
            )

    def ran_active(self) -> dict[str, list[ModelKey]]:
        """Per device, every (model, version) it ever served ACTIVE, sorted (thread-safe)."""
        with self._lock:
            return {d.device_id: sorted(d.ran) for d in self._devices}

    def close(self, timeout: float = 30.0) -> None:
        """Stop the thread; every device disconnects without saying `offline` (the broker keeps `online`)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        for device in self._devices:
            if device.client.socket() is not None:
                device.client.disconnect()
                device.client.loop_write()
        self._selector.close()

    # -- the fleet's thread -----------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # reported by wait_subscribed and in stats' callers' timeouts
            self._failure = exc
            raise

    def _loop(self) -> None:
        next_misc = time.monotonic() + MISC_INTERVAL_S
        if self._telemetry_s is not None:  # spread over one interval, in device order
            start = time.monotonic()
            for i, device in enumerate(self._devices):
                device.segment_at = device.window_at = start
                device.next_telemetry_at = start + self._telemetry_s * (i + 1) / len(self._devices)
                self._telemetry_due.append(device)
        while not self._stop.is_set():
            self._connect_some()
            self._publish_telemetry_due(time.monotonic())
            events = self._selector.select(SELECT_TIMEOUT_S) if self._selector.get_map() else []
            for key, mask in events:
                client: Client = key.data
                if mask & selectors.EVENT_READ:
                    client.loop_read()
                if mask & selectors.EVENT_WRITE and client.socket() is not None:
                    client.loop_write()
            if not events and not self._selector.get_map():
                self._stop.wait(SELECT_TIMEOUT_S)
            now = time.monotonic()
            if now >= next_misc:
                next_misc = now + MISC_INTERVAL_S
                self._misc(now)

    def _connect_some(self) -> None:
        for _ in range(min(CONNECT_BATCH, len(self._pending))):
            device = self._pending.pop()
            try:
                device.client.connect(self.host, self.port, self._keepalive, clean_start=True)
            except OSError:
                device.retry_at = time.monotonic() + RECONNECT_DELAY_S

    def _misc(self, now: float) -> None:
        for device in self._devices:
            client = device.client
            if client.socket() is not None:
                client.loop_misc()
            elif device.retry_at and now >= device.retry_at:
                device.retry_at = 0.0
                try:
                    client.reconnect()
                except OSError:
                    device.retry_at = now + RECONNECT_DELAY_S

    # paho's callbacks, all on this thread.

    def _socket_open(self, client: Client, _userdata: Any, sock: Any) -> None:
        self._selector.register(sock, selectors.EVENT_READ, client)

    def _socket_close(self, _client: Client, _userdata: Any, sock: Any) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(sock)

    def _register_write(self, client: Client, _userdata: Any, sock: Any) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._selector.modify(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, client)

    def _unregister_write(self, client: Client, _userdata: Any, sock: Any) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._selector.modify(sock, selectors.EVENT_READ, client)

    def _on_connect(
        self, client: Client, device: _Device, _flags: ConnectFlags, reason: ReasonCode, _props: Properties | None
    ) -> None:
        if reason.is_failure:
            device.retry_at = time.monotonic() + RECONNECT_DELAY_S
            return
        with self._lock:
            device.connected = True
            self._counts["connects"] += 1
        base = f"{self.prefix}/devices/{device.device_id}"
        if self._presence:
            client.publish(f"{base}/status", STATUS_ONLINE, qos=1, retain=True, properties=self._status_props)
        if device.reported is not None:
            client.publish(f"{base}/reported", device.reported, qos=1, retain=True, properties=self._reported_props)
        client.subscribe(device.desired_topic, qos=1)

    def _on_subscribe(
        self, _client: Client, device: _Device, _mid: int, codes: list[ReasonCode], _props: Properties | None
    ) -> None:
        if not any(code.is_failure for code in codes):
            with self._lock:
                device.subscribed = True

    def _on_disconnect(
        self,
        _client: Client,
        device: _Device,
        _flags: DisconnectFlags,
        _reason: ReasonCode,
        _props: Properties | None,
    ) -> None:
        with self._lock:
            if device.connected:
                self._counts["disconnects"] += 1
            device.connected = device.subscribed = False
        if not self._stop.is_set():
            device.retry_at = time.monotonic() + RECONNECT_DELAY_S

    def _on_message(self, client: Client, device: _Device, message: MQTTMessage) -> None:
        payload = bytes(message.payload)
        if not payload:  # a retained message deleted
            self._count("ignored")
            return
        try:
            desired = DesiredState.FromString(payload)
        except Exception:  # a hollow device survives garbage, as the agent does (it counts and drops)
            self._count("rejected")
            return
        if desired.device_id != device.device_id:
            self._count("rejected")
            return
        if desired.generation <= device.generation:  # the same state again after a reconnect, or a stale one
            self._count("ignored")
            return
        device.generation = desired.generation
        self._serve(device, desired)
        device.reported = reported_for(desired, self._agent, self._failing).SerializeToString()
        info = client.publish(
            f"{self.prefix}/devices/{device.device_id}/reported",
            device.reported,
            qos=1,
            retain=True,
            properties=self._reported_props,
        )
        now = time.time()
        with self._lock:
            self._counts["received"] += 1
            if info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
                self._counts["sent"] += 1
            if not self._first_desired:
                self._first_desired = now
            self._last_desired = now

    def _count(self, name: str) -> None:
        with self._lock:
            self._counts[name] += 1

    # Telemetry, on the fleet's thread.

    def _serve(self, device: _Device, desired: DesiredState) -> None:
        """Serve what `desired` names from now on: a version that fails to load leaves the one served before."""
        self._close_segment(device, time.monotonic())
        before = {name: v for (name, v), role in device.serving.items() if role == MODEL_ROLE_ACTIVE}
        serving: dict[ModelKey, ModelRole.ValueType] = {}
        device.shadow_rates = {}
        for m in desired.models:
            if m.version in self._failing:
                if m.role == MODEL_ROLE_ACTIVE and m.name in before:
                    serving[(m.name, before[m.name])] = MODEL_ROLE_ACTIVE
                continue
            serving[(m.name, m.version)] = m.role
            if m.role == MODEL_ROLE_SHADOW:
                device.shadow_rates[(m.name, m.version)] = m.shadow_sample_rate
        device.serving = serving
        with self._lock:
            device.ran.update(key for key, role in serving.items() if role == MODEL_ROLE_ACTIVE)

    @staticmethod
    def _close_segment(device: _Device, now: float) -> None:
        seconds = max(0.0, now - device.segment_at)
        device.segment_at = now
        for key, role in device.serving.items():
            used = device.usage.setdefault(key, [0.0, 0.0])
            used[0 if role == MODEL_ROLE_ACTIVE else 1] += seconds

    def _publish_telemetry_due(self, now: float) -> None:
        due = self._telemetry_due
        interval = self._telemetry_s
        while due and due[0].next_telemetry_at <= now and interval is not None:
            device = due.popleft()
            device.next_telemetry_at += interval
            if device.next_telemetry_at <= now:  # the loop fell behind: no burst to catch up
                device.next_telemetry_at = now + interval
            due.append(device)
            if not device.connected:  # held: the next message covers the longer window
                continue
            info = device.client.publish(
                f"{self.prefix}/devices/{device.device_id}/telemetry",
                self._telemetry(device, now).SerializeToString(),
                qos=1,
                properties=self._telemetry_props,
            )
            if info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
                self._count("telemetry")

    def _telemetry(self, device: _Device, now: float) -> Telemetry:
        """The device's window since its last message (and a new window begun)."""
        self._close_segment(device, now)
        b = self._behaviour
        models = []
        for (name, version), (active_s, shadow_s) in sorted(device.usage.items()):
            kind = b.kind(version)
            factor = b.slow_factor if kind == "slow" else 1.0
            compared = round(b.requests_per_s * shadow_s * device.shadow_rates.get((name, version), 0.0))
            requests = round(b.requests_per_s * active_s) + compared  # a SHADOW version's runs are its requests
            if not requests:
                continue
            role = device.serving.get((name, version), MODEL_ROLE_ACTIVE if active_s else MODEL_ROLE_SHADOW)
            models.append(
                ModelVersionTelemetry(
                    name=name,
                    version=version,
                    role=role,
                    requests=requests,
                    errors=round(requests * b.error_share) if kind == "errors" else 0,
                    inferences=requests,
                    latency=LatencySummary(
                        p50_ms=b.p50_ms * factor, p95_ms=b.p95_ms * factor, p99_ms=b.p99_ms * factor
                    ),
                    mean_batch_size=1.0,
                    shadow_compared=compared,
                    shadow_agreed=round(compared * b.agree_share) if kind == "disagree" else compared,
                    cpu_seconds=requests * b.cpu_s_per_request * factor,
                )
            )
        window_s = max(0.0, now - device.window_at)
        device.usage = {}
        device.window_at = now
        device.seq += 1
        return Telemetry(
            device_id=device.device_id,
            timestamp_ms=time.time_ns() // 1_000_000,
            window_s=window_s,
            models=models,
            seq=device.seq,
            agent_start_ms=self._started_ms,
        )


class HollowProcess:
    """A hollow fleet in `shards` child processes (`python -m bench.hollow`), split evenly by device id.

    Each child prints one JSON line when its devices are all subscribed, then answers `stats` on its stdin
    with a line of HollowStats JSON and `ran` with one of HollowFleet.ran_active; closing its stdin makes it
    disconnect and exit.
    """

    def __init__(
        self,
        host: str,
        port: int,
        ids: Sequence[str],
        *,
        topic_prefix: str = "edgefleet/v1",
        shards: int = 1,
        presence: bool = True,
        timeout: float = 120.0,
        telemetry_s: float | None = None,
        behaviour: Behaviour | None = None,
    ) -> None:
        if shards < 1 or shards > len(ids):
            raise ValueError(f"shards must be within 1..{len(ids)} (one device at least per shard)")
        behaviour = behaviour or Behaviour()
        self.pids: list[int] = []
        self._procs: list[subprocess.Popen[str]] = []
        try:
            for k in range(shards):
                part = ids[k::shards]
                argv = [sys.executable, "-m", "bench.hollow", "--host", host, "--port", str(port)]
                argv += ["--prefix", topic_prefix, "--timeout", str(timeout)]
                if not presence:
                    argv.append("--no-presence")
                if telemetry_s is not None:
                    argv += ["--telemetry-s", str(telemetry_s), "--requests-per-s", str(behaviour.requests_per_s)]
                for version, kind in sorted(behaviour.bad.items()):
                    argv += ["--bad", f"{version}={kind}"]
                proc = subprocess.Popen(
                    argv,
                    cwd=Path(__file__).resolve().parents[1],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                )
                assert proc.stdin is not None
                proc.stdin.write("\n".join(part) + "\n\n")  # the ids, then an empty line
                proc.stdin.flush()
                self._procs.append(proc)
                self.pids.append(proc.pid)
            for proc in self._procs:
                self._line(proc)  # {"ready": ...}
        except BaseException:
            self.close()
            raise

    def _line(self, proc: subprocess.Popen[str]) -> dict[str, Any]:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line:
            code = proc.wait(10)
            raise RuntimeError(f"a hollow shard (pid {proc.pid}) exited with {code} (its stderr says why)")
        data: dict[str, Any] = json.loads(line)
        if "error" in data:
            raise RuntimeError(f"hollow shard (pid {proc.pid}): {data['error']}")
        return data

    def stats(self) -> HollowStats:
        for proc in self._procs:
            assert proc.stdin is not None
            proc.stdin.write("stats\n")
            proc.stdin.flush()
        return HollowStats.total([HollowStats(**self._line(proc)) for proc in self._procs])

    def ran_active(self) -> dict[str, list[ModelKey]]:
        """Per device, every (model, version) it ever served ACTIVE (every shard's devices)."""
        for proc in self._procs:
            assert proc.stdin is not None
            proc.stdin.write("ran\n")
            proc.stdin.flush()
        found: dict[str, list[ModelKey]] = {}
        for proc in self._procs:
            for device_id, keys in self._line(proc).items():
                found[device_id] = [(name, int(version)) for name, version in keys]
        return found

    def close(self, timeout: float = 30.0) -> None:
        for proc in self._procs:
            if proc.stdin is not None and not proc.stdin.closed:
                with contextlib.suppress(BrokenPipeError):
                    proc.stdin.close()
        for proc in self._procs:
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
            if proc.stdout is not None:
                proc.stdout.close()

    def __enter__(self) -> HollowProcess:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def _child(argv: Sequence[str] | None = None) -> int:
    """One shard: device ids on stdin (one a line, then an empty line); see HollowProcess."""
    parser = argparse.ArgumentParser(prog="python -m bench.hollow", description="a shard of hollow devices")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--prefix", default="edgefleet/v1")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds for every device to subscribe")
    parser.add_argument("--no-presence", action="store_true", help="no status online / last will")
    parser.add_argument("--telemetry-s", type=float, default=None, help="publish telemetry this often (default: never)")
    parser.add_argument("--requests-per-s", type=float, default=Behaviour.requests_per_s, help="per served model")
    parser.add_argument(
        "--bad", action="append", default=[], metavar="VERSION=KIND", help=f"a bad version: KIND one of {BAD_KINDS}"
    )
    args = parser.parse_args(argv)
    try:
        behaviour = Behaviour(bad=dict(parse_bad(b) for b in args.bad), requests_per_s=args.requests_per_s)
    except ValueError as exc:
        parser.error(str(exc))
    ids = []
    for line in sys.stdin:
        if not line.strip():
            break
        ids.append(line.strip())
    raise_fd_limit(len(ids) + 256)
    fleet = HollowFleet(
        args.host,
        args.port,
        ids,
        topic_prefix=args.prefix,
        presence=not args.no_presence,
        telemetry_s=args.telemetry_s,
        behaviour=behaviour,
    )
    fleet.start()
    try:
        try:
            stats = fleet.wait_subscribed(args.timeout)
        except RuntimeError as exc:
            print(json.dumps({"error": str(exc)}), flush=True)
            return 1
        print(json.dumps({"ready": stats.devices, "pid": os.getpid()}), flush=True)
        for line in sys.stdin:
            if line.strip() == "stats":
                print(json.dumps(fleet.stats().as_dict()), flush=True)
            elif line.strip() == "ran":
                print(json.dumps(fleet.ran_active()), flush=True)
    finally:
        fleet.close()
    return 0


if __name__ == "__main__":
    sys.exit(_child())
