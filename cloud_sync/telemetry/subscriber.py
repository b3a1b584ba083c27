"""cloud-sync's MQTT subscriber: device telemetry and presence, through shared subscriptions, into the store.

Not the checks themselves (validation.py) nor the SQL (cloud_sync/store/telemetry.py).
"""

from __future__ import annotations

import contextlib
import queue
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import structlog
from paho.mqtt.client import Client, MQTTMessage
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from cloud_sync.config import MqttSection
from cloud_sync.errors import InvalidArgument, StoreUnavailable
from cloud_sync.mqtt_client import SharedSubscription, subscription_options
from cloud_sync.store.database import now_ms
from cloud_sync.store.telemetry import StatusReceived, TelemetryReceived, TelemetryStore
from cloud_sync.telemetry.validation import (
    DEFAULT_MAX_PAYLOAD_BYTES,
    REASONS,
    Rejected,
    check_status,
    check_telemetry,
    parse_topic,
    window_end_ms,
)

__all__ = ["SubscriberStats", "TelemetrySubscriber"]

log = structlog.get_logger(__name__)

Received = TelemetryReceived | StatusReceived


class _Item(NamedTuple):
    connection: int  # which connection delivered it: a PUBACK only makes sense on that one
    mid: int
    qos: int
    record: Received | None  # None: rejected, only to acknowledge (in order)


@dataclass(frozen=True)
class SubscriberStats:
    """Counters of this subscriber since it started (a snapshot)."""

    received: int
    handed_off: int  # accepted and queued for the writer (valid, or rejected QoS 1 ones to acknowledge)
    stored: Mapping[str, int]  # "telemetry" / "status" -> messages stored
    rejected: Mapping[str, int]  # reason -> messages ignored
    batches: int
    queued: int  # waiting for the writer now
    connected: bool
    connects: int  # successful connections (a broker that cut this replica off shows as more than one)
    clock_skewed: int  # telemetry stamped too far ahead of the cloud's clock (placed at its receive time)
    store_retries: int  # batches retried because the database was unavailable


class _Registered:
    """Registered device ids, read from the store: refreshed every `ttl_s`, and on a miss at most once per
    `miss_refresh_s` (so a flood of unknown ids costs at most that many queries)."""

    def __init__(self, store: TelemetryStore, ttl_s: float, miss_refresh_s: float = 1.0) -> None:
        self._store = store
        self._ttl_s = ttl_s
        self._miss_refresh_s = miss_refresh_s
        self._ids: frozenset[str] = frozenset()
        self._loaded_at = -float("inf")

    def __contains__(self, device_id: str) -> bool:
        age = time.monotonic() - self._loaded_at
        if age > self._ttl_s or (device_id not in self._ids and age > self._miss_refresh_s):
            self._ids = self._store.registered_devices()
            self._loaded_at = time.monotonic()
        return device_id in self._ids


