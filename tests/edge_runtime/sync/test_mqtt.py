"""MqttLink against a real Mosquitto: presence (online, clean offline, last will), telemetry, reconnects, bounds."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from edge_runtime.config import MqttSection
from edge_runtime.errors import ConfigError
from edge_runtime.sync.mqtt import (
    MAX_QUEUED_MESSAGES,
    REPORTED_CONTENT_TYPE,
    STATUS_OFFLINE,
    STATUS_ONLINE,
    TELEMETRY_CONTENT_TYPE,
    BrokerAddress,
    MqttLink,
    parse_broker_url,
)
from edgefleet.proto.edgefleet.v1.state_pb2 import DesiredState, ReportedState
from tests.edge_runtime.sync.device_process import DeviceProcess
from tests.loopcheck import LoopThread
from tests.mosquitto import Mosquitto, MqttWatcher
from tests.waiting import wait_for

DEVICE = "cam-1"
STATUS = f"edgefleet/v1/devices/{DEVICE}/status"
TELEMETRY = f"edgefleet/v1/devices/{DEVICE}/telemetry"
DESIRED = f"edgefleet/v1/devices/{DEVICE}/desired"

MakeLink = Callable[..., MqttLink]


@pytest.fixture
def make_link(loop: LoopThread) -> Iterator[MakeLink]:
    """make_link(broker, device_id=...) -> a started MqttLink (1 s reconnect delay); closed at teardown."""
    links: list[MqttLink] = []

    def make(broker: Mosquitto, device_id: str = DEVICE, *, qos: int = 1, start: bool = True) -> MqttLink:
        link = MqttLink(
            MqttSection(url=broker.url, keepalive_s=5, qos=qos), device_id, loop.loop, reconnect_delay=(1, 1)
        )
        links.append(link)
        if start:
            link.start()
        return link

    yield make
    for link in links:
        link.close(timeout=2)


@pytest.fixture
def watchers() -> Iterator[list[MqttWatcher]]:
    made: list[MqttWatcher] = []
    yield made
    for watcher in made:
        watcher.close()


def telemetry_payloads(watcher: MqttWatcher) -> list[bytes]:
    return [m.payload for m in watcher.on(TELEMETRY)]


def watch(watchers: list[MqttWatcher], broker: Mosquitto, *topics: str, **options: object) -> MqttWatcher:
    watcher = MqttWatcher(broker, list(topics), client_id=f"watcher-{len(watchers)}", **options)  # type: ignore[arg-type]
    watchers.append(watcher)
    return watcher


@pytest.mark.parametrize(
    "url",
    ["http://broker:1883", "mqtt://", "mqtt://broker:port", "mqtt://user:pw@broker:1883", "mqtt://broker/x", "broker"],
)
def test_a_bad_url_is_a_config_error_naming_mqtt_url(url: str, loop: LoopThread) -> None:
    with pytest.raises(ConfigError, match="mqtt.url"):
        MqttLink(MqttSection(url=url), DEVICE, loop.loop)


def test_url_ports_default_by_scheme() -> None:
    assert parse_broker_url("mqtt://broker") == BrokerAddress("broker", 1883, tls=False)
    assert parse_broker_url("mqtts://broker") == BrokerAddress("broker", 8883, tls=True)
    assert parse_broker_url("mqtt://127.0.0.1:1999") == BrokerAddress("127.0.0.1", 1999, tls=False)


@pytest.mark.parametrize("device_id", ["", "cam/1", "cam+", "cam#", "cam 1"])
def test_a_device_id_that_breaks_topics_is_a_config_error(device_id: str, loop: LoopThread) -> None:
    with pytest.raises(ConfigError, match="cloud.device_id"):
        MqttLink(MqttSection(url="mqtt://broker"), device_id, loop.loop)


def test_online_is_retained_and_telemetry_carries_its_content_type(
    broker: Mosquitto, make_link: MakeLink, loop: LoopThread, watchers: list[MqttWatcher]
) -> None:
    link = make_link(broker)
    wait_for(lambda: link.connected, 10, "the link to connect")
    # Subscribing after the device connected: the broker hands over the retained status.
    watcher = watch(watchers, broker, STATUS, TELEMETRY)
    (status,) = wait_for(lambda: watcher.on(STATUS), 10, "the retained status")
    assert (status.payload, status.retain, status.content_type) == (STATUS_ONLINE, True, "text/plain")

    loop.call(link.publish_telemetry, b"\x08\x01")
    (telemetry,) = wait_for(lambda: watcher.on(TELEMETRY), 10, "the telemetry")
    assert telemetry.payload == b"\x08\x01"
    assert telemetry.content_type == TELEMETRY_CONTENT_TYPE == "edgefleet.v1.Telemetry"
    assert link.counters().telemetry_sent == 1


def test_a_clean_close_publishes_offline_before_disconnecting(
    broker: Mosquitto, make_link: MakeLink, watchers: list[MqttWatcher]
) -> None:
    watcher = watch(watchers, broker, STATUS)
    link = make_link(broker)
    wait_for(lambda: [m.payload for m in watcher.on(STATUS)] == [STATUS_ONLINE], 10, "online")
    link.close()
    wait_for(lambda: [m.payload for m in watcher.on(STATUS)] == [STATUS_ONLINE, STATUS_OFFLINE], 10, "offline")
    later = watch(watchers, broker, STATUS)
    (retained,) = wait_for(lambda: later.on(STATUS), 10, "the retained status")
    assert (retained.payload, retained.retain) == (STATUS_OFFLINE, True)


def test_the_last_will_says_offline_when_the_device_process_is_killed(
    broker: Mosquitto, watchers: list[MqttWatcher]
) -> None:
    topic = "edgefleet/v1/devices/cam-9/status"
    watcher = watch(watchers, broker, topic)
    device = DeviceProcess(broker.url, "cam-9")
    try:
        device.wait_connected()
        wait_for(lambda: [m.payload for m in watcher.on(topic)] == [STATUS_ONLINE], 10, "online")
    finally:
        device.kill()
    wait_for(lambda: [m.payload for m in watcher.on(topic)] == [STATUS_ONLINE, STATUS_OFFLINE], 10, "the last will")
    later = watch(watchers, broker, topic)
    (retained,) = wait_for(lambda: later.on(topic), 10, "the retained status")
    assert (retained.payload, retained.retain) == (STATUS_OFFLINE, True)


def test_after_a_broker_restart_the_link_reconnects_and_sends_only_the_newest_telemetry(
    broker: Mosquitto, make_link: MakeLink, loop: LoopThread, watchers: list[MqttWatcher]
) -> None:
    # A watcher whose session survives the restart (the broker persists it), so it misses nothing.
    watcher = watch(watchers, broker, STATUS, TELEMETRY, session=True)
    link = make_link(broker)
    wait_for(lambda: link.connected, 10, "the link to connect")
    loop.call(link.publish_telemetry, b"window-1")
    wait_for(lambda: watcher.on(TELEMETRY), 10, "the first telemetry")

    statuses_before = len(watcher.on(STATUS))
    broker.stop()
    wait_for(lambda: not link.connected, 10, "the link to notice")
    for n in (2, 3, 4, 5):  # the agent keeps collecting while offline: no exception, no backlog
        loop.call(link.publish_telemetry, b"window-%d" % n)
    assert link.counters().telemetry_replaced == 3

    broker.start()
    wait_for(lambda: link.counters().connects == 2, 15, "the link to reconnect")
    # The watcher reconnects on its own (1 s backoff) and takes what its session queued: 15 s ran out once with
    # the suite in 3 processes on 2 cores (the Python 3.10 run); 4-11 s alone.
    wait_for(lambda: b"window-5" in telemetry_payloads(watcher), 30, "the held telemetry")
    # QoS 1 is at least once: a window-1 whose PUBACK the stopping broker never read comes again after the
    # restart (seen under load). What must hold: window-1, then only the newest of the windows held offline.
    assert list(dict.fromkeys(telemetry_payloads(watcher))) == [b"window-1", b"window-5"]
    # A live (not retained) `online` after the restart: the link announced itself again.
    wait_for(
        lambda: any(m.payload == STATUS_ONLINE and not m.retain for m in watcher.on(STATUS)[statuses_before:]),
        10,
        "online again",
    )
    assert watcher.on(STATUS)[-1].payload == STATUS_ONLINE

    loop.call(link.publish_telemetry, b"window-6")  # and telemetry flows again
    wait_for(lambda: b"window-6" in telemetry_payloads(watcher), 10, "telemetry after the restart")


def test_a_device_that_never_reached_its_broker_keeps_only_the_newest_telemetry(
    tmp_path: Path, make_link: MakeLink, loop: LoopThread, watchers: list[MqttWatcher]
) -> None:
    broker = Mosquitto(tmp_path / "later")  # configured, not started: nothing listens on its port yet
    link = make_link(broker)
    for n in range(1, 4):
        loop.call(link.publish_telemetry, b"window-%d" % n)
    assert not link.connected and link.counters().telemetry_replaced == 2
    with broker:
        watcher = watch(watchers, broker, TELEMETRY)
        wait_for(lambda: watcher.on(TELEMETRY), 15, "the held telemetry")
        assert [m.payload for m in watcher.on(TELEMETRY)] == [b"window-3"]
        link.close()


def test_paho_queue_stays_bounded_when_the_broker_stops_acknowledging(
    broker: Mosquitto, make_link: MakeLink, loop: LoopThread
) -> None:
    link = make_link(broker)
    wait_for(lambda: link.connected, 10, "the link to connect")
    broker.pause()  # the TCP connection stays up: the link still believes it is connected
    try:
        for n in range(MAX_QUEUED_MESSAGES + 36):
            loop.call(link.publish_telemetry, b"window-%d" % n)
        counters = link.counters()
    finally:
        broker.resume()
    # The queue holds at most MAX_QUEUED_MESSAGES; the `online` status sent on connect may still hold one slot
    # if the broker stopped before acknowledging it (seen on a loaded box: 63 sent, 37 dropped).
    assert counters.telemetry_sent + counters.telemetry_dropped == MAX_QUEUED_MESSAGES + 36
    assert MAX_QUEUED_MESSAGES - 1 <= counters.telemetry_sent <= MAX_QUEUED_MESSAGES


def test_subscribe_hands_decoded_messages_to_the_loop_and_survives_reconnects(
    broker: Mosquitto, make_link: MakeLink, loop: LoopThread, watchers: list[MqttWatcher]
) -> None:
    cloud = watch(watchers, broker)
    link = make_link(broker)
    got: list[tuple[int, str]] = []
    loop.call(
        link.subscribe,
        "desired",
        lambda d: got.append((d.generation, threading.current_thread().name)),
        DesiredState.FromString,
    )
    wait_for(lambda: link.connected, 10, "the link to connect")
    cloud.publish(DESIRED, DesiredState(generation=1).SerializeToString(), retain=True)
    wait_for(lambda: got, 10, "the desired state")
    assert got == [(1, "test-agent-loop")]

    cloud.publish(DESIRED, b"\xff\xff\xff")  # not a DesiredState: dropped on paho's thread, counted
    cloud.publish(DESIRED, DesiredState(generation=2).SerializeToString(), retain=True)
    wait_for(lambda: len(got) == 2, 10, "the second desired state")
    assert [g for g, _ in got] == [1, 2] and link.counters().messages_rejected == 1

    broker.restart()  # the link subscribes again; the retained desired state comes back
    wait_for(lambda: len(got) == 3, 15, "the retained desired state after reconnecting")
    assert got[-1] == (2, "test-agent-loop")


REPORTED = f"edgefleet/v1/devices/{DEVICE}/reported"


def test_start_hands_the_retained_desired_state_to_on_desired(
    broker: Mosquitto, make_link: MakeLink, loop: LoopThread, watchers: list[MqttWatcher]
) -> None:
    cloud = watch(watchers, broker)
    cloud.publish(DESIRED, DesiredState(device_id=DEVICE, generation=7).SerializeToString(), retain=True)
    link = make_link(broker, start=False)
    got: list[tuple[int, str]] = []
    loop.call(link.start, lambda d: got.append((d.generation, threading.current_thread().name)))
    wait_for(lambda: got, 10, "the retained desired state")
    assert got == [(7, "test-agent-loop")]


def test_the_reported_state_is_retained_and_published_again_on_every_connect(
    tmp_path: Path, make_link: MakeLink, loop: LoopThread, watchers: list[MqttWatcher]
) -> None:
    broker = Mosquitto(tmp_path / "forgetful").start()  # no persistence: a restart forgets retained messages
    early = watch(watchers, broker, REPORTED)
    link = make_link(broker)
    loop.call(link.publish_reported, ReportedState(device_id=DEVICE, generation=1))  # before it connected
    wait_for(lambda: early.on(REPORTED), 10, "the reported state, sent on connect")
    later = watch(watchers, broker, REPORTED)  # subscribes after the fact: the broker hands over its copy
    (first,) = wait_for(lambda: later.on(REPORTED), 10, "the retained reported state")
    assert first.retain and first.content_type == REPORTED_CONTENT_TYPE == "edgefleet.v1.ReportedState"
    assert ReportedState.FromString(first.payload).generation == 1

    loop.call(link.publish_reported, ReportedState(device_id=DEVICE, generation=2))
    wait_for(lambda: len(later.on(REPORTED)) == 2, 10, "the newer state")
    try:
        broker.restart()
        wait_for(lambda: link.counters().connects == 2, 15, "the link to reconnect")
        # The link's own connect is acknowledged before its publish lands: wait for the copy to be there.
        wait_for(lambda: len(early.on(REPORTED)) == 3, 15, "the state again, on the new connection")
        fresh = watch(watchers, broker, REPORTED)
        (again,) = wait_for(lambda: fresh.on(REPORTED), 10, "the reported state, published again")
        assert again.retain and ReportedState.FromString(again.payload).generation == 2
    finally:
        link.close(timeout=2)
        broker.kill()
