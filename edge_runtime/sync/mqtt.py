"""The device's MQTT 5 link: telemetry and reported state out, presence (status + last will), desired state in.

One of the two control transports (edge_runtime/sync/control.py). Not what telemetry says
(edge_runtime/telemetry/) nor what is done with a desired state (the handler given to `start`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import structlog
from paho.mqtt.client import Client, ConnectFlags, DisconnectFlags, MQTTMessage, MQTTMessageInfo
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edge_runtime.config import AgentConfig, MqttSection
from edge_runtime.errors import ConfigError
from edge_runtime.sync.tls import warn_if_unusable
from edgefleet.addresses import AddressError, BrokerAddress
from edgefleet.addresses import parse_broker_url as parse_address
from edgefleet.proto.edgefleet.v1.state_pb2 import DesiredState, ReportedState
from edgefleet.proto.edgefleet.v1.telemetry_pb2 import Telemetry

__all__ = [
    "REPORTED_CONTENT_TYPE",
    "STATUS_OFFLINE",
    "STATUS_ONLINE",
    "TELEMETRY_CONTENT_TYPE",
    "BrokerAddress",
    "DeviceTopics",
    "LinkCounters",
    "MqttLink",
    "parse_broker_url",
]

T = TypeVar("T")
log = structlog.get_logger(__name__)

STATUS_ONLINE = b"online"
STATUS_OFFLINE = b"offline"
# MQTT 5 content type of telemetry payloads: the protobuf message's full name.
TELEMETRY_CONTENT_TYPE = Telemetry.DESCRIPTOR.full_name
REPORTED_CONTENT_TYPE = ReportedState.DESCRIPTOR.full_name
STATUS_CONTENT_TYPE = "text/plain"
# paho's outgoing queue (QoS 1 messages not yet acknowledged, in flight or waiting). Telemetry comes every
# few seconds and presence/reported state are single retained messages, so a full queue means the broker
# stopped acknowledging: newer messages are dropped (and counted) instead of growing memory on the device.
MAX_QUEUED_MESSAGES = 64
# Reconnect backoff (seconds): paho doubles the wait from the first to the second after each failed try.
RECONNECT_DELAY = (1, 30)
# Device ids appear in topics: no "/", "+", "#", NUL or spaces (the cloud registry enforces the same rule).
_TOPIC_UNSAFE = set("/+#\0 ")


def parse_broker_url(url: str) -> BrokerAddress:
    """`mqtt://host:port` (plaintext, 1883 by default) or `mqtts://host:port` (TLS, 8883); ConfigError names
    `mqtt.url`."""
    try:
        return parse_address(url)
    except AddressError as exc:
        raise ConfigError(f"mqtt.url: {exc}") from None


class DeviceTopics:
    """The topics of one device under a prefix: `{prefix}/devices/{id}/{suffix}`."""

    def __init__(self, prefix: str, device_id: str) -> None:
        if not device_id or _TOPIC_UNSAFE & set(device_id):
            raise ConfigError(
                f"cloud.device_id {device_id!r} cannot be used in MQTT topics (empty, or has / + # or space)"
            )
        if not prefix or prefix.startswith("/") or prefix.endswith("/") or set("+#\0") & set(prefix):
            raise ConfigError(f"mqtt.topic_prefix {prefix!r} must be a topic without wildcards or edge slashes")
        self.base = f"{prefix}/devices/{device_id}"
        self.telemetry = self.device("telemetry")
        self.status = self.device("status")
        self.reported = self.device("reported")
        self.desired = self.device("desired")

    def device(self, suffix: str) -> str:
        return f"{self.base}/{suffix}"


@dataclass(frozen=True)
class LinkCounters:
    """What the link did since it started (a snapshot, for metrics and tests)."""

    connects: int
    telemetry_sent: int  # handed to paho while connected
    telemetry_replaced: int  # held while disconnected and overwritten by a newer one before it could be sent
    telemetry_dropped: int  # refused by paho's bounded queue (the broker stopped acknowledging)
    messages_rejected: int  # received on a subscription and failed to decode


def _properties(packet_type: int, content_type: str) -> Properties:
    props = Properties(packet_type)  # type: ignore[no-untyped-call]  # paho leaves __init__ unannotated
    props.ContentType = content_type
    return props


class MqttLink:
    """One device's MQTT 5 connection, kept up by paho's thread until `close()`.

    paho runs on its own network thread (`loop_start`), as DESIGN.md "Concurrency on the device" decides:
    its callbacks only decode and hand off with `loop.call_soon_threadsafe`; `publish_telemetry` and
    `publish_reported` may be called from the event loop (paho's publish is thread-safe and never waits on
    the network). `loop` is the agent's loop; without one, `start` must be called on it.

    Presence: the last will is status `offline` (retained, QoS 1); every (re)connect publishes `online`
    (retained, QoS 1); a clean `close()` publishes `offline` before disconnecting. The reported state is
    retained QoS 1 too, and published again on every connect (a broker without persistence forgets it).
    `max_queued_messages` bounds paho's queue (0: unbounded, for benchmarks that publish in a tight loop).
    """

    def __init__(
        self,
        mqtt: MqttSection,
        device_id: str,
        loop: asyncio.AbstractEventLoop | None = None,
        *,
        username: str | None = None,
        password: str | None = None,
        ca_file: str = "",
        client_cert_file: str = "",
        client_key_file: str = "",
        reconnect_delay: tuple[int, int] = RECONNECT_DELAY,
        max_queued_messages: int = MAX_QUEUED_MESSAGES,
    ) -> None:
        self.address = parse_broker_url(mqtt.url)
        self.topics = DeviceTopics(mqtt.topic_prefix, device_id)
        self.device_id = device_id
        self._qos = mqtt.qos
        self._keepalive = mqtt.keepalive_s
        self._loop = loop
        self._lock = threading.Lock()
        self._connected = False
        self._started = False
        self._closed = False
        # While disconnected only the newest telemetry is kept (telemetry is a periodic snapshot: an old
        # window is worth less than the next one, and a backlog would grow with the length of the outage).
        self._held: bytes | None = None
        self._reported: bytes | None = None  # the newest reported state, sent again on every connect
        self._subscriptions: dict[str, Callable[[MQTTMessage], None]] = {}
        self._counts = {"connects": 0, "sent": 0, "replaced": 0, "dropped": 0, "rejected": 0}
        self._telemetry_props = _properties(PacketTypes.PUBLISH, TELEMETRY_CONTENT_TYPE)
        self._status_props = _properties(PacketTypes.PUBLISH, STATUS_CONTENT_TYPE)
        self._reported_props = _properties(PacketTypes.PUBLISH, REPORTED_CONTENT_TYPE)

        # The client id is the device id: the deployed broker replaces whatever a client sends with its
        # authenticated identity (use_username_as_clientid), so a device can only ever take its own session.
        client = Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=device_id,
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        client.max_queued_messages_set(max_queued_messages)
        client.reconnect_delay_set(*reconnect_delay)
        client.will_set(
            self.topics.status,
            STATUS_OFFLINE,
            qos=1,
            retain=True,
            properties=_properties(PacketTypes.WILLMESSAGE, STATUS_CONTENT_TYPE),
        )
        if username is not None:
            client.username_pw_set(username, password)
        if self.address.tls:
            warn_if_unusable(client_cert_file, "the broker")
            client.tls_set(
                ca_certs=ca_file or None,
                certfile=client_cert_file or None,
                keyfile=client_key_file or None,
                cert_reqs=ssl.CERT_REQUIRED,
            )
        elif client_cert_file:
            raise ConfigError("cloud.client_cert_file is set but mqtt.url is not mqtts://: certificates need TLS")
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_connect_fail = self._on_connect_fail
        self._client = client

    @classmethod
    def from_config(
        cls, config: AgentConfig, loop: asyncio.AbstractEventLoop | None = None, *, token: str | None = None
    ) -> MqttLink:
        """The link `config` describes: username = device id, password = the device token (`token`, else read
        from cloud.token_file when one is set). Reads files: call it off the loop."""
        password = token
        if password is None and config.cloud.token_file:
            try:
                password = Path(config.cloud.token_file).read_text().strip()
            except OSError as exc:
                raise ConfigError(f"cloud.token_file {config.cloud.token_file!r}: {exc.strerror}") from exc
        return cls(
            config.mqtt,
            config.cloud.device_id,
            loop,
            username=config.cloud.device_id if password is not None else None,
            password=password,
            ca_file=config.cloud.ca_file,
            client_cert_file=config.cloud.client_cert_file,
            client_key_file=config.cloud.client_key_file,
        )

    # -- the loop's side ------------------------------------------------------------------------------------

    def start(self, on_desired: Callable[[DesiredState], None] | None = None) -> None:
        """Start paho's thread; it connects, and keeps reconnecting with backoff. Returns at once.

        `on_desired` gets each DesiredState that arrives on this device's `desired` topic (retained, so the
        current one comes on every connect), on the loop.
        """
        with self._lock:
            if self._started or self._closed:
                raise RuntimeError("MqttLink.start() called twice or after close()")
            self._started = True
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        if on_desired is not None:
            self.subscribe("desired", on_desired, DesiredState.FromString)
        # clean_start: the device keeps no session on the broker; subscriptions are made again on every
        # connect, and what it subscribes to (desired state) is retained there.
        self._client.connect_async(self.address.host, self.address.port, self._keepalive, clean_start=True)
        self._client.loop_start()

    @property
    def connected(self) -> bool:
        with self._lock:
            return self._connected

    def publish_telemetry(self, payload: bytes) -> None:
        """Send a serialized Telemetry now if connected, else keep it (the newest only) for the next connect."""
        with self._lock:
            if self._closed:
                return
            if not self._connected:
                if self._held is not None:
                    self._counts["replaced"] += 1
                self._held = payload
                return
        self._send_telemetry(payload)

    def publish_reported(self, state: ReportedState) -> None:
        """Publish the device's reported state (retained, QoS 1) now, or on the next connect; the newest wins."""
        payload = state.SerializeToString()
        with self._lock:
            if self._closed:
                return
            self._reported = payload
            connected = self._connected
        if connected:
            # While disconnected paho would queue it beside older ones; _on_connect sends the newest instead.
            self._client.publish(self.topics.reported, payload, qos=1, retain=True, properties=self._reported_props)

    def subscribe(self, topic_suffix: str, handler: Callable[[T], None], decode: Callable[[bytes], T]) -> None:
        """Deliver what arrives on this device's `topic_suffix` to `handler(decode(payload))` on the loop.

        `decode` runs on paho's thread (a protobuf parse); a payload it raises on is dropped, logged and
        counted. The subscription (QoS 1) is made again after every reconnect.
        """
        topic = self.topics.device(topic_suffix)

        def received(message: MQTTMessage) -> None:
            try:
                value = decode(bytes(message.payload))
            except Exception as exc:
                with self._lock:
                    self._counts["rejected"] += 1
                log.warning("mqtt.message_rejected", topic=message.topic, error=f"{type(exc).__name__}: {exc}")
                return
            loop = self._loop
            if loop is None:  # pragma: no cover - nothing connects before start() sets the loop
                return
            with contextlib.suppress(RuntimeError):  # the loop is closed: the agent is shutting down
                loop.call_soon_threadsafe(handler, value)

        with self._lock:
            self._subscriptions[topic] = received
            connected = self._connected
        self._client.message_callback_add(topic, lambda _c, _u, message: received(message))
        if connected:
            self._client.subscribe(topic, qos=1)

    def counters(self) -> LinkCounters:
        with self._lock:
            c = self._counts
            return LinkCounters(c["connects"], c["sent"], c["replaced"], c["dropped"], c["rejected"])

    def close(self, timeout: float = 5.0) -> None:
        """Publish status `offline` (waiting up to `timeout` for the broker's ack), disconnect, stop the thread.

        Blocks: call it from a thread at shutdown (`await link.aclose()` does). A clean disconnect makes the
        broker discard the last will, hence the explicit `offline`.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            connected, started = self._connected, self._started
        if connected:
            info = self._client.publish(
                self.topics.status, STATUS_OFFLINE, qos=1, retain=True, properties=self._status_props
            )
            try:
                info.wait_for_publish(timeout)
            except (RuntimeError, ValueError) as exc:  # the connection dropped meanwhile: the will says offline
                log.warning("mqtt.offline_not_sent", error=str(exc))
        if started:
            self._client.disconnect()
            self._client.loop_stop()
        log.info("mqtt.closed", device_id=self.device_id)

    async def aclose(self, timeout: float = 5.0) -> None:
        await asyncio.to_thread(self.close, timeout)

    # -- paho's thread ----------------------------------------------------------------------------------------

    def _send_telemetry(self, payload: bytes) -> None:
        info = self._client.publish(self.topics.telemetry, payload, qos=self._qos, properties=self._telemetry_props)
        self._account(info, payload)

    def _account(self, info: MQTTMessageInfo, payload: bytes) -> None:
        with self._lock:
            if info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
                self._counts["sent"] += 1
            elif info.rc == MQTTErrorCode.MQTT_ERR_QUEUE_SIZE:
                self._counts["dropped"] += 1
            elif info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN and self._qos == 0 and not self._closed:
                # The connection dropped between our check and paho's send: keep it as the newest (paho
                # itself keeps QoS 1 messages for the next connection, within its bounded queue).
                if self._held is not None:
                    self._counts["replaced"] += 1
                self._held = payload

    def _on_connect(
        self, client: Client, _userdata: Any, _flags: ConnectFlags, reason: ReasonCode, _props: Properties | None
    ) -> None:
        if reason.is_failure:
            log.warning("mqtt.connect_refused", broker=self.address.host, port=self.address.port, reason=str(reason))
            return
        with self._lock:
            if self._closed:
                return
            self._connected = True
            self._counts["connects"] += 1
            held, self._held = self._held, None
            reported = self._reported
            topics = list(self._subscriptions)
            connects = self._counts["connects"]
        client.publish(self.topics.status, STATUS_ONLINE, qos=1, retain=True, properties=self._status_props)
        if reported is not None:
            client.publish(self.topics.reported, reported, qos=1, retain=True, properties=self._reported_props)
        if topics:
            client.subscribe([(topic, 1) for topic in topics])
        if held is not None:
            self._send_telemetry(held)
        log.info("mqtt.connected", broker=self.address.host, port=self.address.port, connects=connects)

    def _on_disconnect(
        self,
        _client: Client,
        _userdata: Any,
        _flags: DisconnectFlags,
        reason: ReasonCode,
        _props: Properties | None,
    ) -> None:
        with self._lock:
            was_connected, self._connected = self._connected, False
            closing = self._closed
        if was_connected and not closing:
            log.warning("mqtt.disconnected", broker=self.address.host, port=self.address.port, reason=str(reason))

    def _on_connect_fail(self, _client: Client, _userdata: Any) -> None:
        log.debug("mqtt.connect_failed", broker=self.address.host, port=self.address.port)
