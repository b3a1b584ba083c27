"""Neither program blocks its event loop while everything runs: an agent with MQTT and the uplink enabled,
beside cloud-sync subscribed to the same broker, both in this process on loops in debug mode.

Judged by tests/loopcheck.py: no blocking call (file, SQLite, subprocess) on either loop thread, and no slow
callbacks past its thresholds.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("sqlalchemy", reason="the real cloud-sync needs the [cloud] extra (not in the device's venv)")

import httpx

from edge_runtime.config import AgentConfig
from edge_runtime.kserve import KServeClient
from edge_runtime.policy import parse_policy
from tests.cloud_inprocess import InProcessCloud
from tests.edge_runtime.agent.conftest import RunningAgent
from tests.mosquitto import Mosquitto
from tests.processes import install
from tests.waiting import wait_for

DEVICE = "cam-1"


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    with Mosquitto(tmp_path / "broker", persistence=True) as running:
        yield running


class Traffic:
    """Apps keeping every result over the agent's socket, and an operator polling the admin API."""

    def __init__(self, target: str, api: httpx.Client) -> None:
        self.answered = 0
        self.api_calls = 0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._infer, args=(target,)) for _ in range(3)]
        self._threads.append(threading.Thread(target=self._poll, args=(api,)))
        for t in self._threads:
            t.start()

    def _infer(self, target: str) -> None:
        x = np.random.default_rng(0).integers(0, 17, size=(1, 64)).astype(np.float32)
        with KServeClient(target, timeout_s=30) as client:
            while not self._stop.is_set():
                client.infer("digits", {"pixels": x}, keep=True)
                self.answered += 1

    def _poll(self, api: httpx.Client) -> None:
        while not self._stop.is_set():
            for path in ("/v1/devices", f"/v1/devices/{DEVICE}", "/metrics"):
                assert api.get(path).status_code == 200
                self.api_calls += 1

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)


def test_agent_with_mqtt_and_uplink_and_cloud_sync_with_mqtt_never_block_their_loops(
    make_config: Callable[..., AgentConfig],
    config_data: dict[str, Any],
    model_packages: dict[str, Path],
    run_agent: Callable[..., RunningAgent],
    broker: Mosquitto,
    tmp_path: Path,
) -> None:
    cloud = InProcessCloud(tmp_path / "cloud", mqtt={"url": broker.url, "client_id": "cloud-sync-test"}).start()
    traffic = None
    try:
        token_file = tmp_path / "device-token"
        token_file.write_text(cloud.add_device(DEVICE))
        config = make_config(
            cloud={"grpc_target": cloud.target, "device_id": DEVICE, "token_file": str(token_file)},
            mqtt={"url": broker.url, "keepalive_s": 5},
            upload={"interval_s": 0.05},
            telemetry={"interval_s": 0.1},
            server={"metrics_address": "127.0.0.1:0"},
        )
        install(config_data, model_packages["digits:1"])
        running = run_agent(config)
        admin = (Path(cloud.config.server.data_dir) / "admin-token").read_text().strip()
        api = httpx.Client(base_url=cloud.http_url, headers={"Authorization": f"Bearer {admin}"}, trust_env=False)
        traffic = Traffic(running.agent.endpoints.inference[0], api)
        for interval in (0.2, 0.1):  # a policy change while it all runs
            policy = parse_policy(json.dumps({"telemetry": {"interval_s": interval}}), running.agent.base_policy)
            running.loop.run(running.agent.apply_policy(policy))
        # Everything ran: results uploaded, telemetry through the broker into the store, the API answered.
        wait_for(lambda: len(cloud.stored_seqs(DEVICE)) > 300, 60, "kept results in the cloud")
        wait_for(lambda: (t := cloud.latest_telemetry(DEVICE)) and t.message.seq > 20, 30, "telemetry over MQTT")
        wait_for(lambda: traffic is not None and traffic.api_calls > 30, 30, "admin API calls")
        traffic.stop()
        api.close()
        agent_blocked = running.stop()
    finally:
        if traffic is not None:
            traffic.stop()
        cloud.close()
    assert not agent_blocked, f"the agent blocked its loop: {agent_blocked}"
    assert not cloud.blocked, f"cloud-sync blocked its loop: {cloud.blocked}"
