"""The control plane over MQTT in the cloud: desired states out (retained), reported states in (shared).

A paho client of its own (`<client_id>-control`) beside the telemetry subscriber. Desired states are published
retained QoS 1 on `{prefix}/devices/{id}/desired` after they are committed; reports arrive on
`$share/{group}/{prefix}/devices/+/reported` and are stored in batches, acknowledged only once stored.
Convergence is driven by stored state, never by one-shot events: a periodic pass republishes the desired
state of every device whose reported generation stays behind. Not the computation of states (reconciler.py).
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import structlog
from google.protobuf.message import DecodeError
from paho.mqtt.client import Client, ConnectFlags, DisconnectFlags, MQTTMessage
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from cloud_sync.config import MqttSection
from cloud_sync.errors import CloudSyncError, InvalidArgument, NotFound, StoreUnavailable
from cloud_sync.store.control import MAX_STATE_BYTES, ControlStore, StaleReport, StoredState
from cloud_sync.store.database import now_ms
from cloud_sync.store.devices import check_device_id
from edgefleet.addresses import AddressError, BrokerAddress, parse_broker_url
from edgefleet.proto.edgefleet.v1.state_pb2 import DesiredState, ReportedState

__all__ = ["DESIRED_CONTENT_TYPE", "ControlLinkStats", "MqttControl", "behind_devices"]

log = structlog.get_logger(__name__)

DESIRED_CONTENT_TYPE = DesiredState.DESCRIPTOR.full_name
# A device whose reported generation stays behind this long gets its desired state again (a lost message, a
# broker restarted without persistence); then again after twice as long, up to REPUBLISH_MAX_S.
REPUBLISH_AFTER_S = 30.0
REPUBLISH_MAX_S = 600.0
CHECK_EVERY_S = 10.0
_REASONS = ("invalid_topic", "malformed", "refused", "stale", "unknown_device")


class _Report(NamedTuple):
    connection: int  # which connection delivered it: a PUBACK only makes sense on that one
    mid: int
    qos: int
    device_id: str
    state: ReportedState


@dataclass(frozen=True)
class ControlLinkStats:
    """Counters since start (a snapshot)."""

    connected: bool
    connects: int
    published: int  # desired states published (new ones and republished ones)
    republished: int  # of which sent again to devices that stayed behind, or after a session was lost
    reports_stored: int
    reports_dropped: Mapping[str, int]  # reason -> reports not stored
    batches: int


def behind_devices(
    generations: Mapping[str, StoredState],
    last_sent: Mapping[str, tuple[int, float, float]],
    now: float,
    now_wall_ms: int,
    after_s: float = REPUBLISH_AFTER_S,
) -> list[str]:
    """Devices to send their desired state again: reported generation below the desired one for `after_s`.

    `last_sent[device] = (generation, monotonic time sent, wait before sending again)` of this process's
    sends: a device is not sent the same generation again before that wait. The issue time is the store's
    (wall clock), so a state another replica issued is judged the same way.
    """
    due = []
    for device_id, stored in generations.items():
        if stored.reported_generation is not None and stored.reported_generation >= stored.desired_generation:
            continue
        if now_wall_ms - stored.issued_at_ms < after_s * 1000:
            continue
        sent = last_sent.get(device_id)
        if sent is None or sent[0] != stored.desired_generation or now - sent[1] >= sent[2]:
            due.append(device_id)
    return sorted(due)


def _parse_reported_topic(topic: str, prefix: str) -> str:
    head = f"{prefix}/devices/"
    device_id, _, kind = topic.removeprefix(head).partition("/")
    if not topic.startswith(head) or kind != "reported":
        raise InvalidArgument(f"not a reported-state topic: {topic[:200]!r}")
    return check_device_id(device_id)


class MqttControl:
    """Publishes desired states and stores reported ones; threads: paho's, a report writer, a republisher.

    `client_id` must be stable across restarts of one replica and distinct between replicas (the broker keeps
    this replica's session, and the reports queued for it, while it is away).
    """

    def __init__(
        self,
        control: ControlStore,
        url: str,
        *,
        prefix: str = "edgefleet/v1",
        group: str = "cloud-sync",
        client_id: str = "cloud-sync-control",
        username: str | None = None,
        password: str | None = None,
        keepalive_s: int = 30,
        session_expiry_s: int = 300,
        receive_maximum: int = 1000,
        batch_max: int = 500,
        gather_s: float = 0.02,
        check_every_s: float = CHECK_EVERY_S,
        republish_after_s: float = REPUBLISH_AFTER_S,
        reconnect_delay: tuple[int, int] = (1, 5),
    ) -> None:
        try:
            self.address: BrokerAddress = parse_broker_url(url)
        except AddressError as exc:
            raise InvalidArgument(f"mqtt.url: {exc}") from exc
        self.prefix = prefix
        self.topic = f"$share/{group}/{prefix}/devices/+/reported"
        self.client_id = client_id
        self._control = control
        self._batch_max = batch_max
        self._gather_s = gather_s
        self._check_every_s = check_every_s
        self._republish_after_s = republish_after_s
        self._session_expiry_s = session_expiry_s
        self._receive_maximum = receive_maximum
        self._keepalive = keepalive_s
        self._reports: queue.Queue[_Report | None] = queue.Queue(maxsize=2 * receive_maximum)
        self._lock = threading.Lock()
        self._connection = 0
        self._connected = False
        self._subscribed = False
        self._published = self._republished = self._stored = self._batches = 0
        self._dropped = dict.fromkeys(_REASONS, 0)
        self._last_sent: dict[str, tuple[int, float, float]] = {}
        self._last_logged: dict[str, float] = {}
        self._stopping = threading.Event()
        self._republish_all = threading.Event()
        self._started = False
        self._props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        self._props.ContentType = DESIRED_CONTENT_TYPE

        client = Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=MQTTProtocolVersion.MQTTv5,
            manual_ack=True,
        )
        # QoS 1 publishes in flight at once: paho's default of 20 made a fan-out to 10,000 devices wait on
        # 500 round trips of PUBACKs.
        client.max_inflight_messages_set(1000)
        client.max_queued_messages_set(0)
        client.reconnect_delay_set(*reconnect_delay)
        if username:
            client.username_pw_set(username, password)
        if self.address.tls:
            client.tls_set()
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        self._client = client
        self._writer = threading.Thread(target=self._write_loop, name="control-reports", daemon=True)
        self._checker = threading.Thread(target=self._check_loop, name="control-republish", daemon=True)

    @classmethod
    def from_config(cls, mqtt: MqttSection, control: ControlStore, client_id: str, **options: Any) -> MqttControl:
        """The link cloud-sync's [mqtt] section describes (the password read from its file)."""
        password = None
        if mqtt.password_file:
            try:
                password = Path(mqtt.password_file).read_text().strip()
            except OSError as exc:
                raise InvalidArgument(f"mqtt.password_file {mqtt.password_file!r}: {exc.strerror}") from exc
        return cls(
            control,
            mqtt.url,
            prefix=mqtt.topic_prefix,
            group=mqtt.share_group,
            client_id=client_id,
            username=mqtt.username or None,
            password=password,
            **options,
        )

    # -- lifecycle ----------------------------------------------------------------------------------------

    def start(self) -> None:
        """Connect (and reconnect with backoff) in the background; publish every new desired state."""
        if self._started:
            raise RuntimeError("MqttControl.start() called twice")
        self._started = True
        self._control.on_desired_state(self.publish)
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = self._session_expiry_s
        props.ReceiveMaximum = self._receive_maximum
        self._writer.start()
        self._checker.start()
        self._client.connect_async(
            self.address.host, self.address.port, self._keepalive, clean_start=False, properties=props
        )
        self._client.loop_start()

    def close(self, timeout: float = 10.0) -> None:
        """Store and acknowledge the reports queued (within `timeout`), then disconnect."""
        if not self._started or self._stopping.is_set():
            return
        deadline = time.monotonic() + timeout
        self._stopping.set()
        self._republish_all.set()  # wakes the republisher, which sees it is stopping
        with contextlib.suppress(queue.Full):
            self._reports.put(None, timeout=max(0.0, deadline - time.monotonic()))
        self._writer.join(max(0.0, deadline - time.monotonic()))
        self._checker.join(max(0.0, deadline - time.monotonic()))
        self._client.disconnect()
        self._client.loop_stop()
        log.info("control_mqtt.closed", client_id=self.client_id)

    @property
    def ready(self) -> bool:
        """Connected and subscribed to the reports."""
        with self._lock:
            return self._connected and self._subscribed

    def stats(self) -> ControlLinkStats:
        with self._lock:
            return ControlLinkStats(
                connected=self._connected,
                connects=self._connection,
                published=self._published,
                republished=self._republished,
                reports_stored=self._stored,
                reports_dropped=dict(self._dropped),
                batches=self._batches,
            )

    # -- desired states out --------------------------------------------------------------------------------

    def topic_for(self, device_id: str) -> str:
        return f"{self.prefix}/devices/{device_id}/desired"

    def publish(self, state: DesiredState, *, again: bool = False) -> None:
        """Publish `state` retained QoS 1 on its device's topic (thread-safe; paho sends it on its thread)."""
        self._client.publish(
            self.topic_for(state.device_id), state.SerializeToString(), qos=1, retain=True, properties=self._props
        )
        with self._lock:
            previous = self._last_sent.get(state.device_id)
            wait = self._republish_after_s
            if again and previous is not None and previous[0] == state.generation:
                wait = min(previous[2] * 2, REPUBLISH_MAX_S)
            self._last_sent[state.device_id] = (state.generation, time.monotonic(), wait)
            self._published += 1
            self._republished += again

    def republish(self, device_ids: list[str] | None = None) -> int:
        """Publish the current desired state of `device_ids` (None: of every device) again; how many."""
        states = self._control.desired_many(device_ids)
        for state in states.values():
            self.publish(state, again=True)
        return len(states)

    def _check_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                if self._republish_all.is_set():
                    self._republish_all.clear()
                    sent = self.republish()
                    log.info("control_mqtt.republished_all", devices=sent, reason="session lost")
                elif self.ready:
                    self._republish_behind()
            except StoreUnavailable as exc:
                log.warning("control_mqtt.store_unavailable", error=exc.message)
            except Exception as exc:  # a bug: logged, and the next pass tries again
                log.error("control_mqtt.check_failed", error=f"{type(exc).__name__}: {exc}")
            # Woken early by a lost session (the republish-all must not wait a whole interval).
            self._republish_all.wait(self._check_every_s)
            if self._stopping.is_set():
                return

    def _republish_behind(self) -> None:
        with self._lock:
            last_sent = dict(self._last_sent)
        generations = self._control.generations()
        due = behind_devices(generations, last_sent, time.monotonic(), now_ms(), self._republish_after_s)
        if due:
            sent = self.republish(due)
            log.info("control_mqtt.republished_behind", devices=sent)

    # -- paho's thread ---------------------------------------------------------------------------------------

    def _on_connect(
        self, client: Client, _userdata: Any, flags: ConnectFlags, reason: ReasonCode, _props: Properties | None
    ) -> None:
        if reason.is_failure:
            log.warning("control_mqtt.connect_refused", broker=self.address.host, reason=str(reason))
            return
        with self._lock:
            self._connection += 1
            self._connected = True
            self._subscribed = False
        client.subscribe([(self.topic, 1)])
        if not flags.session_present:
            # A broker without our session may have lost its retained messages too (restarted without
            # persistence): every current desired state is published again, off paho's thread.
            self._republish_all.set()
        log.info("control_mqtt.connected", broker=self.address.host, session_present=flags.session_present)

    def _on_subscribe(
        self, _c: Client, _u: Any, _mid: int, reasons: list[ReasonCode], _props: Properties | None
    ) -> None:
        failed = [str(r) for r in reasons if r.is_failure]
        if failed:
            log.error("control_mqtt.subscribe_refused", topic=self.topic, reasons=failed)
            return
        with self._lock:
            self._subscribed = True

    def _on_disconnect(
        self, _c: Client, _u: Any, _flags: DisconnectFlags, reason: ReasonCode, _props: Properties | None
    ) -> None:
        with self._lock:
            was, self._connected, self._subscribed = self._connected, False, False
        if was and not self._stopping.is_set():
            log.warning("control_mqtt.disconnected", broker=self.address.host, reason=str(reason))

    def _on_message(self, client: Client, _userdata: Any, message: MQTTMessage) -> None:
        try:
            device_id = _parse_reported_topic(message.topic, self.prefix)
        except InvalidArgument as exc:
            self._drop("invalid_topic", exc.message, client, message)
            return
        payload = bytes(message.payload)
        try:
            if len(payload) > MAX_STATE_BYTES:
                raise DecodeError(f"{len(payload)} bytes, past the {MAX_STATE_BYTES}-byte limit")
            state = ReportedState.FromString(payload)
        except DecodeError as exc:
            self._drop("malformed", f"{device_id}: {exc}", client, message)
            return
        # Blocks paho's thread when the writer is behind: the broker keeps the rest (see telemetry/subscriber.py).
        report = _Report(self._connection, message.mid, message.qos, device_id, state)
        while not self._stopping.is_set():
            try:
                self._reports.put(report, timeout=0.5)
                return
            except queue.Full:
                continue

    def _drop(self, reason: str, detail: str, client: Client | None = None, message: MQTTMessage | None = None) -> None:
        if client is not None and message is not None and message.qos > 0:
            client.ack(message.mid, message.qos)  # never redelivered: it will not get any better
        with self._lock:
            self._dropped[reason] += 1
            now = time.monotonic()
            if now - self._last_logged.get(reason, -float("inf")) < 60:
                return
            self._last_logged[reason] = now
        log.warning("control_mqtt.report_dropped", reason=reason, detail=detail[:300])

    # -- the report writer -------------------------------------------------------------------------------------

    def _write_loop(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            if batch and not self._store(batch):
                return

    def _next_batch(self) -> list[_Report] | None:
        first = self._reports.get()
        if first is None:
            return None
        if self._gather_s > 0 and self._reports.qsize() < self._batch_max:
            self._stopping.wait(self._gather_s)
        batch = [first]
        while len(batch) < self._batch_max:
            try:
                more = self._reports.get_nowait()
            except queue.Empty:
                break
            if more is None:
                self._reports.put_nowait(None)  # seen again by the next take: this batch is stored first
                break
            batch.append(more)
        return batch

    def _store(self, batch: list[_Report]) -> bool:
        delay = 0.1
        while True:
            try:
                outcome = self._control.report_many([(r.device_id, r.state) for r in batch])
                break
            except StoreUnavailable as exc:
                log.warning("control_mqtt.store_unavailable", error=exc.message, retry_in_s=delay)
                if self._stopping.wait(delay):
                    return False
                delay = min(delay * 2, 5.0)
        for report, error in zip(batch, outcome, strict=True):
            if error is not None:
                self._drop(_reason(error), f"{report.device_id}: {error.message}")
        with self._lock:
            self._batches += 1
            self._stored += sum(1 for e in outcome if e is None)
            connection = self._connection
        for report in batch:
            if report.qos > 0 and report.connection == connection:
                self._client.ack(report.mid, report.qos)
        return True


def _reason(error: CloudSyncError) -> str:
    if isinstance(error, StaleReport):
        return "stale"
    if isinstance(error, NotFound):
        return "unknown_device"
    return "refused"
