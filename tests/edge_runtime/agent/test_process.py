"""`edge-agent run` as a real process: serving, metrics, draining on SIGTERM, restarts, socket ownership."""

from __future__ import annotations

import json
import signal
import stat
import time
import urllib.request
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from multiprocessing import shared_memory
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from edge_runtime.inference.types import InferRequest
from edge_runtime.kserve import KServeClient
from edge_runtime.models.repository import ModelRepository
from edgefleet.proto.inference import grpc_service_pb2 as pb
from edgefleet.proto.inference import grpc_service_pb2_grpc as pb_grpc
from models.build import digits_holdout
from tests.edge_runtime.agent.conftest import run_cli_all
from tests.edge_runtime.kserve.test_http import UnixHTTPConnection
from tests.processes import AgentProcess, install, toml_text
from tests.waiting import wait_for

StartAgent = Callable[..., AgentProcess]
WriteConfig = Callable[..., Path]


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample on the agent's /metrics page, keyed by (name, sorted labels)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def labels(model: str, version: str) -> tuple[tuple[str, str], ...]:
    return (("model", model), ("version", version))


def test_serves_inference_and_metrics(
    agent_config: dict[str, Any],
    write_config: WriteConfig,
    agent_processes: StartAgent,
    model_packages: dict[str, Path],
    make_config: Callable[..., Any],
    tmp_path: Path,
) -> None:
    install(agent_config, model_packages["digits:1"])
    agent = agent_processes(write_config(agent_config))
    listening = agent.wait_event("server.listening")
    ready = agent.wait_ready()
    unix_target, tcp_target = ready["listen"]
    assert listening["targets"] == ready["listen"]
    assert unix_target == f"unix:{agent_config['server']['unix_socket']}"
    host, port = tcp_target.rsplit(":", 1)
    assert host == "127.0.0.1" and int(port) > 0  # port 0 resolved to the one the OS chose
    assert ready["metrics_port"] > 0
    assert ready["models"] == ["ModelStatus(digits:1 READY active)"]

    pixels, labels_ = digits_holdout()
    batch = pixels[:40]
    # The in-process API on its own data dir: the same package must give the same answer.
    local = ModelRepository(make_config(agent={"data_dir": str(tmp_path / "in-process")}))
    local.install(model_packages["digits:1"])
    try:
        expected = local.infer(InferRequest("digits", {"pixels": batch})).outputs["probabilities"]
    finally:
        local.close()

    for target in (unix_target, tcp_target):
        with KServeClient(target, timeout_s=10) as client:
            assert wait_for(client.ready, 10, f"ServerReady on {target}")
            reply = client.infer("digits", {"pixels": batch})
            assert reply.model_name == "digits" and reply.model_version == "1"
            got = reply.outputs["probabilities"]
            assert got.shape == (40, 10)
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
            assert np.mean(np.argmax(got, axis=1) == labels_[:40]) > 0.7  # a digits model, not noise
    with KServeClient(unix_target, timeout_s=10) as client:
        for row in pixels[40:43]:
            client.infer("digits", {"pixels": row[None, :]})

    metrics = scrape(ready["metrics_port"])
    # 2 batched requests + 3 single rows: requests are counted, not rows; ServerReady is not a request.
    assert metrics[("edgefleet_inference_request_success_total", labels("digits", "1"))] == 5
    assert metrics[("edgefleet_inference_count_total", labels("digits", "1"))] == 83
    assert metrics[("edgefleet_model_ready", labels("digits", "1"))] == 1
    assert metrics[("edgefleet_inference_pending_requests", labels("digits", "1"))] == 0
    # The outbox's ledger is on the page too: with no uplink, all it produced (the activation event) is held.
    produced = metrics[("edgefleet_outbox_produced_total", ())]
    assert produced >= 1 and metrics[("edgefleet_outbox_depth", ())] == produced

    agent.signal(signal.SIGTERM)
    assert agent.finish(15) == 0
    assert agent.not_json == []  # every line on stdout is one JSON object
    for event in agent.events:
        assert {"event", "level", "timestamp"} <= set(event)


