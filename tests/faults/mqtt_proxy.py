"""An MQTT-aware TCP proxy for fault tests: devices connect to it, it connects to the real broker, and it drops
a share of the devices' PUBLISH packets on chosen topics while everything else passes untouched.

Only the client -> broker direction is parsed, and only as far as MQTT's framing needs: the fixed header (packet
type in the high nibble of byte 1, then the remaining length as a variable byte integer) and, for PUBLISH, the
topic name that opens the variable header (a two-byte length, then UTF-8). A dropped PUBLISH never reaches the
broker, so it is neither delivered nor acknowledged: a QoS 1 message lost between a device and the broker, as a
broker that lost its queue or a message lost while a connection was cut leaves it. Broker -> client bytes are
copied as they come. Not a general MQTT implementation: no packet is rewritten, none is invented.
"""

from __future__ import annotations

import contextlib
import random
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["MqttDropProxy", "Packet", "split_packets"]

PUBLISH = 3


@dataclass(frozen=True)
class Packet:
    """One whole MQTT control packet as it travelled: its type, its PUBLISH topic ("" otherwise), its bytes."""

    kind: int
    topic: str
    raw: bytes


def _remaining_length(buffer: bytes | bytearray, start: int) -> tuple[int, int] | None:
    """(remaining length, bytes it took) read at `start`, or None when the buffer ends inside it.

    ValueError for more than four length bytes (MQTT's limit): the stream is not MQTT.
    """
    value, shift = 0, 0
    for i in range(4):
        if start + i >= len(buffer):
            return None
        byte = buffer[start + i]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, i + 1
        shift += 7
    raise ValueError("an MQTT remaining length longer than 4 bytes")


def _topic(body: bytes) -> str:
    """The topic name at the start of a PUBLISH's variable header ("" if it does not fit)."""
    if len(body) < 2:
        return ""
    size = int.from_bytes(body[:2], "big")
    return body[2 : 2 + size].decode("utf-8", errors="replace")


def split_packets(buffer: bytearray) -> list[Packet]:
    """Take every whole packet off the front of `buffer` (a partial one stays there for more bytes)."""
    packets = []
    while len(buffer) >= 2:
        found = _remaining_length(buffer, 1)
        if found is None:
            break
        length, took = found
        end = 1 + took + length
        if len(buffer) < end:
            break
        raw = bytes(buffer[:end])
        del buffer[:end]
        kind = raw[0] >> 4
        packets.append(Packet(kind, _topic(raw[1 + took :]) if kind == PUBLISH else "", raw))
    return packets


@dataclass
class DropStats:
    """What the proxy saw of the devices' PUBLISH packets on the topics it may drop."""

    matched: int = 0
    dropped: int = 0
    dropped_topics: list[str] = field(default_factory=list)


class MqttDropProxy:
    """Listens on 127.0.0.1:`port`; each connection is piped to the broker at 127.0.0.1:`broker_port`.

    Each client PUBLISH whose topic satisfies `matches` is dropped with probability `share` (a seeded RNG, so a
    run is repeatable as far as the packets' order is). `dropping` may be switched off to let every packet
    through again.
    """

    def __init__(self, broker_port: int, matches: Callable[[str], bool], share: float = 0.1, seed: int = 11) -> None:
        self.broker_port = broker_port
        self.matches = matches
        self.share = share
        self.dropping = True
        self.stats = DropStats()
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._closed = threading.Event()
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, name="mqtt-proxy", daemon=True).start()

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                broker = socket.create_connection(("127.0.0.1", self.broker_port), timeout=5)
            except OSError:
                client.close()
                continue
            broker.settimeout(None)
            with self._lock:
                self._sockets += [client, broker]
            threading.Thread(target=self._upstream, args=(client, broker), daemon=True).start()
            threading.Thread(target=self._downstream, args=(broker, client), daemon=True).start()

    def _keep(self, packet: Packet) -> bool:
        if packet.kind != PUBLISH or not self.matches(packet.topic):
            return True
        with self._lock:
            self.stats.matched += 1
            if self.dropping and self._rng.random() < self.share:
                self.stats.dropped += 1
                self.stats.dropped_topics.append(packet.topic)
                return False
        return True

    def _upstream(self, client: socket.socket, broker: socket.socket) -> None:
        buffer = bytearray()
        try:
            while data := client.recv(65536):
                buffer += data
                out = b"".join(p.raw for p in split_packets(buffer) if self._keep(p))
                if out:
                    broker.sendall(out)
        except (OSError, ValueError):
            pass
        finally:
            _close(client, broker)

    def _downstream(self, broker: socket.socket, client: socket.socket) -> None:
        try:
            while data := broker.recv(65536):
                client.sendall(data)
        except OSError:
            pass
        finally:
            _close(client, broker)

    def close(self) -> None:
        self._closed.set()
        self._listener.close()
        with self._lock:
            sockets, self._sockets = self._sockets, []
        _close(*sockets)


def _close(*sockets: socket.socket) -> None:
    for s in sockets:
        with contextlib.suppress(OSError):
            s.shutdown(socket.SHUT_RDWR)
        s.close()
