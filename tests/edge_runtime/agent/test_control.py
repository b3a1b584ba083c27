"""The agent on its control transport: which one it picks, presence, telemetry, and desired state in, reported out.

In-process agents (loop in debug mode, judged by the loop check) against a real cloud-sync in this process or a
real Mosquitto; one test runs both programs as real processes.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_runtime.config import AgentConfig
from edge_runtime.errors import ConfigError
from edge_runtime.kserve import KServeClient
from edge_runtime.sync.grpc_control import GrpcControl
from edge_runtime.sync.mqtt import MqttLink
from edge_runtime.sync.transports import open_control
from edgefleet.proto.edgefleet.v1.state_pb2 import (
    MODEL_ROLE_ACTIVE,
    MODEL_STATE_ACTIVE,
    DesiredState,
    ReportedState,
)
from tests.edge_runtime.agent.conftest import RunningAgent
from tests.mosquitto import Mosquitto, MqttWatcher
from tests.processes import install
from tests.waiting import wait_for

DEVICE = "cam-1"
TOPICS = f"edgefleet/v1/devices/{DEVICE}"


# -- which transport -------------------------------------------------------------------------------------


def test_a_broker_means_mqtt_a_cloud_alone_means_the_grpc_stream_and_neither_means_none(
    make_config: Callable[..., AgentConfig],
) -> None:
    both = make_config(cloud={"grpc_target": "127.0.0.1:7000", "device_id": DEVICE}, mqtt={"url": "mqtt://127.0.0.1"})
    assert isinstance(open_control(both, "efd_token"), MqttLink)
    cloud_only = make_config(cloud={"grpc_target": "127.0.0.1:7000", "device_id": DEVICE})
    assert isinstance(open_control(cloud_only, "efd_token"), GrpcControl)
    assert open_control(make_config(), None) is None


@pytest.mark.parametrize(
    ("sections", "token", "says"),
    [
        ({"mqtt": {"url": "mqtt://127.0.0.1"}}, None, "mqtt.url is set but cloud.device_id is not"),
        ({"cloud": {"grpc_target": "127.0.0.1:7000"}}, "efd_x", "cloud.grpc_target is set but cloud.device_id"),
        ({"cloud": {"grpc_target": "127.0.0.1:7000", "device_id": DEVICE}}, None, "cloud.token_file is not set"),
        ({"mqtt": {"url": "http://broker"}, "cloud": {"device_id": DEVICE}}, None, "mqtt.url"),
    ],
    ids=["broker-without-device-id", "cloud-without-device-id", "cloud-without-token", "bad-broker-url"],
)
def test_a_control_config_that_cannot_work_is_a_config_error_naming_the_key(
    make_config: Callable[..., AgentConfig], sections: dict[str, Any], token: str | None, says: str
) -> None:
    with pytest.raises(ConfigError, match=says):
        open_control(make_config(**sections), token)


# -- over gRPC, with cloud-sync ------------------------------------------------------------------------------


@pytest.fixture
def cloud(tmp_path: Path) -> Iterator[Any]:
    pytest.importorskip("sqlalchemy", reason="the real cloud-sync needs the [cloud] extra (not in the device's venv)")
    from tests.cloud_inprocess import InProcessCloud

    running = InProcessCloud(tmp_path / "cloud").start()
    yield running
    running.close()
    assert not running.blocked, f"cloud-sync blocked its loop: {running.blocked}"


def infer_a_few(agent: RunningAgent, n: int = 5) -> None:
    x = np.random.default_rng(0).integers(0, 17, size=(1, 64)).astype(np.float32)
    with KServeClient(agent.agent.endpoints.inference[0], timeout_s=10) as client:
        for _ in range(n):
            client.infer("digits", {"pixels": x})


def test_without_a_broker_the_agent_is_online_and_follows_the_cloud_over_grpc(
    make_config: Callable[..., AgentConfig],
    config_data: dict[str, Any],
    model_packages: dict[str, Path],
    run_agent: Callable[..., RunningAgent],
    cloud: Any,
    tmp_path: Path,
) -> None:
    token_file = tmp_path / "device-token"
    token_file.write_text(cloud.add_device(DEVICE) + "\n")
    config = make_config(
        cloud={"grpc_target": cloud.target, "device_id": DEVICE, "token_file": str(token_file)},
        upload={"interval_s": 0.05, "sample_rate": 0.0},
        telemetry={"interval_s": 0.2},
    )
    install(config_data, model_packages["digits:1"])
    running = run_agent(config)
    agent = running.agent
    wait_for(lambda: (p := cloud.presence(DEVICE)) is not None and p.online, 10, "the device online in the cloud")
    infer_a_few(running)
    wait_for(
        lambda: (t := cloud.latest_telemetry(DEVICE)) and sum(m.requests for m in t.message.models) > 0,
        10,
        "telemetry that counts the requests",
    )
    assert cloud.stored_seqs(DEVICE) == [1]  # the model's activation event; no sample at rate 0

    policy = {"upload": {"sample_rate": 1.0, "batch_max_records": 7}}
    cloud.control.set_desired(DEVICE, DesiredState(policy_json=json.dumps(policy), policy_hash="h1"))
    report = wait_for(lambda: cloud.reported(DEVICE), 10, "the reported state")
    assert (report.state.generation, report.state.policy_hash, report.state.error) == (1, "h1", "")
    (model,) = report.state.models
    assert (model.name, model.version, model.role, model.state) == ("digits", 1, MODEL_ROLE_ACTIVE, MODEL_STATE_ACTIVE)
    assert report.state.agent.agent_version and report.state.agent.onnxruntime_version
    assert agent.keeper.sample_rate == 1.0 and agent.uploader.policy.batch_max_records == 7
    infer_a_few(running, 20)
    wait_for(lambda: len(cloud.stored_seqs(DEVICE)) >= 21, 20, "the sampled results uploaded")

    # A policy the device's types refuse: reported with the reason naming the key, nothing changes.
    cloud.control.set_desired(DEVICE, DesiredState(policy_json='{"inference": {"max_batch_sze": 8}}'))
    refused = wait_for(lambda: (r := cloud.reported(DEVICE)) and r.state.error and r, 10, "the refusal reported")
    assert refused.state.generation == 1 and "inference.max_batch_sze" in refused.state.error
    assert agent.applied_generation == 1 and agent.keeper.sample_rate == 1.0

    blocked = running.stop()
    assert not blocked, f"the agent blocked its loop: {blocked}"
    wait_for(lambda: not cloud.presence(DEVICE).online, 10, "offline once the agent stopped")


# -- over MQTT -------------------------------------------------------------------------------------------


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    with Mosquitto(tmp_path / "broker") as running:
        yield running


def reported_on(watcher: MqttWatcher) -> list[ReportedState]:
    return [ReportedState.FromString(m.payload) for m in watcher.on(f"{TOPICS}/reported")]


def test_with_a_broker_the_agent_takes_its_desired_state_from_mqtt_and_reports_it_retained(
    make_config: Callable[..., AgentConfig],
    config_data: dict[str, Any],
    model_packages: dict[str, Path],
    run_agent: Callable[..., RunningAgent],
    broker: Mosquitto,
) -> None:
    install(config_data, model_packages["digits:1"])
    cloud = MqttWatcher(broker, [f"{TOPICS}/reported", f"{TOPICS}/status"], client_id="cloud-sync-test")
    desired = DesiredState(device_id=DEVICE, generation=3, policy_json='{"upload": {"sample_rate": 0.25}}')
    cloud.publish(f"{TOPICS}/desired", desired.SerializeToString(), retain=True)  # set before the agent runs
    running = run_agent(make_config(cloud={"device_id": DEVICE}, mqtt={"url": broker.url, "keepalive_s": 5}))
    agent = running.agent
    try:
        wait_for(lambda: reported_on(cloud), 10, "the reported state")
        (first,) = reported_on(cloud)
        assert (first.generation, first.error) == (3, "") and agent.keeper.sample_rate == 0.25

        # Another device's state on this device's topic (a broker ACL gone wrong): refused, reported, ignored.
        stray = DesiredState(device_id="cam-2", generation=9, policy_json='{"upload": {"sample_rate": 1.0}}')
        cloud.publish(f"{TOPICS}/desired", stray.SerializeToString())
        wait_for(lambda: len(reported_on(cloud)) == 2, 10, "the refusal")
        assert reported_on(cloud)[1].generation == 3 and "'cam-2'" in reported_on(cloud)[1].error
        # The same generation again (every reconnect brings the retained copy): nothing to do, nothing reported.
        cloud.publish(f"{TOPICS}/desired", desired.SerializeToString())
        newer = DesiredState(device_id=DEVICE, generation=4, policy_json="")
        cloud.publish(f"{TOPICS}/desired", newer.SerializeToString())
        wait_for(lambda: len(reported_on(cloud)) == 3, 10, "the next report")
        assert reported_on(cloud)[2].generation == 4 and agent.keeper.sample_rate == 0.0  # back to the file's
        assert cloud.on(f"{TOPICS}/reported")[-1].content_type == "edgefleet.v1.ReportedState"
    finally:
        blocked = running.stop()
        cloud.close()
    assert not blocked, f"the agent blocked its loop: {blocked}"


def test_an_older_desired_state_arriving_right_behind_a_newer_one_is_never_applied_over_it(
    make_config: Callable[..., AgentConfig],
    config_data: dict[str, Any],
    model_packages: dict[str, Path],
    run_agent: Callable[..., RunningAgent],
    broker: Mosquitto,
) -> None:
    """Generation 6 (an inference change, applied on the loader thread) and then 5 arrive back to back, as two
    cloud-sync replicas racing could send them: both pass the generation check before either applied, unless
    states converge one at a time. The device must end on 6."""
    install(config_data, model_packages["digits:1"])
    cloud = MqttWatcher(broker, [f"{TOPICS}/reported"], client_id="cloud-sync-test")
    running = run_agent(make_config(cloud={"device_id": DEVICE}, mqtt={"url": broker.url, "keepalive_s": 5}))
    agent = running.agent
    try:
        wait_for(lambda: agent.control is not None and agent.control.connected, 10, "the agent on the broker")
        newer = DesiredState(device_id=DEVICE, generation=6, policy_json='{"inference": {"max_queue_depth": 77}}')
        older = DesiredState(device_id=DEVICE, generation=5, policy_json='{"inference": {"max_queue_depth": 55}}')
        cloud.publish(f"{TOPICS}/desired", newer.SerializeToString())
        cloud.publish(f"{TOPICS}/desired", older.SerializeToString())
        wait_for(lambda: agent.applied_generation == 6, 10, "generation 6 applied")
        # Generation 5 was refused as old: a probe published after it is handled after it.
        probe = DesiredState(device_id=DEVICE, generation=7, policy_json='{"inference": {"max_queue_depth": 77}}')
        cloud.publish(f"{TOPICS}/desired", probe.SerializeToString())
        wait_for(lambda: agent.applied_generation == 7, 10, "the probe applied")
        assert agent.policy.inference.max_queue_depth == 77
        wait_for(lambda: len(reported_on(cloud)) >= 2, 10, "the reports")
        assert [r.generation for r in reported_on(cloud)] == [6, 7]
    finally:
        blocked = running.stop()
        cloud.close()
    assert not blocked, f"the agent blocked its loop: {blocked}"


# -- both programs as real processes -------------------------------------------------------------------------


@pytest.mark.slow
def test_edge_agent_process_follows_a_desired_state_set_in_the_cloud_sync_process(
    agent_config: dict[str, Any],
    write_config: Callable[..., Path],
    agent_processes: Callable[..., Any],
    model_packages: dict[str, Path],
    tmp_path: Path,
) -> None:
    pytest.importorskip("sqlalchemy", reason="the real cloud-sync needs the [cloud] extra (not in the device's venv)")
    from cloud_sync.store import open_database
    from cloud_sync.store.control import ControlStore
    from tests.faults.fleet import Cloud

    cloud = Cloud(tmp_path / "cloud")
    cloud.start()
    db = None
    try:
        token_file = tmp_path / "device-token"
        token_file.write_text(cloud.add_device(DEVICE))
        agent_config["cloud"] = {"grpc_target": cloud.target, "device_id": DEVICE, "token_file": str(token_file)}
        agent_config["telemetry"] = {"interval_s": 0.5}
        install(agent_config, model_packages["digits:1"])
        agent = agent_processes(write_config(agent_config))
        agent.wait_ready(60)
        wait_for(lambda: (t := cloud.telemetry(DEVICE))[0] is not None and t[1].online, 30, "telemetry and presence")
        # Written by another process than cloud-sync: its open stream finds it by polling (every 2 s).
        db = open_database(cloud.url, create=False)
        ControlStore(db).set_desired(DEVICE, DesiredState(policy_json='{"telemetry": {"interval_s": 5}}'))
        applied = agent.wait_event("control.desired_applied", 30)
        assert applied["generation"] == 1
        report = wait_for(lambda: ControlStore(db).reported(DEVICE), 10, "the reported state")  # type: ignore[union-attr]
        assert report.state.generation == 1 and report.state.error == ""
        agent.signal()
        assert agent.finish(30) == 0
        wait_for(lambda: not cloud.telemetry(DEVICE)[1].online, 10, "offline after the agent stopped")
    finally:
        if db is not None:
            db.close()
        cloud.kill()
