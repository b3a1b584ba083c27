"""`edge-agent status` asking a running agent over its Unix socket (edgefleet.v1.AgentAdmin/Status), the
agent's metrics port answering /metrics only, and the status of an agent that is not running."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edge_runtime.agent.status import NOT_RUNNING, as_json, render
from edge_runtime.config import load_config
from edgefleet.proto.edgefleet.v1 import admin_pb2, state_pb2
from tests.edge_runtime.agent.conftest import RunningAgent, run_cli, run_cli_all
from tests.processes import install


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _http_status(url: str, method: str = "GET") -> tuple[int, str]:
    request = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(request, timeout=5) as page:
            return page.status, page.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_status_reports_the_running_agent_and_metrics_answer_only_metrics(
    agent_config: dict[str, Any],
    write_config: Callable[..., Path],
    run_agent: Callable[..., RunningAgent],
    model_packages: dict[str, Path],
    tmp_path: Path,
) -> None:
    token = tmp_path / "device-token"
    token.write_text("test-token\n")
    # A cloud that is not there: the uplink and the gRPC control stream are configured and not connected.
    agent_config["cloud"] = {
        "grpc_target": f"127.0.0.1:{_closed_port()}",
        "device_id": "dev-1",
        "token_file": str(token),
    }
    install(agent_config, model_packages["digits:1"])
    path = write_config(agent_config)
    running = run_agent(load_config(path))

    runs = run_cli_all({"text": ["status", "--config", path], "json": ["status", "--config", path, "--json"]})
    assert runs["json"].returncode == 0, runs["json"].stderr
    data = json.loads(runs["json"].stdout)
    assert data["device_id"] == "dev-1" and data["ready"] is True and data["unhealthy"] == ""
    (model,) = data["serving"]
    assert (model["name"], model["version"], model["state"], model["active"]) == ("digits", 1, "READY", True)
    assert model["queue_depth"] == 0 and model["running_batch_s"] == 0.0
    assert isinstance(data["desired_generation"], int) and data["desired_generation"] == 0
    assert isinstance(data["outbox"]["depth"], int) and isinstance(data["outbox"]["upload_lag_s"], float)
    assert data["outbox"]["max_bytes"] == running.agent.config.buffer.max_bytes
    assert (data["uplink"]["configured"], data["uplink"]["connected"]) == (True, False)
    assert (data["control"]["kind"], data["control"]["configured"], data["control"]["connected"]) == (
        "grpc",
        True,
        False,
    )
    assert data["uptime_s"] > 0

    text = runs["text"]
    assert text.returncode == 0, text.stderr
    assert "ready      yes" in text.stdout and "health     ok" in text.stdout
    assert "uplink     grpc 127.0.0.1:" in text.stdout
    assert "control    grpc 127.0.0.1:" in text.stdout and "NOT connected" in text.stdout
    assert "digits  1        READY  yes" in text.stdout

    metrics = f"http://127.0.0.1:{running.agent.endpoints.metrics_port}"
    status, body = _http_status(f"{metrics}/metrics")
    assert status == 200 and "edgefleet_" in body
    assert _http_status(f"{metrics}/metrics?name[]=x")[0] == 200
    for path_ in ("/", "/healthz", "/metrics/", "/favicon.ico"):
        status, body = _http_status(f"{metrics}{path_}")
        assert status == 404 and "/metrics only" in body, path_
    assert _http_status(f"{metrics}/metrics", "POST")[0] == 405
    assert running.stop() == []

    gone = run_cli("status", "--config", path)
    assert gone.returncode == 1
    assert NOT_RUNNING in gone.stderr and f"unix:{agent_config['server']['unix_socket']}" in gone.stderr


def test_status_of_a_config_nothing_listens_for_exits_1_naming_the_address(
    config_data: dict[str, Any], write_config: Callable[..., Path]
) -> None:
    config_data["server"]["tcp_address"] = f"127.0.0.1:{_closed_port()}"
    path = write_config(config_data)
    result = run_cli("status", "--config", path, "--timeout", "2")
    assert result.returncode == 1
    assert "is the agent running? (systemctl status edge-agent)" in result.stderr
    assert (
        config_data["server"]["unix_socket"] in result.stderr and config_data["server"]["tcp_address"] in result.stderr
    )


def test_as_json_keeps_64_bit_integers_as_ints_and_enums_by_name() -> None:
    status = admin_pb2.AgentStatus(
        desired_generation=2**40,
        outbox=admin_pb2.OutboxStatus(depth=3, acked_seq=2**33),
        uplink=admin_pb2.LinkStatus(last_success_ms=1_700_000_000_000),
        converging=[state_pb2.ModelStatus(name="m", version=2, state=state_pb2.MODEL_STATE_FAILED, reason="x")],
    )
    data = as_json(status)
    assert data["desired_generation"] == 2**40 and data["outbox"]["acked_seq"] == 2**33
    assert data["uplink"]["last_success_ms"] == 1_700_000_000_000
    assert data["converging"][0]["state"] == "MODEL_STATE_FAILED" and data["converging"][0]["version"] == 2
    assert data["serving"] == [] and data["uptime_s"] == 0.0 and isinstance(data["uptime_s"], float)
    json.dumps(data)  # plain JSON data throughout


def test_render_shows_failed_assignments_with_their_reason() -> None:
    status = admin_pb2.AgentStatus(
        agent_version="1.0",
        uptime_s=7300,
        unhealthy="engine of m:1 has been running one batch for 90 s (limit 60 s)",
        desired_generation=7,
        converging=[
            state_pb2.ModelStatus(
                name="m", version=2, role=state_pb2.MODEL_ROLE_ACTIVE, state=state_pb2.MODEL_STATE_FAILED, reason="bad"
            )
        ],
    )
    text = render(status)
    assert "up 2 h 1 min" in text and "UNHEALTHY: engine of m:1" in text
    assert "desired    generation 7" in text and "no models loaded" in text
    assert "m         2        ACTIVE  FAILED  0%                   bad" in text  # PRECISION empty