def test_http_beside_grpc_serves_the_regions_registered_over_grpc(
    agent_config: dict[str, Any],
    write_config: WriteConfig,
    agent_processes: StartAgent,
    model_packages: dict[str, Path],
) -> None:
    http_socket = Path(agent_config["server"]["unix_socket"]).with_name("http.sock")
    agent_config["server"]["http_unix_socket"] = str(http_socket)
    install(agent_config, model_packages["digits:1"])
    agent = agent_processes(write_config(agent_config))
    ready = agent.wait_ready()
    assert ready["http"] == [f"http+unix://{http_socket}"]
    assert stat.S_IMODE(http_socket.stat().st_mode) == 0o660
    pixels = np.ascontiguousarray(digits_holdout()[0][:3])
    segment = shared_memory.SharedMemory(f"edgefleet-agent-{uuid.uuid4().hex[:12]}", create=True, size=pixels.nbytes)
    conn = UnixHTTPConnection(str(http_socket))
    try:
        segment.buf[: pixels.nbytes] = pixels.tobytes()
        with grpc.insecure_channel(ready["listen"][0]) as channel:
            pb_grpc.GRPCInferenceServiceStub(channel).SystemSharedMemoryRegister(
                pb.SystemSharedMemoryRegisterRequest(name="frames", key=f"/{segment.name}", byte_size=pixels.nbytes)
            )
        # The HTTP server shares the gRPC server's registry: the region is there, and serves an HTTP request.
        conn.request("GET", "/v2/systemsharedmemory/status")
        assert [r["name"] for r in json.loads(conn.getresponse().read())] == ["frames"]
        region = {"shared_memory_region": "frames", "shared_memory_byte_size": pixels.nbytes}
        tensor = {"name": "pixels", "datatype": "FP32", "shape": [3, 64], "parameters": region}
        conn.request("POST", "/v2/models/digits/infer", json.dumps({"inputs": [tensor]}).encode())
        response = conn.getresponse()
        assert response.status == 200
        (out,) = json.loads(response.read())["outputs"]
        with KServeClient(ready["listen"][0], timeout_s=10) as client:
            want = client.infer("digits", {"pixels": pixels}).outputs["probabilities"]
        np.testing.assert_array_equal(np.array(out["data"], np.float32).reshape(3, 10), want)
    finally:
        conn.close()
        segment.close()
        segment.unlink()
    agent.signal(signal.SIGTERM)
    assert agent.finish(15) == 0
    assert not http_socket.exists()


def test_sigterm_drains_every_accepted_request(
    agent_config: dict[str, Any],
    write_config: WriteConfig,
    agent_processes: StartAgent,
    model_packages: dict[str, Path],
) -> None:
    # One engine, one row per batch, one ONNX Runtime thread: mobilenet-bench takes tens of ms a request
    # here, so 20 requests are still queued when SIGTERM arrives.
    agent_config["inference"] = {"adaptive": False, "max_batch_size": 1, "instances": 1}
    grace = agent_config["agent"]["shutdown_grace_s"]
    install(agent_config, model_packages["mobilenet-bench:1"])
    agent = agent_processes(write_config(agent_config))
    ready = agent.wait_ready()
    target, key = ready["listen"][0], labels("mobilenet-bench", "1")
    image = np.random.default_rng(0).random((1, 3, 224, 224), dtype=np.float32)

    def infer(client: KServeClient) -> str | grpc.StatusCode:
        try:
            return client.infer("mobilenet-bench", {"input": image}).model_version
        except grpc.RpcError as exc:
            return exc.code()  # type: ignore[no-any-return]

    with KServeClient(target, timeout_s=60) as client, ThreadPoolExecutor(20) as pool:
        assert wait_for(client.ready, 10, "ServerReady")
        futures = [pool.submit(infer, client) for _ in range(20)]
        queued = wait_for(
            lambda: scrape(ready["metrics_port"])[("edgefleet_inference_pending_requests", key)] >= 5,
            20,
            "requests queued in the agent",
        )
        assert queued
        signalled = time.monotonic()
        agent.signal(signal.SIGTERM)
        results = [f.result(timeout=60) for f in futures]
        code = agent.finish(grace + 5)
        took = time.monotonic() - signalled

    assert code == 0
    assert took < grace
    names = agent.event_names()
    assert names.index("agent.stopping") < names.index("agent.stopped")
    stopping, stopped = agent.find("agent.stopping"), agent.find("agent.stopped")
    assert stopping is not None and stopped is not None
    assert stopping["pending"]["mobilenet-bench:1"] > 0  # the drain had work to do
    served = stopped["requests"]["mobilenet-bench:1"]
    # What counts as accepted: a request whose call reached the servicer. gRPC ends calls it had not yet
    # handed to the servicer when the server stopped (CANCELLED), and calls after the socket closed fail
    # to connect (UNAVAILABLE); neither ever ran, and a client may retry them. Every accepted request is
    # counted by the server as a success or a failure (cancelling an accepted one needs the grace period to
    # expire, which `took < grace` rules out). So: no server-side failure, and every server-side success
    # reached its client.
    successes = [r for r in results if r == "1"]
    assert served["failure"] == 0
    assert served["success"] == len(successes) >= 5
    assert {r for r in results if r != "1"} <= {grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE}
    assert not Path(agent_config["server"]["unix_socket"]).exists()


