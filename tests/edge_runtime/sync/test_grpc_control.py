"""GrpcControl against a real cloud-sync (in this process, on its own loop): the control transport with no broker.

Both loops run in debug mode and are judged by tests/loopcheck.py. The cloud is stopped and started again on
the same port to see the stream come back and resume from the generation the device knows.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

pytest.importorskip("sqlalchemy", reason="the real cloud-sync needs the [cloud] extra (not in the device's venv)")

from edge_runtime.config import CloudSection
from edge_runtime.errors import ConfigError
from edge_runtime.sync.grpc_control import GrpcControl
from edgefleet.proto.edgefleet.v1.state_pb2 import DesiredState, ReportedState
from tests.cloud_inprocess import InProcessCloud
from tests.edge_runtime.sync.device_process import telemetry
from tests.loopcheck import LoopThread
from tests.waiting import wait_for

DEVICE = "cam-1"
MakeControl = Callable[..., GrpcControl]


@pytest.fixture
def cloud(tmp_path: Path) -> Iterator[InProcessCloud]:
    running = InProcessCloud(tmp_path / "cloud").start()
    yield running
    running.close()
    assert not running.blocked, f"cloud-sync blocked its loop: {running.blocked}"


class Desired:
    """A desired-state handler that records each state and the thread it was called on."""

    def __init__(self) -> None:
        self.states: list[DesiredState] = []
        self.threads: set[str] = set()

    def __call__(self, state: DesiredState) -> None:
        self.states.append(state)
        self.threads.add(threading.current_thread().name)

    def generations(self) -> list[int]:
        return [s.generation for s in self.states]


@pytest.fixture
def make_control(loop: LoopThread) -> Iterator[MakeControl]:
    """make_control(target, token, on_desired) -> a started GrpcControl on the test's agent loop."""
    made: list[GrpcControl] = []

    def make(target: str, token: str, on_desired: Desired | None = None, **options: object) -> GrpcControl:
        control = GrpcControl(CloudSection(grpc_target=target), DEVICE, token, **options)  # type: ignore[arg-type]
        made.append(control)
        loop.call(control.start, on_desired)
        return control

    yield make
    for control in made:
        loop.run(control.aclose())


def publish_telemetry(loop: LoopThread, control: GrpcControl, seq: int) -> None:
    loop.call(control.publish_telemetry, telemetry(DEVICE, seq, 1_700_000_000_000, 1.0).SerializeToString())


def test_connected_online_and_what_the_device_sends_is_stored(
    cloud: InProcessCloud, make_control: MakeControl, loop: LoopThread
) -> None:
    token = cloud.add_device(DEVICE)
    desired = Desired()
    control = make_control(cloud.target, token, desired)
    wait_for(lambda: control.connected, 10, "the stream to open")
    presence = cloud.presence(DEVICE)
    assert presence is not None and presence.online  # the cloud wrote it before the device counted itself in

    cloud.control.set_desired(DEVICE, DesiredState(policy_json='{"telemetry": {"interval_s": 2}}'))
    wait_for(lambda: desired.states, 10, "the desired state")
    assert desired.generations() == [1] and desired.threads == {"test-agent-loop"}  # handed over on the loop
    assert control.known_generation == 1

    publish_telemetry(loop, control, 1)
    loop.call(control.publish_reported, ReportedState(device_id=DEVICE, generation=1, policy_hash="h"))
    wait_for(lambda: cloud.latest_telemetry(DEVICE), 10, "the telemetry in the cloud store")
    stored = wait_for(lambda: cloud.reported(DEVICE), 10, "the reported state in the cloud store")
    assert (stored.state.generation, stored.state.policy_hash) == (1, "h")
    # Counted when the cloud's answer is back, a moment after the cloud stored it.
    wait_for(lambda: control.counters().reported_sent and control.counters().telemetry_sent, 10, "the answers")
    counters = control.counters()
    assert (counters.connects, counters.desired_received, counters.telemetry_sent, counters.reported_sent) == (
        1,
        1,
        1,
        1,
    )

    loop.run(control.aclose())
    wait_for(lambda: not cloud.presence(DEVICE).online, 10, "offline once the device closed its stream")  # type: ignore[union-attr]


