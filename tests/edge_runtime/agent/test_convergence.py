"""The agent converging to its desired state: a real Mosquitto carries the desired and reported states, a real
Artifacts server on loopback (tests/edge_runtime/control/artifacts_server.py) serves the signed packages.

In-process agents (loop judged by the loop check) for the loop, and agent processes killed with SIGKILL for
what survives a crash.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_runtime.config import AgentConfig
from edge_runtime.kserve import KServeClient
from edge_runtime.models.store import ModelStore
from edgefleet.proto.edgefleet.v1.state_pb2 import (
    MODEL_ROLE_ACTIVE,
    MODEL_STATE_ACTIVE,
    DesiredState,
    ModelAssignment,
    ReportedState,
)
from tests.edge_runtime.agent.conftest import RunningAgent
from tests.edge_runtime.control.artifacts_server import TOKEN, ArtifactsServer, ScriptedArtifacts, Signer
from tests.edge_runtime.control.test_converge import package_files, sha
from tests.mosquitto import Mosquitto, MqttWatcher
from tests.processes import install
from tests.waiting import wait_for

DEVICE = "cam-1"
TOPICS = f"edgefleet/v1/devices/{DEVICE}"


@pytest.fixture
def signer() -> Signer:
    return Signer()


@pytest.fixture
def artifacts(model_packages: dict[str, Path], signer: Signer) -> Iterator[tuple[ScriptedArtifacts, str]]:
    scripted = ScriptedArtifacts()
    for ref in ("digits:1", "digits:2"):
        manifest, files = package_files(model_packages[ref])
        scripted.add(manifest["name"], manifest["version"], signer.sign(manifest), files)
    server = ArtifactsServer(scripted).start()
    yield scripted, server.target
    server.close()


def device_sections(tmp_path: Path, broker_url: str, target: str, signer: Signer, data_dir: Path) -> dict[str, Any]:
    """An enrolled device's config: token, broker, cloud-sync's address, and the fleet key where enroll puts it."""
    token_file = tmp_path / "device-token"
    token_file.write_text(TOKEN + "\n")
    (data_dir / "identity").mkdir(parents=True, exist_ok=True)
    (data_dir / "identity" / "fleet-signing.pub").write_bytes(signer.public_key)
    return {
        "cloud": {"grpc_target": target, "device_id": DEVICE, "token_file": str(token_file)},
        "mqtt": {"url": broker_url, "keepalive_s": 5},
        "upload": {"sample_rate": 0.0},
    }


def digits_v2(model_packages: dict[str, Path], generation: int = 1) -> DesiredState:
    return DesiredState(
        device_id=DEVICE,
        generation=generation,
        models=[
            ModelAssignment(name="digits", version=2, role=MODEL_ROLE_ACTIVE, sha256=sha(model_packages, "digits:2"))
        ],
        policy_hash=f"h{generation}",
    )


def reported_on(watcher: MqttWatcher) -> list[ReportedState]:
    return [ReportedState.FromString(m.payload) for m in watcher.on(f"{TOPICS}/reported")]


def converged_on(watcher: MqttWatcher, generation: int) -> ReportedState | None:
    done = [r for r in reported_on(watcher) if r.generation == generation and r.converged]
    return done[-1] if done else None


def test_an_assigned_version_reaches_the_agent_serves_and_after_a_restart_offline_serves_at_once(
    make_config: Callable[..., AgentConfig],
    config_data: dict[str, Any],
    model_packages: dict[str, Path],
    run_agent: Callable[..., RunningAgent],
    artifacts: tuple[ScriptedArtifacts, str],
    signer: Signer,
    tmp_path: Path,
) -> None:
    scripted, target = artifacts
    data_dir = Path(config_data["agent"]["data_dir"])
    install(config_data, model_packages["digits:1"])
    with Mosquitto(tmp_path / "broker") as broker:
        config = make_config(**device_sections(tmp_path, broker.url, target, signer, data_dir))
        cloud = MqttWatcher(broker, [f"{TOPICS}/reported"], client_id="cloud-sync-test")
        running = run_agent(config)
        try:
            cloud.publish(f"{TOPICS}/desired", digits_v2(model_packages).SerializeToString(), retain=True)
            report = wait_for(lambda: converged_on(cloud, 1), 60, "generation 1 converged")
            assert report is not None
            assert [(m.name, m.version, m.state) for m in report.models] == [("digits", 2, MODEL_STATE_ACTIVE)]
            assert report.models[0].backend.startswith("onnxruntime") and report.policy_hash == "h1"
            assert running.agent.repository.active_version("digits") == 2
            x = np.zeros((1, 64), dtype=np.float32)
            with KServeClient(running.agent.endpoints.inference[0], timeout_s=10) as client:
                assert client.infer("digits", {"pixels": x}).model_version == "2"
        finally:
            blocked = running.stop()
            cloud.close()
        assert not blocked, f"the agent blocked its loop: {blocked}"
    downloads = len(scripted.requests)

    # Cloud and broker gone: the restarted agent serves its last ACTIVE version at once, downloads nothing.
    began = time.monotonic()
    again = run_agent(config)
    seconds = time.monotonic() - began
    try:
        assert seconds < 1.5, f"READY after {seconds:.2f} s"
        assert again.agent.repository.active_version("digits") == 2
        wait_for(lambda: again.agent.converger.converged, 10, "the persisted state converged")
        assert again.agent.applied_generation == 1 and len(scripted.requests) == downloads
    finally:
        assert not again.stop()


@pytest.mark.slow
def test_an_agent_killed_while_downloading_converges_on_its_next_start_with_one_version_active(
    agent_config: dict[str, Any],
    write_config: Callable[..., Path],
    agent_processes: Callable[..., Any],
    model_packages: dict[str, Path],
    artifacts: tuple[ScriptedArtifacts, str],
    signer: Signer,
    tmp_path: Path,
) -> None:
    scripted, target = artifacts
    scripted.faults.stall_after = [4096]
    data_dir = Path(agent_config["agent"]["data_dir"])
    install(agent_config, model_packages["digits:1"])
    with Mosquitto(tmp_path / "broker") as broker:
        agent_config.update(device_sections(tmp_path, broker.url, target, signer, data_dir))
        config_path = write_config(agent_config)
        cloud = MqttWatcher(broker, [f"{TOPICS}/reported"], client_id="cloud-sync-test")
        try:
            cloud.publish(f"{TOPICS}/desired", digits_v2(model_packages).SerializeToString(), retain=True)
            first = agent_processes(config_path)
            first.wait_event("control.desired_applied", 60)
            wait_for(lambda: scripted.requests, 30, "the download to start")
            first.kill()  # SIGKILL, mid-download
            store = ModelStore(data_dir / "models")
            assert store.active("digits").version == 1  # type: ignore[union-attr]

            second = agent_processes(config_path)
            second.wait_event("model.converged", 60)
            report = wait_for(lambda: converged_on(cloud, 1), 30, "generation 1 converged after the restart")
            assert report is not None
            assert [(m.version, m.state) for m in report.models] == [(2, MODEL_STATE_ACTIVE)]
            assert store.active("digits").version == 2 and store.versions("digits") == [1, 2]  # type: ignore[union-attr]
            second.signal()
            assert second.finish(30) == 0
        finally:
            cloud.close()