def test_restart_serves_the_same_active_version(
    agent_config: dict[str, Any],
    write_config: WriteConfig,
    agent_processes: StartAgent,
    model_packages: dict[str, Path],
) -> None:
    install(agent_config, model_packages["digits:1"], model_packages["digits:2"])
    config = write_config(agent_config)
    pixels, _ = digits_holdout()
    answers = []
    for _run in range(2):
        agent = agent_processes(config)
        ready = agent.wait_ready()
        assert ready["models"] == ["ModelStatus(digits:2 READY active)"]
        with KServeClient(ready["listen"][0], timeout_s=10) as client:
            reply = client.infer("digits", {"pixels": pixels[:8]})
            assert reply.model_version == "2"
            answers.append(reply.outputs["probabilities"])
        agent.signal(signal.SIGTERM)
        assert agent.finish(15) == 0
    np.testing.assert_array_equal(answers[0], answers[1])


def test_stale_socket_after_kill_does_not_block_the_next_start(
    agent_config: dict[str, Any],
    write_config: WriteConfig,
    agent_processes: StartAgent,
    model_packages: dict[str, Path],
) -> None:
    install(agent_config, model_packages["digits:1"])
    config = write_config(agent_config)
    socket_path = Path(agent_config["server"]["unix_socket"])
    first = agent_processes(config)
    first.wait_ready()
    first.signal(signal.SIGKILL)
    assert first.finish(10) == -signal.SIGKILL
    assert stat.S_ISSOCK(socket_path.lstat().st_mode)  # left behind, nobody listening

    second = agent_processes(config)
    ready = second.wait_ready()
    with KServeClient(ready["listen"][0], timeout_s=10) as client:
        assert client.infer("digits", {"pixels": digits_holdout()[0][:1]}).model_version == "1"
    second.signal(signal.SIGTERM)
    assert second.finish(15) == 0
    assert not socket_path.exists()


def test_second_agent_refuses_what_the_first_holds(
    agent_config: dict[str, Any],
    write_config: WriteConfig,
    agent_processes: StartAgent,
    model_packages: dict[str, Path],
    tmp_path: Path,
) -> None:
    install(agent_config, model_packages["digits:1"])
    first = agent_processes(write_config(agent_config, "first.toml"))
    ready = first.wait_ready()
    socket_path = agent_config["server"]["unix_socket"]

    def other(name: str, **server: str) -> dict[str, Any]:
        return {
            "agent": {"data_dir": str(tmp_path / name)},
            "server": {
                "unix_socket": socket_path,
                "tcp_address": "",
                "metrics_address": "",
                "http_unix_socket": "",
                "http_tcp_address": "",
                **server,
            },
            "engine": agent_config["engine"],
        }

    same_socket = agent_processes(write_config(other("same-socket"), "same-socket.toml"))
    assert same_socket.finish(30) == 2
    assert f"server.unix_socket {socket_path} is in use by another process" in same_socket.stderr

    # Caught a bug: the metrics port was bound first and its OSError escaped as a traceback (exit 1).
    metrics = f"127.0.0.1:{ready['metrics_port']}"
    spare_socket = str(Path(socket_path).with_name("spare.sock"))
    same_port = agent_processes(
        write_config(other("same-port", metrics_address=metrics, unix_socket=spare_socket), "same-port.toml")
    )
    assert same_port.finish(30) == 2
    assert f"cannot serve metrics on server.metrics_address {metrics}" in same_port.stderr
    assert "Traceback" not in same_port.stderr
    assert not Path(spare_socket).exists()  # its own socket, opened first, was closed again

    for refused in (same_socket, same_port):
        assert refused.find("agent.ready") is None
    # The first agent never noticed.
    with KServeClient(ready["listen"][0], timeout_s=10) as client:
        assert client.infer("digits", {"pixels": digits_holdout()[0][:1]}).model_version == "1"
    first.signal(signal.SIGTERM)
    assert first.finish(15) == 0