def test_after_cloud_sync_restarts_the_stream_resumes_and_only_the_newest_telemetry_goes(
    cloud: InProcessCloud, make_control: MakeControl, loop: LoopThread
) -> None:
    token = cloud.add_device(DEVICE)
    # A policy for the whole fleet: the desired state cloud-sync's reconciler computes from it (and computes
    # again, unchanged, in its pass at the restart below).
    assert cloud.app is not None
    cloud.app.policy_store.set("fleet", {}, 0, {"telemetry": {"interval_s": 2.0}})
    cloud.app.on_policy_change()
    desired = Desired()
    control = make_control(cloud.target, token, desired)
    wait_for(lambda: desired.generations() == [1], 10, "the first desired state")

    cloud.stop()
    wait_for(lambda: not control.connected, 10, "the device to notice")
    for seq in (2, 3, 4):  # the agent keeps collecting while the cloud is away: only the newest is kept
        publish_telemetry(loop, control, seq)
    cloud.start()
    wait_for(lambda: control.connected, 30, "the stream to come back")
    latest = wait_for(lambda: cloud.latest_telemetry(DEVICE), 10, "the held telemetry")
    assert latest.message.seq == 4
    wait_for(lambda: control.counters().telemetry_sent == 1, 10, "the cloud's answer")
    assert control.counters().telemetry_replaced == 2
    # Resumed from generation 1: the same state is not sent again, the next one is.
    assert control.counters().connects == 2 and desired.generations() == [1]
    cloud.control.set_desired(DEVICE, DesiredState(policy_hash="g2"))
    wait_for(lambda: desired.generations() == [1, 2], 10, "the next desired state")


def test_a_revoked_device_is_refused_and_retries_only_at_the_backoff_cap(
    cloud: InProcessCloud, make_control: MakeControl
) -> None:
    from edge_runtime.sync.uplink import Backoff

    token = cloud.add_device(DEVICE)
    cloud.revoke(DEVICE)
    with capture_logs() as logs:
        control = make_control(cloud.target, token, backoff=Backoff(base_s=0.01, cap_s=60))
        # The device's event (cloud-sync's own, in this process too, names the method instead of a code).
        refused = wait_for(
            lambda: [e for e in logs if e["event"] == "control.refused" and "code" in e], 10, "the refusal logged"
        )
    # Not the 0.01 s the backoff would start from: a person must enrol the device again.
    assert [(e["code"], e["retry_in_s"]) for e in refused] == [("PERMISSION_DENIED", 60)]
    assert "revoked" in refused[0]["details"]
    assert not control.connected and control.counters().connects == 0
    assert cloud.presence(DEVICE) is None


def test_a_message_the_cloud_refuses_is_dropped_not_retried(
    cloud: InProcessCloud, make_control: MakeControl, loop: LoopThread
) -> None:
    token = cloud.add_device(DEVICE)
    control = make_control(cloud.target, token)
    wait_for(lambda: control.connected, 10, "the stream to open")
    with capture_logs() as logs:
        # Names another device: the cloud answers INVALID_ARGUMENT, and sending it again would change nothing.
        loop.call(control.publish_reported, ReportedState(device_id="cam-2"))
        wait_for(lambda: control.counters().refused == 1, 10, "the refusal")
        publish_telemetry(loop, control, 1)
        wait_for(lambda: control.counters().telemetry_sent == 1, 10, "the next message to go")
    (event,) = [e for e in logs if e["event"] == "control.message_refused"]
    assert event["code"] == "INVALID_ARGUMENT" and "names device 'cam-2'" in event["details"]
    assert control.counters().reported_sent == 0 and cloud.reported(DEVICE) is None


def test_plaintext_to_a_remote_cloud_is_a_config_error_when_made() -> None:
    with pytest.raises(ConfigError, match="not loopback: set cloud.ca_file"):
        GrpcControl(CloudSection(grpc_target="cloud.example.com:7000"), DEVICE, "efd_x")
