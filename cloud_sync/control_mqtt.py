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
from typing import Any, NamedTuple

import structlog
from google.protobuf.message import DecodeError
from paho.mqtt.client import Client, MQTTMessage
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from cloud_sync.config import MqttSection
from cloud_sync.errors import CloudSyncError, InvalidArgument, NotFound, StoreUnavailable
from cloud_sync.mqtt_client import SharedSubscription, subscription_options
from cloud_sync.store.control import MAX_STATE_BYTES, ControlStore, StaleReport, StoredState
from cloud_sync.store.database import now_ms
from cloud_sync.store.devices import check_device_id
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
    publish_refused: int  # publishes the broker answered with a failure (not authorised: its ACL)
    unanswered: int  # publishes the broker has not answered yet (QoS 1: it holds a message once it answers)
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


class MqttControl(SharedSubscription[_Report]):
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
        self.prefix = prefix
        self.topic = f"$share/{group}/{prefix}/devices/+/reported"
        super().__init__(
            url,
            client_id=client_id,
            topics=[self.topic],
            events="control_mqtt",
            writer="control-reports",
            username=username,
            password=password,
            keepalive_s=keepalive_s,
            session_expiry_s=session_expiry_s,
            receive_maximum=receive_maximum,
            batch_max=batch_max,
            gather_s=gather_s,
            reconnect_delay=reconnect_delay,
        )
        self._control = control
        self._check_every_s = check_every_s
        self._republish_after_s = republish_after_s
        self._published = self._republished = self._stored = self._refused = 0
        self._in_flight: dict[int, str] = {}  # mid -> device id, until the broker answers
        self._answered: dict[int, bool] = {}  # answers that came before their publish() returned
        self._dropped = dict.fromkeys(_REASONS, 0)
        self._last_sent: dict[str, tuple[int, float, float]] = {}
        # device -> received_at_ms of its last report, once read and found converged (the republisher's thread)
        self._settled: dict[str, int] = {}
        self._republish_all = threading.Event()
        self._props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        self._props.ContentType = DESIRED_CONTENT_TYPE
        # QoS 1 publishes in flight at once: paho's default of 20 made a fan-out to 10,000 devices wait on
        # 500 round trips of PUBACKs.
        self._client.max_inflight_messages_set(1000)
        self._client.max_queued_messages_set(0)
        self._client.on_publish = self._on_publish
        self._checker = threading.Thread(target=self._check_loop, name="control-republish", daemon=True)

    @classmethod
    def from_config(cls, mqtt: MqttSection, control: ControlStore, client_id: str, **options: Any) -> MqttControl:
        """The link cloud-sync's [mqtt] section describes (the password read from its file)."""
        return cls(control, mqtt.url, **subscription_options(mqtt), client_id=client_id, **options)

    # -- lifecycle ----------------------------------------------------------------------------------------

    def start(self) -> None:
        """Connect (and reconnect with backoff) in the background; publish every new desired state."""
        if self._started:
            raise RuntimeError("MqttControl.start() called twice")
        self._started = True
        self._control.on_desired_state(self.publish)
        self._writer.start()
        self._checker.start()
        self._connect()

    def close(self, timeout: float = 10.0) -> None:
        """Store and acknowledge the reports queued (within `timeout`), then disconnect."""
        if not self._started or self._stopping.is_set():
            return
        deadline = time.monotonic() + timeout
        self._stopping.set()
        # No waiting on the database at close: reports not stored yet are not acknowledged, and come again.
        self._closing.set()
        self._republish_all.set()  # wakes the republisher, which sees it is stopping
        with contextlib.suppress(queue.Full):
            self._queue.put(None, timeout=max(0.0, deadline - time.monotonic()))
        self._writer.join(max(0.0, deadline - time.monotonic()))
        self._checker.join(max(0.0, deadline - time.monotonic()))
        self._client.disconnect()
        self._client.loop_stop()
        log.info("control_mqtt.closed", client_id=self.client_id)

    def stats(self) -> ControlLinkStats:
        with self._lock:
            return ControlLinkStats(
                connected=self._connected,
                connects=self._connection,
                published=self._published,
                republished=self._republished,
                publish_refused=self._refused,
                unanswered=len(self._in_flight),
                reports_stored=self._stored,
                reports_dropped=dict(self._dropped),
                batches=self._batches,
            )

    # -- desired states out --------------------------------------------------------------------------------

    def topic_for(self, device_id: str) -> str:
        return f"{self.prefix}/devices/{device_id}/desired"

    def publish(self, state: DesiredState, *, again: bool = False) -> None:
        """Publish `state` retained QoS 1 on its device's topic (thread-safe; paho sends it on its thread)."""
        # Never under self._lock: paho calls on_publish holding its own lock, which publish() takes.
        info = self._client.publish(
            self.topic_for(state.device_id), state.SerializeToString(), qos=1, retain=True, properties=self._props
        )
        with self._lock:
            if self._answered.pop(info.mid, None) is None:  # the broker's answer may come first
                self._in_flight[info.mid] = state.device_id
            previous = self._last_sent.get(state.device_id)
            wait = self._republish_after_s
            if again and previous is not None and previous[0] == state.generation:
                wait = min(previous[2] * 2, REPUBLISH_MAX_S)
            self._last_sent[state.device_id] = (state.generation, time.monotonic(), wait)
            self._published += 1
            self._republished += again

    def _on_publish(
        self, _client: Client, _userdata: Any, mid: int, reason: ReasonCode, _props: Properties | None
    ) -> None:
        """The broker's answer to a desired state (paho's thread). A refusal is the broker's ACL saying
        cloud-sync's user may not write desired states: nothing reaches the devices, so say it loudly."""
        with self._lock:
            device_id = self._in_flight.pop(mid, None)
            if device_id is None:
                self._answered[mid] = True
            if not reason.is_failure:
                return
            self._refused += 1
        if self._first_in_a_minute("publish_refused"):
            log.error(
                "control_mqtt.publish_refused",
                device=device_id,
                reason=str(reason),
                hint="the broker refuses cloud-sync's user to publish on devices/+/desired: grant it (docs/mqtt.md)",
            )

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
        due = sorted({*due, *self._quiet_unconverged(generations, last_sent)})
        if due:
            sent = self.republish(due)
            log.info("control_mqtt.republished_behind", devices=sent)

    def _quiet_unconverged(
        self, generations: Mapping[str, StoredState], last_sent: Mapping[str, tuple[int, float, float]]
    ) -> list[str]:
        """Devices whose last report is of their desired generation but not converged, and no report came for
        `republish_after_s`: their "done" may have been lost on the way (a report dropped between device and
        broker, or queued for us on a broker that restarted). Sent the state again, a device answers with its
        reported state. A report seen converged is not read again until a newer one arrives."""
        now_wall = now_ms()
        quiet = [
            device_id
            for device_id, s in generations.items()
            if s.reported_generation == s.desired_generation
            and s.received_at_ms is not None
            and now_wall - s.received_at_ms >= self._republish_after_s * 1000
            and self._settled.get(device_id) != s.received_at_ms
        ]
        if not quiet:
            return []
        reports = self._control.reported_many(quiet)
        now = time.monotonic()
        due = []
        for device_id in quiet:
            found = reports.get(device_id)
            if found is None or found.state.generation != generations[device_id].desired_generation:
                continue
            if found.state.converged:
                self._settled[device_id] = found.received_at_ms
                continue
            sent = last_sent.get(device_id)
            if sent is None or sent[0] != found.state.generation or now - sent[1] >= sent[2]:
                due.append(device_id)
        return due

    # -- paho's thread ---------------------------------------------------------------------------------------

    def _on_session(self, session_present: bool) -> None:
        if not session_present:
            # A broker without our session may have lost its retained messages too (restarted without
            # persistence): every current desired state is published again, off paho's thread.
            self._republish_all.set()

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
        self._wait_to_queue(_Report(self._connection, message.mid, message.qos, device_id, state))

    def _drop(self, reason: str, detail: str, client: Client | None = None, message: MQTTMessage | None = None) -> None:
        if client is not None and message is not None and message.qos > 0:
            client.ack(message.mid, message.qos)  # never redelivered: it will not get any better
        with self._lock:
            self._dropped[reason] += 1
        if self._first_in_a_minute(reason):
            log.warning("control_mqtt.report_dropped", reason=reason, detail=detail[:300])

    # -- the report writer -------------------------------------------------------------------------------------

    def _write_loop(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            if batch and not self._store(batch):
                return

    def _store(self, batch: list[_Report]) -> bool:
        outcome = self._until_stored(lambda: self._control.report_many([(r.device_id, r.state) for r in batch]))
        if outcome is None:
            return False
        for report, error in zip(batch, outcome, strict=True):
            if error is not None:
                self._drop(_reason(error), f"{report.device_id}: {error.message}")
        with self._lock:
            self._stored += sum(1 for e in outcome if e is None)
        self._acknowledge(batch)
        return True


def _reason(error: CloudSyncError) -> str:
    if isinstance(error, StaleReport):
        return "stale"
    if isinstance(error, NotFound):
        return "unknown_device"
    return "refused"