def test_a_file_in_the_socket_path_is_not_replaced(
    agent_config: dict[str, Any],
    write_config: WriteConfig,
    agent_processes: StartAgent,
) -> None:
    socket_path = Path(agent_config["server"]["unix_socket"])
    socket_path.write_text("precious")
    agent = agent_processes(write_config(agent_config))
    assert agent.finish(30) == 2
    assert f"server.unix_socket {socket_path} exists and is not a socket" in agent.stderr
    assert socket_path.read_text() == "precious"


def test_an_unbindable_socket_path_is_a_config_error(
    agent_config: dict[str, Any], write_config: WriteConfig, agent_processes: StartAgent, short_dir: Path
) -> None:
    too_long = short_dir / ("x" * 110) / "infer.sock"  # past the 107 bytes of sockaddr_un.sun_path
    agent_config["server"]["unix_socket"] = str(too_long)
    agent = agent_processes(write_config(agent_config))
    assert agent.finish(30) == 2
    assert "server.unix_socket" in agent.stderr
    assert "Traceback" not in agent.stderr


# How a cloud link config the agent cannot use is refused: (cloud section, mqtt section, the error's words).
CLOUD_REFUSALS: dict[str, tuple[dict[str, str], dict[str, str], str]] = {
    "ca-file-unreadable": (
        {"grpc_target": "cloud.example.com:7000", "ca_file": "{root}/missing-ca.pem"},
        {},
        "cannot read cloud.ca_file {root}/missing-ca.pem: No such file or directory",
    ),
    "plaintext-remote": (
        {"grpc_target": "cloud.example.com:7000"},
        {},
        "cloud.grpc_target cloud.example.com:7000 is not loopback: set cloud.ca_file",
    ),
    # MQTT carries the control plane here, so the uploader alone uses cloud.grpc_target: its task used to
    # die with this error unseen while the agent served on, uploading nothing.
    "plaintext-remote-uplink-only": (
        {"grpc_target": "cloud.example.com:7000"},
        {"url": "mqtt://127.0.0.1:1883"},
        "cloud.grpc_target cloud.example.com:7000 is not loopback: set cloud.ca_file",
    ),
}


def test_a_cloud_link_it_cannot_use_fails_the_start_with_exit_2_naming_the_key(
    agent_config: dict[str, Any], tmp_path: Path, short_dir: Path
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("efd_test\n")
    runs = {}
    for name, (cloud, mqtt, _words) in CLOUD_REFUSALS.items():
        data = {section: dict(values) for section, values in agent_config.items()}
        data["agent"]["data_dir"] = str(tmp_path / name / "data")
        data["server"]["unix_socket"] = str(short_dir / f"{name}.sock")
        data["cloud"] = {"device_id": "cam-1", "token_file": str(token_file)}
        data["cloud"].update({key: value.format(root=tmp_path) for key, value in cloud.items()})
        if mqtt:
            data["mqtt"] = mqtt
        config = tmp_path / f"{name}.toml"
        config.write_text(toml_text(data))
        runs[name] = ["run", "--config", config]
    results = run_cli_all(runs, timeout=60)
    for name, (_cloud, _mqtt, words) in CLOUD_REFUSALS.items():
        result = results[name]
        assert result.returncode == 2, (name, result.stderr[-2000:])
        assert f"edge-agent: error: {words.format(root=tmp_path)}" in result.stderr, name
        assert "Traceback" not in result.stderr, name
        # Refused before anything was opened: no outbox, no socket.
        assert not (tmp_path / name / "data").exists(), name
        assert not (short_dir / f"{name}.sock").exists(), name
