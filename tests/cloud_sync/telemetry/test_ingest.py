"""Devices publish through a real Mosquitto; cloud-sync's subscriber stores telemetry and presence."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import pytest

from cloud_sync.store import Database
from cloud_sync.store.telemetry import TelemetryStore
from edge_runtime.config import MqttSection
from edge_runtime.sync.mqtt import MqttLink
from tests.cloud_sync.telemetry.conftest import MakeSubscriber, telemetry
from tests.edge_runtime.sync.device_process import DeviceProcess
from tests.mosquitto import Mosquitto
from tests.waiting import wait_for


class DeviceLoop:
    """An in-process device: an MqttLink on an asyncio loop thread (the agent's shape)."""

    def __init__(self, broker: Mosquitto, device_id: str, reconnect_delay: tuple[int, int] = (1, 1)) -> None:
        self.device_id = device_id
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=f"device-{device_id}", daemon=True)
        self.thread.start()
        self.link = MqttLink(
            MqttSection(url=broker.url, keepalive_s=5), device_id, self.loop, reconnect_delay=reconnect_delay
        )
        self.link.start()
        self.seq = 0

    def publish(self) -> int:
        """Publish the next telemetry message from the loop thread; returns its seq."""
        self.seq += 1
        payload = telemetry(self.device_id, self.seq).SerializeToString()

        async def send() -> None:
            self.link.publish_telemetry(payload)

        asyncio.run_coroutine_threadsafe(send(), self.loop).result(10)
        return self.seq

    def close(self) -> None:
        self.link.close(timeout=5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def devices() -> Iterator[list[DeviceLoop]]:
    made: list[DeviceLoop] = []
    yield made
    for device in made:
        device.close()


def presence(store: TelemetryStore, device_id: str) -> bool | None:
    found = [p.online for p in store.fleet_presence() if p.device_id == device_id]
    return found[0] if found else None


def latest_seq(store: TelemetryStore, device_id: str) -> int:
    latest = store.latest(device_id)
    return latest.message.seq if latest is not None else 0


def test_telemetry_and_presence_flow_from_device_to_database(
    db: Database, broker: Mosquitto, make_subscriber: MakeSubscriber, devices: list[DeviceLoop]
) -> None:
    store = TelemetryStore(db)
    subscriber = make_subscriber(store, broker)

    # A device process publishing every 50 ms; killed without a word, its last will says offline.
    device = DeviceProcess(broker.url, "cam-1", interval=0.05)
    try:
        device.wait_connected()
        wait_for(lambda: presence(store, "cam-1") is True, 10, "cam-1 online")
        wait_for(lambda: latest_seq(store, "cam-1") >= 3, 10, "three telemetry windows stored")
    finally:
        device.kill()
    wait_for(lambda: presence(store, "cam-1") is False, 10, "cam-1 offline by its last will")

    latest = store.latest("cam-1")
    assert latest is not None and latest.message.device_id == "cam-1"
    window = store.model_window("digits", 1, ["cam-1"], since_ms=0)
    assert window.windows == latest.message.seq  # every window it sent, once each
    assert (window.requests, window.errors) == (10 * window.windows, window.windows)
    assert window.error_rate == pytest.approx(0.1)
    assert (window.p99_ms, window.mean_batch_size, window.devices) == (3.0, 2.0, 1)

    # An in-process device that closes cleanly publishes offline itself.
    cam2 = DeviceLoop(broker, "cam-2")
    devices.append(cam2)
    wait_for(lambda: presence(store, "cam-2") is True, 10, "cam-2 online")
    seq = cam2.publish()
    wait_for(lambda: latest_seq(store, "cam-2") == seq, 10, "cam-2's telemetry")
    cam2.link.close()
    wait_for(lambda: presence(store, "cam-2") is False, 10, "cam-2 offline after its clean close")

    # The counters move just after the commit the queries above saw.
    wait_for(lambda: subscriber.stats().stored["status"] == 4, 10, "four presence messages counted")
    stats = subscriber.stats()
    assert stats.stored["telemetry"] >= 4 and not any(stats.rejected.values())


def test_after_a_broker_restart_both_sides_reconnect_and_telemetry_resumes(
    sqlite_db: Database, broker: Mosquitto, make_subscriber: MakeSubscriber, devices: list[DeviceLoop]
) -> None:
    store = TelemetryStore(sqlite_db)
    subscriber = make_subscriber(store, broker)
    # The device retries after 2 s, cloud-sync after 1 s: Mosquitto 2.0 does not restore shared subscriptions
    # from its persistence file, so what a device sends before cloud-sync subscribes again is dropped
    # (test_broker_queue.py shows it). Here cloud-sync is back first, as its shorter backoff intends.
    cam = DeviceLoop(broker, "cam-1", reconnect_delay=(2, 2))
    devices.append(cam)
    wait_for(lambda: presence(store, "cam-1") is True, 10, "online")
    seq = cam.publish()
    wait_for(lambda: latest_seq(store, "cam-1") == seq, 10, "the first telemetry")

    broker.restart()
    cam.publish()  # while the device is offline: kept, no exception
    wait_for(lambda: cam.link.counters().connects == 2 and subscriber.ready, 15, "both to reconnect")
    wait_for(lambda: latest_seq(store, "cam-1") == 2, 10, "the telemetry held through the outage")
    seq = cam.publish()
    wait_for(lambda: latest_seq(store, "cam-1") == seq, 10, "telemetry after the restart")
    assert presence(store, "cam-1") is True
