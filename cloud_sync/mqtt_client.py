"""cloud-sync's paho MQTT 5 clients: the set-up from the [mqtt] section, and the shared-subscription ingest.

`broker_address`, `read_password` and `mqtt_client` build a client (URL, TLS, username and password file,
reconnect delays) for the telemetry subscriber, the control link and the broker accounts. `SharedSubscription`
is what the two ingest links have in common: a persistent session (clean_start=False, Session Expiry, Receive
Maximum), subscribing again on every connect, the connected/subscribed flags and their log lines, and a writer
thread that takes the hand-off queue in batches, stores each and only then acknowledges its QoS 1 messages
(manual PUBACK). Not what a message means, how a batch is stored, or how a link stops (the subclasses:
cloud_sync/telemetry/subscriber.py, cloud_sync/control_mqtt.py).
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import structlog
from paho.mqtt.client import Client, ConnectFlags, DisconnectFlags, MQTTMessage
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from cloud_sync.config import MqttSection
from cloud_sync.errors import InvalidArgument, StoreUnavailable
from edgefleet.addresses import AddressError, BrokerAddress, parse_broker_url

__all__ = [
    "Delivered",
    "SharedSubscription",
    "broker_address",
    "mqtt_client",
    "read_password",
    "subscription_options",
]

log = structlog.get_logger(__name__)


def broker_address(url: str) -> BrokerAddress:
    """`url` (mqtt[s]://host[:port]) parsed; InvalidArgument naming mqtt.url if it is not one."""
    try:
        return parse_broker_url(url)
    except AddressError as exc:
        raise InvalidArgument(f"mqtt.url: {exc}") from exc


def read_password(path: str, setting: str) -> str | None:
    """The password in the file at `path` (stripped), None without a file; errors name `setting`."""
    if not path:
        return None
    try:
        return Path(path).read_text().strip()
    except OSError as exc:
        raise InvalidArgument(f"{setting} {path!r}: {exc.strerror}") from exc


def mqtt_client(
    address: BrokerAddress,
    client_id: str,
    *,
    username: str | None,
    password: str | None,
    reconnect_delay: tuple[int, int],
    manual_ack: bool = False,
) -> Client:
    """A paho MQTT 5 client for `address` (TLS for mqtts://), not connected and without callbacks."""
    client = Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=MQTTProtocolVersion.MQTTv5,
        manual_ack=manual_ack,
    )
    client.reconnect_delay_set(*reconnect_delay)
    if username:
        client.username_pw_set(username, password)
    if address.tls:
        client.tls_set()
    return client


def subscription_options(mqtt: MqttSection) -> dict[str, Any]:
    """The options of a shared subscription that cloud-sync's [mqtt] section sets (the password read from its file)."""
    return {
        "prefix": mqtt.topic_prefix,
        "group": mqtt.share_group,
        "username": mqtt.username or None,
        "password": read_password(mqtt.password_file, "mqtt.password_file"),
    }


class Delivered(Protocol):
    """A message in the hand-off queue: enough to acknowledge it once it is stored."""

    @property
    def connection(self) -> int: ...  # which connection delivered it: a PUBACK only makes sense on that one

    @property
    def mid(self) -> int: ...

    @property
    def qos(self) -> int: ...


D = TypeVar("D", bound=Delivered)
R = TypeVar("R")