class TelemetrySubscriber(SharedSubscription[_Item]):
    """Subscribes `$share/{group}/{prefix}/devices/+/telemetry` and `.../status`; stores what is valid.

    Two threads: paho's network thread decodes and validates each message and hands it to a bounded queue;
    one writer thread stores the queue's contents in batches (one transaction each) and only then
    acknowledges the QoS 1 messages (manual PUBACK). So SQL never blocks paho's thread, a message the
    database has not committed is never acknowledged (the broker redelivers it after a crash), and the
    broker, not this process, holds the backlog while the database is slow: the MQTT 5 Receive Maximum caps
    the messages in flight to us, the rest waits in this session's queue on the broker
    (deploy/mosquitto/edgefleet.conf sizes it).

    `client_id` must be stable across restarts of one replica and distinct between replicas: the broker
    keeps this replica's session (and queues its share of messages) for `session_expiry_s` while it is
    away. Mosquitto keeps routing a share of messages to a disconnected member of the group, so a replica
    that leaves for good should `close(end_session=True)`.
    """

    def __init__(
        self,
        store: TelemetryStore,
        url: str,
        *,
        prefix: str = "edgefleet/v1",
        group: str = "cloud-sync",
        client_id: str | None = None,
        username: str | None = None,
        password: str | None = None,
        keepalive_s: int = 30,
        session_expiry_s: int = 300,
        receive_maximum: int = 1000,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
        batch_max: int = 500,
        gather_s: float = 0.02,
        registry_ttl_s: float = 30.0,
        # Short: after a broker restart Mosquitto 2.0 drops device messages until this replica subscribes again.
        reconnect_delay: tuple[int, int] = (1, 5),
    ) -> None:
        self.prefix = prefix
        self.group = group
        self.topics = [f"$share/{group}/{prefix}/devices/+/{kind}" for kind in ("telemetry", "status")]
        super().__init__(
            url,
            client_id=client_id or f"cloud-sync-{socket.gethostname()}",
            topics=self.topics,
            events="telemetry",
            writer="telemetry-writer",
            username=username,
            password=password,
            keepalive_s=keepalive_s,
            session_expiry_s=session_expiry_s,
            receive_maximum=receive_maximum,
            batch_max=batch_max,
            gather_s=gather_s,
            reconnect_delay=reconnect_delay,
        )
        if not 1 <= receive_maximum <= 65535:
            raise InvalidArgument("receive_maximum must be within 1..65535 (MQTT 5)")
        self._store = store
        self._max_payload = max_payload_bytes
        self._registered = _Registered(store, registry_ttl_s)
        self._received = 0
        self._handed_off = 0
        self._stored = {"telemetry": 0, "status": 0}
        self._rejected = dict.fromkeys(REASONS, 0)
        self._clock_skewed = 0

    @classmethod
    def from_config(cls, mqtt: MqttSection, store: TelemetryStore, **options: Any) -> TelemetrySubscriber:
        """The subscriber cloud-sync's [mqtt] section describes (the password read from its file)."""
        return cls(store, mqtt.url, **subscription_options(mqtt), **options)

    # -- lifecycle ----------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the writer and paho's thread (which connects, and reconnects with backoff). Returns at once."""
        if self._started:
            raise RuntimeError("TelemetrySubscriber.start() called twice")
        self._started = True
        self._writer.start()
        self._connect()

    def close(self, timeout: float = 10.0, *, end_session: bool = False) -> None:
        """Store and acknowledge what is queued (within `timeout`), then disconnect.

        The broker keeps the session for session_expiry_s unless `end_session`; messages not acknowledged
        are delivered again on the next connect.
        """
        if not self._started or self._stopping.is_set():
            return
        deadline = time.monotonic() + timeout
        self._stopping.set()
        with contextlib.suppress(queue.Full):  # wakes a writer waiting on an empty queue (a full one is busy)
            self._queue.put_nowait(None)
        self._writer.join(max(0.0, deadline - time.monotonic()))
        self._closing.set()  # past the timeout: ends a retry loop still waiting on the database
        self._writer.join(max(0.0, deadline - time.monotonic()))
        props = None
        if end_session:
            props = Properties(PacketTypes.DISCONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = 0
        self._client.disconnect(properties=props)
        self._client.loop_stop()
        log.info("telemetry.subscriber_closed", client_id=self.client_id, end_session=end_session)

    def stats(self) -> SubscriberStats:
        with self._lock:
            return SubscriberStats(
                received=self._received,
                handed_off=self._handed_off,
                stored=dict(self._stored),
                rejected=dict(self._rejected),
                batches=self._batches,
                queued=self._queue.qsize(),
                connected=self._connected,
                connects=self._connection,
                clock_skewed=self._clock_skewed,
                store_retries=self._store_retries,
            )

    # -- paho's thread: decode, validate, hand off ------------------------------------------------------------

    def _on_message(self, _client: Client, _userdata: Any, message: MQTTMessage) -> None:
        handed_off = self._hand_off(message)
        with self._lock:
            self._received += 1
            self._handed_off += handed_off

    def _hand_off(self, message: MQTTMessage) -> bool:
        connection = self._connection  # an int read: paho's thread is the only writer
        record: Received | None = None
        try:
            record = self._decode(message)
        except Rejected as exc:
            self._reject(exc.reason, message.topic, exc.detail)
        if record is None and message.qos == 0:
            return False
        item = _Item(connection, message.mid, message.qos, record)
        if message.qos == 0:
            # QoS 0 is shed when the writer is behind: the broker would not have kept it anyway.
            if self._queue.qsize() >= self._receive_maximum:
                self._reject("overloaded", message.topic, "hand-off queue full")
                return False
            self._queue.put_nowait(item)
        else:
            self._put_acknowledgeable(item)
        return True

    def _put_acknowledgeable(self, item: _Item) -> None:
        """Queue a QoS 1 message; never drop it (it is not acknowledged until stored).

        Receive Maximum keeps these within the queue, but Mosquitto 2.0.11 sends past it after batched acks
        (measured: 1486 unacknowledged with a Receive Maximum of 100; mosquitto issue #2301). Then this
        blocks paho's thread until the writer frees room: paho stops reading, TCP pushes back, and the broker
        keeps the rest queued. Dropping instead would strand the message unacknowledged until a reconnect.
        """
        try:
            self._queue.put_nowait(item)
            return
        except queue.Full:
            pass
        if self._first_in_a_minute("backpressure"):
            log.warning("telemetry.backpressure", queued=self._queue.qsize(), receive_maximum=self._receive_maximum)
        self._wait_to_queue(item)

    def _decode(self, message: MQTTMessage) -> Received:
        # The device id comes from the topic, trusted only because the broker's ACL (acl.py) lets a device
        # publish under its own devices/{id}/ and nowhere else.
        device_id, kind = parse_topic(message.topic, self.prefix)
        payload = bytes(message.payload)
        received = now_ms()
        if kind == "status":
            return StatusReceived(device_id, check_status(payload), received, retained=bool(message.retain))
        content_type = getattr(message.properties, "ContentType", None) if message.properties else None
        telemetry = check_telemetry(device_id, payload, max_bytes=self._max_payload, content_type=content_type)
        if window_end_ms(telemetry.timestamp_ms, received) != telemetry.timestamp_ms:
            with self._lock:
                self._clock_skewed += 1
            if self._first_in_a_minute("clock_skew"):
                log.warning(
                    "telemetry.clock_skew",
                    device_id=device_id,
                    ahead_ms=telemetry.timestamp_ms - received,
                    hint="the device's clock is wrong: its windows are placed when they arrive",
                )
        return TelemetryReceived(device_id, telemetry, payload, received)

    def _reject(self, reason: str, topic: str, detail: str) -> None:
        with self._lock:
            self._rejected[reason] = self._rejected.get(reason, 0) + 1
        # One log line per reason per minute: a misbehaving device must not flood the logs.
        if self._first_in_a_minute(reason):
            log.warning("telemetry.rejected", reason=reason, topic=topic[:200], detail=detail[:200])

    # -- the writer thread ----------------------------------------------------------------------------------

    def _write_loop(self) -> None:
        while not self._closing.is_set():
            batch = self._next_batch()
            if batch and not self._store_batch(batch):
                return  # closing while the database is down: unacknowledged, the broker keeps them
            if self._stopping.is_set() and self._queue.empty():
                return

    def _store_batch(self, batch: list[_Item]) -> bool:
        """Store a batch (retrying while the database is unavailable), then acknowledge it; False if closing."""

        def attempt() -> list[str]:
            records, unregistered = self._registered_only(batch)
            self._write(records)
            return unregistered

        unregistered = self._until_stored(attempt)
        if unregistered is None:
            return False
        for device_id in unregistered:
            self._reject("unregistered", device_id, "no registered device has this id")
        self._acknowledge(batch)
        return True

    def _registered_only(self, batch: list[_Item]) -> tuple[list[Received], list[str]]:
        """(records of registered devices, ids of the unregistered ones) in `batch`."""
        records, unregistered = [], []
        for item in batch:
            record = item.record
            if record is None:
                continue
            if record.device_id in self._registered:
                records.append(record)
            else:
                unregistered.append(record.device_id)
        return records, unregistered

    def _write(self, records: list[Received]) -> None:
        try:
            self._store.write(records)
            stored = records
        except StoreUnavailable:
            raise
        except Exception as exc:
            # Not an outage: something in the batch the database refuses. Store one by one; drop what fails.
            log.error("telemetry.batch_failed", error=f"{type(exc).__name__}: {exc}", messages=len(records))
            stored = []
            for record in records:
                try:
                    self._store.write([record])
                    stored.append(record)
                except StoreUnavailable:
                    raise
                except Exception as one:
                    self._reject("store_failed", record.device_id, f"{type(one).__name__}: {one}")
        with self._lock:
            for record in stored:
                self._stored["telemetry" if isinstance(record, TelemetryReceived) else "status"] += 1
