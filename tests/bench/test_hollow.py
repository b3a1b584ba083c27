"""Hollow devices (bench/hollow.py) against a real Mosquitto: they answer each newer desired state with the report
a converged agent sends, survive garbage, reconnect after a broker restart, and run as child processes."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.bench_control_fanout import goal_seconds
from bench.hollow import (
    REPORTED_CONTENT_TYPE,
    HollowFleet,
    HollowProcess,
    device_ids,
    reported_for,
)
from edgefleet.proto.edgefleet.v1.state_pb2 import (
    MODEL_ROLE_ACTIVE,
    MODEL_ROLE_SHADOW,
    MODEL_STATE_ACTIVE,
    MODEL_STATE_READY,
    DesiredState,
    ModelAssignment,
    ReportedState,
)
from tests.mosquitto import Mosquitto, MqttWatcher, free_port
from tests.processes import REPO_ROOT
from tests.waiting import wait_for

PREFIX = "edgefleet/v1"
N = 20


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    with Mosquitto(tmp_path / "broker", "max_connections -1") as b:
        yield b


@pytest.fixture
def watcher(broker: Mosquitto) -> Iterator[MqttWatcher]:
    w = MqttWatcher(broker, [f"{PREFIX}/devices/+/reported", f"{PREFIX}/devices/+/status"])
    yield w
    w.close()


@pytest.fixture
def fleet(broker: Mosquitto) -> Iterator[HollowFleet]:
    f = HollowFleet("127.0.0.1", broker.port, device_ids(N), topic_prefix=PREFIX)
    f.start()
    f.wait_subscribed(30)
    yield f
    f.close()


def desired(device_id: str, generation: int, policy_hash: str = "p1") -> DesiredState:
    return DesiredState(
        device_id=device_id,
        generation=generation,
        models=[
            ModelAssignment(name="digits", version=2, role=MODEL_ROLE_ACTIVE, sha256="ab" * 32),
            ModelAssignment(name="digits", version=3, role=MODEL_ROLE_SHADOW, sha256="cd" * 32),
        ],
        policy_json='{"telemetry": {"interval_s": 5}}',
        policy_hash=policy_hash,
    )


def reports(watcher: MqttWatcher, device_id: str) -> list[ReportedState]:
    return [ReportedState.FromString(m.payload) for m in watcher.on(f"{PREFIX}/devices/{device_id}/reported")]


def test_every_device_answers_a_newer_desired_state_with_a_converged_report(
    fleet: HollowFleet, watcher: MqttWatcher
) -> None:
    ids = device_ids(N)
    for device_id in ids:
        watcher.publish(f"{PREFIX}/devices/{device_id}/desired", desired(device_id, 7).SerializeToString(), retain=True)

    wait_for(lambda: all(reports(watcher, d) for d in ids), 10, "a report from every device")
    for device_id in ids:
        [message] = watcher.on(f"{PREFIX}/devices/{device_id}/reported")
        assert message.content_type == REPORTED_CONTENT_TYPE
        [state] = reports(watcher, device_id)
        assert (state.device_id, state.generation, state.policy_hash, state.converged) == (device_id, 7, "p1", True)
        assert [(m.name, m.version, m.state) for m in state.models] == [
            ("digits", 2, MODEL_STATE_ACTIVE),
            ("digits", 3, MODEL_STATE_READY),
        ]
        assert state.agent.agent_version == "hollow"
    # Online presence, as the agent says it.
    assert all(m.payload == b"online" for d in ids for m in watcher.on(f"{PREFIX}/devices/{d}/status"))
    stats = fleet.stats()
    assert (stats.desired_received, stats.reported_sent, stats.connected, stats.subscribed) == (N, N, N, N)


def test_reports_are_retained_for_a_cloud_that_subscribes_later(broker: Mosquitto, fleet: HollowFleet) -> None:
    device_id = device_ids(N)[3]
    first = MqttWatcher(broker, [], client_id="publisher")
    first.publish(f"{PREFIX}/devices/{device_id}/desired", desired(device_id, 2).SerializeToString(), retain=True)
    wait_for(lambda: fleet.stats().reported_sent == 1, 10, "the report")

    late = MqttWatcher(broker, [f"{PREFIX}/devices/{device_id}/reported"], client_id="late")
    wait_for(lambda: late.on(f"{PREFIX}/devices/{device_id}/reported"), 10, "the retained report")
    [message] = late.on(f"{PREFIX}/devices/{device_id}/reported")
    assert message.retain and ReportedState.FromString(message.payload).generation == 2
    first.close()
    late.close()


def test_stale_repeated_foreign_and_garbage_desired_states_get_no_report(
    fleet: HollowFleet, watcher: MqttWatcher
) -> None:
    device_id = device_ids(N)[0]
    topic = f"{PREFIX}/devices/{device_id}/desired"
    watcher.publish(topic, desired(device_id, 5).SerializeToString(), retain=True)
    wait_for(lambda: reports(watcher, device_id), 10, "the first report")

    watcher.publish(topic, desired(device_id, 5).SerializeToString())  # the same again (a reconnect's retained)
    watcher.publish(topic, desired(device_id, 4).SerializeToString())  # stale
    watcher.publish(topic, b"")  # a retained message deleted
    watcher.publish(topic, desired("someone-else", 9).SerializeToString())
    watcher.publish(topic, b"\xff\xff not protobuf")
    wait_for(
        lambda: (s := fleet.stats()).desired_ignored == 3 and s.desired_rejected == 2, 10, "all five to be handled"
    )
    watcher.publish(topic, desired(device_id, 6, "p2").SerializeToString())
    wait_for(lambda: len(reports(watcher, device_id)) == 2, 10, "the newer state's report")

    assert [(s.generation, s.policy_hash) for s in reports(watcher, device_id)] == [(5, "p1"), (6, "p2")]
    assert fleet.stats().desired_received == 2


def test_after_a_broker_restart_devices_reconnect_and_report_again(broker: Mosquitto, fleet: HollowFleet) -> None:
    ids = device_ids(N)
    publisher = MqttWatcher(broker, [], client_id="publisher")
    for device_id in ids:
        publisher.publish(f"{PREFIX}/devices/{device_id}/desired", desired(device_id, 3).SerializeToString())
    wait_for(lambda: fleet.stats().reported_sent == N, 10, "every report")
    publisher.close()

    broker.restart()  # no persistence: every retained message is gone
    wait_for(lambda: (s := fleet.stats()).connected == N and s.subscribed == N, 30, "every device to reconnect")
    assert fleet.stats().connects == 2 * N and fleet.stats().disconnects == N
    # Each device sent its newest report again on connect (retained), as the agent does.
    late = MqttWatcher(broker, [f"{PREFIX}/devices/+/reported"], client_id="late")
    wait_for(lambda: len(late.messages) == N, 10, "the retained reports")
    assert {ReportedState.FromString(m.payload).generation for m in late.messages} == {3}
    late.close()


def test_shards_in_child_processes_answer_like_one_fleet(broker: Mosquitto, watcher: MqttWatcher) -> None:
    ids = device_ids(N, "shard-")
    with HollowProcess("127.0.0.1", broker.port, ids, topic_prefix=PREFIX, shards=3) as hollow:
        assert len(hollow.pids) == 3
        stats = hollow.stats()
        assert (stats.devices, stats.connected, stats.subscribed) == (N, N, N)
        for device_id in ids:
            watcher.publish(f"{PREFIX}/devices/{device_id}/desired", desired(device_id, 1).SerializeToString())
        wait_for(lambda: all(reports(watcher, d) for d in ids), 10, "every shard's reports")
        assert all(reports(watcher, d)[0].generation == 1 for d in ids)
        assert hollow.stats().reported_sent == N
        assert hollow.stats().cpu_s > 0


def test_a_shard_that_cannot_reach_the_broker_fails_naming_why() -> None:
    port = free_port()  # nothing listens there
    with pytest.raises(RuntimeError, match=r"0 of 2 connected .*after 1 s"):
        HollowProcess("127.0.0.1", port, device_ids(2), timeout=1)


def test_bad_fleet_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="at least one"):
        HollowFleet("127.0.0.1", 1883, [])
    with pytest.raises(ValueError, match="distinct"):
        HollowFleet("127.0.0.1", 1883, ["a", "a"])
    with pytest.raises(ValueError, match="shards"):
        HollowProcess("127.0.0.1", 1883, ["a", "b"], shards=3)


def test_the_benchmark_refuses_bad_arguments() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench.bench_control_fanout", "--devices", "0"],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=60,
    )
    assert done.returncode == 2 and "--devices" in done.stderr


def test_reported_for_maps_roles_to_states_and_keeps_the_digests() -> None:
    state = reported_for(desired("cam-1", 9, "h"))
    assert state.generation == 9 and state.converged and state.policy_hash == "h"
    assert [(m.role, m.state, m.sha256, m.progress) for m in state.models] == [
        (MODEL_ROLE_ACTIVE, MODEL_STATE_ACTIVE, "ab" * 32, 1.0),
        (MODEL_ROLE_SHADOW, MODEL_STATE_READY, "cd" * 32, 1.0),
    ]


def test_device_ids_sort_in_creation_order_and_goals_follow_the_issue() -> None:
    ids = device_ids(12_000)
    assert ids == sorted(ids) and len(set(ids)) == 12_000 and ids[0] == "hollow-00000"
    assert (goal_seconds(50), goal_seconds(1_000), goal_seconds(10_000), goal_seconds(20_000)) == (10, 10, 60, 120)