class SharedSubscription(ABC, Generic[D]):
    """A paho client subscribed (QoS 1, persistent session) to `topics`, and a writer thread for what arrives.

    Paho's thread calls the subclass's `_on_message`, which queues a `Delivered` (`_wait_to_queue` blocks it
    while the queue is full: the broker keeps the rest). The subclass's `_write_loop` takes `_next_batch()`,
    stores it through `_until_stored` and calls `_acknowledge`. Log events are `{events}.connected`,
    `.connect_refused`, `.subscribe_refused`, `.disconnected` and `.store_unavailable`.

    Two events end it: `_stopping` (store what is queued, then stop) and `_closing` (stop now: no more waiting
    for the database or for room in the queue, and a disconnect is no longer worth a warning).
    """

    def __init__(
        self,
        url: str,
        *,
        client_id: str,
        topics: list[str],
        events: str,
        writer: str,
        username: str | None,
        password: str | None,
        keepalive_s: int,
        session_expiry_s: int,
        receive_maximum: int,
        batch_max: int,
        gather_s: float,
        reconnect_delay: tuple[int, int],
    ) -> None:
        self.address: BrokerAddress = broker_address(url)
        self.client_id = client_id
        self._topics = topics
        self._events = events
        self._keepalive = keepalive_s
        self._session_expiry_s = session_expiry_s
        self._receive_maximum = receive_maximum
        self._batch_max = batch_max
        self._gather_s = gather_s
        # QoS 1 messages in flight are at most Receive Maximum (when the broker honours it); QoS 0 ones are
        # admitted while the queue holds fewer than that. So the queue holds at most 2x. None: stop.
        self._queue: queue.Queue[D | None] = queue.Queue(maxsize=2 * receive_maximum)
        self._lock = threading.Lock()
        self._connection = 0  # successful connections so far; the current one's number
        self._connected = False
        self._subscribed = False
        self._batches = 0
        self._store_retries = 0
        self._last_logged: dict[str, float] = {}
        self._stopping = threading.Event()
        self._closing = threading.Event()
        self._started = False
        client = mqtt_client(
            self.address,
            client_id,
            username=username,
            password=password,
            reconnect_delay=reconnect_delay,
            manual_ack=True,
        )
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        self._client = client
        self._writer = threading.Thread(target=self._write_loop, name=writer, daemon=True)

    @property
    def connected(self) -> bool:
        with self._lock:
            return self._connected

    @property
    def ready(self) -> bool:
        """Connected, and the broker acknowledged the subscriptions: messages published from now on arrive."""
        with self._lock:
            return self._connected and self._subscribed

    def _connect(self) -> None:
        """Start paho's thread, which connects and reconnects with backoff. Returns at once."""
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = self._session_expiry_s
        props.ReceiveMaximum = self._receive_maximum
        # clean_start=False: a restarted replica picks up its session and what the broker queued meanwhile.
        self._client.connect_async(
            self.address.host, self.address.port, self._keepalive, clean_start=False, properties=props
        )
        self._client.loop_start()

    # -- the subclass's part ----------------------------------------------------------------------------------

    @abstractmethod
    def _on_message(self, client: Client, userdata: Any, message: MQTTMessage) -> None:
        """paho's thread: decode a message and hand it to the queue."""

    @abstractmethod
    def _write_loop(self) -> None:
        """The writer thread: store what the queue holds, acknowledge once stored."""

    def _on_session(self, session_present: bool) -> None:
        """Called on paho's thread after each connect, once subscribing is under way."""

    # -- paho's thread ----------------------------------------------------------------------------------------

    def _on_connect(
        self, client: Client, _userdata: Any, flags: ConnectFlags, reason: ReasonCode, _props: Properties | None
    ) -> None:
        if reason.is_failure:
            log.warning(f"{self._events}.connect_refused", broker=self.address.host, reason=str(reason))
            return
        with self._lock:
            self._connection += 1
            self._connected = True
            self._subscribed = False
        client.subscribe([(topic, 1) for topic in self._topics])
        self._on_session(flags.session_present)
        log.info(f"{self._events}.connected", broker=self.address.host, session_present=flags.session_present)

    def _on_subscribe(
        self, _c: Client, _u: Any, _mid: int, reasons: list[ReasonCode], _props: Properties | None
    ) -> None:
        failed = [str(r) for r in reasons if r.is_failure]
        if failed:  # not allowed by the broker's ACL, typically
            where = {"topic": self._topics[0]} if len(self._topics) == 1 else {"topics": self._topics}
            log.error(f"{self._events}.subscribe_refused", **where, reasons=failed)
            return
        with self._lock:
            self._subscribed = True

    def _on_disconnect(
        self, _c: Client, _u: Any, _flags: DisconnectFlags, reason: ReasonCode, _props: Properties | None
    ) -> None:
        with self._lock:
            was, self._connected, self._subscribed = self._connected, False, False
        if was and not self._closing.is_set():
            log.warning(f"{self._events}.disconnected", broker=self.address.host, reason=str(reason))

    def _wait_to_queue(self, item: D) -> None:
        """Queue `item`, blocking paho's thread while the queue is full (paho stops reading, TCP pushes back
        and the broker keeps the rest); gives up once closing (unacknowledged, the broker delivers it again)."""
        while not self._closing.is_set():
            try:
                self._queue.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    def _first_in_a_minute(self, key: str) -> bool:
        """True at most once a minute per `key`: a misbehaving device must not flood the logs."""
        now = time.monotonic()
        with self._lock:
            if now - self._last_logged.get(key, -float("inf")) < 60:
                return False
            self._last_logged[key] = now
            return True

    # -- the writer thread ------------------------------------------------------------------------------------

    def _next_batch(self) -> list[D] | None:
        """Wait for a message, let more arrive for `gather_s`, then take up to batch_max of what is queued.
        None: the stop marker came first; one taken later ends the batch and is queued again.

        Each batch costs a transaction (and on SQLite an fsync) whatever its size: gathering for a few
        milliseconds makes batches larger under load, which is when the per-batch cost matters. One wait,
        then non-blocking takes: a blocking take per message cost a futex wake-up each.
        """
        first = self._queue.get()
        if first is None:
            return None
        if self._gather_s > 0 and self._queue.qsize() < self._batch_max:
            self._stopping.wait(self._gather_s)
        batch = [first]
        while len(batch) < self._batch_max:
            try:
                more = self._queue.get_nowait()
            except queue.Empty:
                break
            if more is None:
                # Seen again by the next take: this batch is stored first. (A queue filled meanwhile can only be
                # the telemetry subscriber's, whose writer stops once the queue is empty: it does not need it.)
                with contextlib.suppress(queue.Full):
                    self._queue.put_nowait(None)
                break
            batch.append(more)
        return batch

    def _until_stored(self, write: Callable[[], R]) -> R | None:
        """`write()`'s result, retried with backoff while the database is unavailable; None once closing."""
        delay = 0.1
        while True:
            try:
                return write()
            except StoreUnavailable as exc:
                with self._lock:
                    self._store_retries += 1
                log.warning(f"{self._events}.store_unavailable", error=exc.message, retry_in_s=delay)
                if self._closing.wait(delay):
                    return None
                delay = min(delay * 2, 5.0)

    def _acknowledge(self, batch: list[D]) -> None:
        """Count a stored batch and acknowledge its QoS 1 messages delivered on the current connection."""
        with self._lock:
            self._batches += 1
            connection = self._connection
        for item in batch:
            if item.qos > 0 and item.connection == connection:
                self._client.ack(item.mid, item.qos)
