"""A real cloud-sync (with its Mosquitto) and one enrolled edge-agent serving digits, scraped over HTTP.

Started once for the package's tests: the scrapes are taken at fixed points (after successful inferences,
before any failure; then after one bad request and the first upload) and kept as text for the checks.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest

from edge_runtime.models.store import ModelStore
from tests.fleet.harness import (
    DYNSEC_PLUGIN,
    FleetAgent,
    FleetCloud,
    enroll_all,
    mint_tokens,
    remove,
    short_socket_dir,
)
from tests.mosquitto import MOSQUITTO
from tests.observability.exposition import samples, scrape_text
from tests.waiting import wait_for


@dataclass
class Scrapes:
    """/metrics pages of both programs, as text."""

    agent_before_failures: str  # after 5 good requests, before any failed one
    agent: str  # after one invalid request and the first upload the cloud acknowledged
    cloud: str  # after that upload


def _broker_missing() -> str:
    if not Path(MOSQUITTO).exists():
        return "mosquitto is not installed"
    if not Path(DYNSEC_PLUGIN).exists() or shutil.which("mosquitto_ctrl") is None:
        return "Mosquitto's dynamic security plugin (and mosquitto_ctrl) is not installed"
    return ""


@pytest.fixture(scope="package")
def scrapes(tmp_path_factory: pytest.TempPathFactory, model_packages: dict[str, Path]) -> Iterator[Scrapes]:
    # MQTT, so that cloud-sync's telemetry subscriber (and its metrics) runs too.
    if missing := _broker_missing():
        pytest.skip(missing)
    workdir = tmp_path_factory.mktemp("observability")
    sockets = short_socket_dir()
    cloud = FleetCloud(workdir / "cloud", "mqtt")
    agent = FleetAgent(
        "cam-1", {"site": "lab"}, workdir / "cam-1", sockets, "mqtt", {"server": {"metrics_address": "127.0.0.1:0"}}
    )
    try:
        cloud.start()
        enroll_all([agent], cloud.grpc_target, mint_tokens(cloud, [agent]))
        store = ModelStore(agent.data_dir / "models")
        store.install(model_packages["digits:1"])
        store.set_active("digits", 1)
        proc = agent.start()
        ready = proc.wait_ready(120)
        agent_url = f"http://127.0.0.1:{ready['metrics_port']}/metrics"
        with agent.client() as client:
            for _ in range(5):
                client.infer("digits", {"pixels": np.zeros((1, 64), np.float32)})
            before = scrape_text(agent_url)
            with pytest.raises(grpc.RpcError) as refused:
                client.infer("digits", {"pixels": np.zeros((1, 3), np.float32)})  # the wrong shape
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT

        def delivered() -> bool:
            return samples(scrape_text(agent_url)).get(("edgefleet_outbox_delivered_total", ()), 0) >= 1

        wait_for(delivered, 60, "the agent's first record acknowledged by cloud-sync")
        yield Scrapes(before, scrape_text(agent_url), scrape_text(f"{cloud.http_url}/metrics"))
    finally:
        agent.kill()
        cloud.close()
        remove(sockets)
