"""A real Mosquitto broker for tests: a config file the test writes, a free loopback port, stop/restart/kill.

    with Mosquitto(tmp_path, "max_queued_messages 5000") as broker:
        client.connect("127.0.0.1", broker.port)
        broker.restart()          # same port, same config (and the persistence file, if the config keeps one)

Not a fixture itself (tests/cloud_sync/telemetry/conftest.py makes them); plain so any test package can use it.
"""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from paho.mqtt.client import Client, MQTTMessage
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.waiting import wait_for

__all__ = ["MOSQUITTO", "Mosquitto", "MqttWatcher", "Received", "free_port"]

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


def free_port() -> int:
    """A TCP port nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


class Mosquitto:
    """One broker process on 127.0.0.1:`port`, configured by `config` (mosquitto.conf lines) plus a listener.

    The listener, log file and (when `persistence`) the persistence directory are added here; `config` holds
    whatever the test is about (queue limits, password_file, acl_file...).
    """

    def __init__(
        self,
        directory: Path,
        config: str | Callable[[int], str] = "",
        *,
        persistence: bool = False,
        anonymous: bool = True,
        listener: bool = True,
    ):
        """`config` may be a function of the port (for a config that declares the listener itself, with
        `listener=False`: then neither the listener nor allow_anonymous is added here)."""
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.conf = directory / "mosquitto.conf"
        self.log = directory / "mosquitto.log"
        lines = [f"listener {self.port} 127.0.0.1", f"allow_anonymous {'true' if anonymous else 'false'}"]
        if not listener:
            lines = []
        lines += [
            f"log_dest file {self.log}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
        ]
        if os.geteuid() == 0:
            # Started as root, Mosquitto switches to the `mosquitto` user, which cannot read the test's files.
            lines.append(f"user {getpass.getuser()}")
        if persistence:
            lines += ["persistence true", f"persistence_location {directory}/", "autosave_interval 1"]
        text = config(self.port) if callable(config) else config
        self.conf.write_text("\n".join([*lines, text, ""]))
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> Mosquitto:
        if self.process is not None and self.process.poll() is None:
            raise RuntimeError("mosquitto is running already")
        self.process = subprocess.Popen(
            [MOSQUITTO, "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        process = self.process

        def up() -> bool:
            if process.poll() is not None:
                err = process.stderr.read().decode(errors="replace") if process.stderr else ""
                raise AssertionError(f"mosquitto exited with {process.returncode}: {err}{self.log_text()}")
            return _accepts(self.port)

        wait_for(up, timeout, f"mosquitto to listen on port {self.port}")
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, as a clean broker shutdown (it saves its persistence file, if any)."""
        self._signal(signal.SIGTERM, timeout)

    def kill(self, timeout: float = 10.0) -> None:
        """SIGKILL: the broker vanishes without a word."""
        self._signal(signal.SIGKILL, timeout)

    def pause(self) -> None:
        """SIGSTOP: connections stay open but nothing is read or acknowledged (a hung broker)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def restart(self, timeout: float = 10.0) -> None:
        self.stop(timeout)
        # The port was ours; until the new process binds it, wait until nothing accepts there any more.
        wait_for(lambda: not _accepts(self.port), timeout, "the old broker to close its port")
        self.start(timeout)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def _signal(self, sig: signal.Signals, timeout: float) -> None:
        process = self.process
        if process is None or process.poll() is not None:
            return
        if sig == signal.SIGTERM:
            process.send_signal(signal.SIGCONT)  # a paused broker must run to act on SIGTERM
        process.send_signal(sig)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout)
        if process.stderr:
            process.stderr.close()

    def __enter__(self) -> Mosquitto:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.kill()


@dataclass(frozen=True)
class Received:
    topic: str
    payload: bytes
    retain: bool
    content_type: str | None


class MqttWatcher:
    """A plain paho client that records what arrives on `topics` (and may publish), for assertions.

    With `session=True` its broker session outlives a disconnect (and, with persistence, a broker restart),
    so messages published while it reconnects are not missed.
    """

    def __init__(
        self,
        broker: Mosquitto,
        topics: list[str],
        *,
        client_id: str = "watcher",
        username: str | None = None,
        password: str | None = None,
        session: bool = False,
    ) -> None:
        self.messages: list[Received] = []
        self.granted: list[int] = []
        self._lock = threading.Lock()
        self.topics = topics
        self.client = Client(
            callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id, protocol=MQTTProtocolVersion.MQTTv5
        )
        if username is not None:
            self.client.username_pw_set(username, password)
        self.client.reconnect_delay_set(1, 1)
        self.client.on_message = self._on_message
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda _c, _u, _mid, codes, _p: self.granted.extend(c.value for c in codes)
        self.connects = 0
        props = None
        if session:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 600
        self.client.connect_async("127.0.0.1", broker.port, keepalive=5, clean_start=not session, properties=props)
        self.client.loop_start()
        wait_for(lambda: len(self.granted) >= len(topics) if topics else self.connects, 10, "the watcher to subscribe")

    def _on_connect(self, client: Client, _u: object, _f: object, reason: object, _p: object) -> None:
        self.connects += 1
        if self.topics:
            client.subscribe([(t, 1) for t in self.topics])

    def _on_message(self, _c: Client, _u: object, message: MQTTMessage) -> None:
        props = message.properties
        content_type = getattr(props, "ContentType", None) if props is not None else None
        with self._lock:
            self.messages.append(Received(message.topic, bytes(message.payload), bool(message.retain), content_type))

    def on(self, topic: str) -> list[Received]:
        with self._lock:
            return [m for m in self.messages if m.topic == topic]

    def publish(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False, content_type: str = ""
    ) -> None:
        props = None
        if content_type:
            props = Properties(PacketTypes.PUBLISH)
            props.ContentType = content_type
        self.client.publish(topic, payload, qos=qos, retain=retain, properties=props).wait_for_publish(10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
