"""`edge-agent doctor`: each check alone over its inputs (files in tmp dirs, real sockets and a real gRPC
server on loopback), and the command end to end against a real config whose cloud and broker are absent."""

from __future__ import annotations

import ctypes
import datetime
import json
import socket
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from edge_runtime.agent import doctor
from edge_runtime.agent.doctor import ABSENT, FAIL, PASS, WARN
from edge_runtime.config import AgentConfig
from tests.edge_runtime.agent.conftest import run_cli

UTC = datetime.timezone.utc


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- the GPU stack ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "l4t", "jetpack"),
    [
        ("# R36 (release), REVISION: 3.0, GCID: 36191598, BOARD: generic, EABI: aarch64", "36.3.0", "6.0"),
        ("# R35 (release), REVISION: 4.1, GCID: 33958178, BOARD: t186ref", "35.4.1", "5.1.2"),
        ("# R99 (release), REVISION: 1.0", "99.1.0", None),
    ],
)
def test_tegra_release_gives_l4t_and_jetpack(text: str, l4t: str, jetpack: str | None) -> None:
    assert doctor.parse_tegra_release(text) == l4t
    assert doctor.jetpack_of(l4t) == jetpack


def test_tegra_release_that_names_nothing() -> None:
    assert doctor.parse_tegra_release("garbage") is None


def test_no_gpu_is_absent_and_says_onnxruntime_serves(tmp_path: Path) -> None:
    check = doctor.check_gpu(dev=tmp_path, tegra_release=tmp_path / "nv_tegra_release", nvidia_smi="")
    assert check.result == ABSENT and "no NVIDIA GPU" in check.found and "ONNX Runtime" in check.action


def test_a_jetson_reports_l4t_and_its_device_nodes(tmp_path: Path) -> None:
    release = tmp_path / "nv_tegra_release"
    release.write_text("# R36 (release), REVISION: 4.0, GCID: 1, BOARD: generic\n")
    dev = tmp_path / "dev"
    dev.mkdir()
    assert doctor.check_gpu(dev=dev, tegra_release=release).result == FAIL  # no device nodes visible
    for node in ("nvhost-gpu", "nvhost-ctrl", "nvmap"):
        (dev / node).touch()
    check = doctor.check_gpu(dev=dev, tegra_release=release)
    assert check.result == PASS and "L4T 36.4.0 (JetPack 6.1/6.2)" in check.found and "3 GPU device" in check.found


def test_nvidia_smi_names_the_gpu(tmp_path: Path) -> None:
    def fake_run(argv: list[str]) -> str:
        assert argv[0] == "/usr/bin/nvidia-smi" and "--query-gpu=name,driver_version" in argv
        return "NVIDIA H200, 570.86\n"

    check = doctor.check_gpu(
        dev=tmp_path, tegra_release=tmp_path / "none", nvidia_smi="/usr/bin/nvidia-smi", run=fake_run
    )
    assert (check.result, check.found) == (PASS, "NVIDIA H200, 570.86")


def test_cuda_runtime_absent_or_versioned() -> None:
    def missing(name: str) -> Any:
        raise OSError(f"{name}: cannot open shared object file")

    assert doctor.check_cuda(load=missing).result == ABSENT

    class Cudart:
        def cudaRuntimeGetVersion(self, out: Any) -> int:
            ctypes.cast(out, ctypes.POINTER(ctypes.c_int))[0] = 12060
            return 0

    assert doctor.check_cuda(load=lambda name: Cudart()).found.startswith("CUDA runtime 12.6")
    without_gpu = doctor.check_cuda(load=lambda name: Cudart(), gpu=False)
    assert without_gpu.result == ABSENT and "no GPU" in without_gpu.found


def test_tensorrt_and_pycuda_versions_or_absent() -> None:
    class Module:
        __version__ = "10.3.0"
        VERSION_TEXT = "2024.1"

    def only(*names: str) -> Callable[[str], Any]:
        def load(name: str) -> Any:
            if name not in names:
                raise ModuleNotFoundError(name)
            return Module()

        return load

    assert doctor.check_tensorrt(only()).result == ABSENT
    both = doctor.check_tensorrt(only("tensorrt", "pycuda"))
    assert (both.result, both.found) == (PASS, "tensorrt 10.3.0, pycuda 2024.1")
    half = doctor.check_tensorrt(only("tensorrt"))
    assert half.result == WARN and "pycuda missing" in half.found


def test_a_tensorrt_that_fails_to_import_is_a_failure() -> None:
    def broken(name: str) -> Any:
        raise OSError("libnvinfer.so.10: cannot open shared object file")

    check = doctor.check_tensorrt(broken)
    assert check.result == FAIL and "libnvinfer" in check.found


def test_onnxruntime_names_its_providers() -> None:
    check = doctor.check_onnxruntime()
    assert check.result == PASS and "CPUExecutionProvider" in check.found


# -- disk, credentials, clock --------------------------------------------------------------------------------


class _Usage:
    def __init__(self, free: int) -> None:
        self.free = free


def test_disk_against_the_outbox_budget(make_config: Callable[..., AgentConfig]) -> None:
    config = make_config(buffer={"max_bytes": 1 << 30})
    assert doctor.check_disk(config, usage=lambda p: _Usage(10 << 30)).result == PASS
    short = doctor.check_disk(config, usage=lambda p: _Usage(1 << 30))
    assert short.result == WARN and "buffer.max_bytes" in short.action
    assert doctor.check_disk(config, usage=lambda p: _Usage(10 << 20)).result == FAIL


def test_disk_of_a_data_dir_not_made_yet_is_its_parents(make_config: Callable[..., AgentConfig]) -> None:
    config = make_config()
    seen: list[Path] = []
    doctor.check_disk(config, usage=lambda p: seen.append(p) or _Usage(10 << 30))
    assert seen and seen[0].exists() and str(config.data_dir).startswith(str(seen[0]))


def _certificate(path: Path, not_after: datetime.datetime) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dev-1")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(not_after - datetime.timedelta(days=365))
        .not_valid_after(not_after)
        .sign(key, hashes.SHA256())
    )
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def test_credentials(make_config: Callable[..., AgentConfig], tmp_path: Path) -> None:
    now = datetime.datetime(2026, 6, 1, tzinfo=UTC)
    assert doctor.check_credentials(make_config(), now).result == ABSENT  # a standalone device
    token = tmp_path / "token"
    cloud = {"grpc_target": "127.0.0.1:7000", "device_id": "dev-1", "token_file": str(token)}
    assert "cannot read" in doctor.check_credentials(make_config(cloud=cloud), now).found
    token.write_text("")
    assert doctor.check_credentials(make_config(cloud=cloud), now).result == FAIL
    token.write_text("efd_secret\n")
    assert doctor.check_credentials(make_config(cloud=cloud), now).result == PASS
    missing_id = doctor.check_credentials(make_config(cloud={**cloud, "device_id": ""}), now)
    assert missing_id.result == FAIL and "edge-agent enroll" in missing_id.action

    cert = tmp_path / "client.pem"
    with_cert = make_config(cloud={**cloud, "client_cert_file": str(cert)})
    for not_after, result in (
        (now + datetime.timedelta(days=200), PASS),
        (now + datetime.timedelta(days=5), WARN),
        (now - datetime.timedelta(days=1), FAIL),
    ):
        _certificate(cert, not_after)
        check = doctor.check_credentials(with_cert, now)
        assert check.result == result, check
        assert f"valid until {not_after:%Y-%m-%d}" in check.found
    assert "EXPIRED" in check.found
    cert.write_text("not a certificate")
    assert doctor.check_credentials(with_cert, now).result == FAIL


def test_clock_against_the_cloud_or_the_kernel() -> None:
    assert doctor.check_clock(1_000_000, 1_001_000).result == PASS
    ahead = doctor.check_clock(1_000_000, 1_030_000)
    assert ahead.result == WARN and "30.0 s ahead of cloud-sync's clock" in ahead.found
    assert "behind" in doctor.check_clock(1_030_000, 1_000_000).found
    assert doctor.check_clock(None, 0, synchronised=lambda: True).result == PASS
    assert "not synchronised" in doctor.check_clock(None, 0, synchronised=lambda: False).found
    assert doctor.check_clock(None, 0, synchronised=lambda: None).result == WARN
    assert doctor.kernel_clock_synchronised() in (True, False, None)


# -- the network ----------------------------------------------------------------------------------------------


class _TimedHealth(health_pb2_grpc.HealthServicer):  # type: ignore[misc]
    def Check(self, request: Any, context: grpc.ServicerContext) -> Any:
        context.send_initial_metadata(((doctor.SERVER_TIME_KEY, "1234567"),))
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)


@pytest.fixture
def grpc_server() -> Iterator[Callable[[Any], int]]:
    servers: list[grpc.Server] = []

    def start(servicer: Any) -> int:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        if servicer is not None:
            health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        return port

    yield start
    for server in servers:
        server.stop(0)


def test_cloud_reachable_with_its_time(make_config: Callable[..., AgentConfig], grpc_server: Any) -> None:
    port = grpc_server(_TimedHealth())
    check, server_time = doctor.check_cloud(make_config(cloud={"grpc_target": f"127.0.0.1:{port}"}))
    assert check.result == PASS and "plaintext" in check.found
    assert server_time == 1234567


def test_a_cloud_without_a_health_service_still_answers(
    make_config: Callable[..., AgentConfig], grpc_server: Any
) -> None:
    port = grpc_server(None)
    check, server_time = doctor.check_cloud(make_config(cloud={"grpc_target": f"127.0.0.1:{port}"}))
    assert check.result == PASS and "UNIMPLEMENTED" in check.found and server_time is None


def test_cloud_and_broker_unreachable_fail_saying_what_to_do(make_config: Callable[..., AgentConfig]) -> None:
    config = make_config(
        cloud={"grpc_target": f"127.0.0.1:{_closed_port()}"}, mqtt={"url": f"mqtt://127.0.0.1:{_closed_port()}"}
    )
    cloud, _ = doctor.check_cloud(config, timeout_s=1)
    assert cloud.result == FAIL and "no gRPC answer" in cloud.found and "outbox" in cloud.action
    broker = doctor.check_broker(config, timeout_s=1)
    assert broker.result == FAIL and "cannot connect" in broker.found
    assert doctor.check_broker(make_config()).result == ABSENT
    assert doctor.check_cloud(make_config())[0].result == ABSENT


def test_broker_accepting_connections_passes(make_config: Callable[..., AgentConfig]) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        check = doctor.check_broker(make_config(mqtt={"url": f"mqtt://127.0.0.1:{port}"}))
    assert check.result == PASS and f"127.0.0.1:{port} accepts connections" in check.found


# -- the command ----------------------------------------------------------------------------------------------


def test_doctor_end_to_end_with_cloud_and_broker_away(
    config_data: dict[str, Any], write_config: Callable[..., Path], tmp_path: Path
) -> None:
    token = tmp_path / "token"
    token.write_text("efd_x\n")
    config_data["cloud"] = {
        "grpc_target": f"127.0.0.1:{_closed_port()}",
        "device_id": "dev-1",
        "token_file": str(token),
    }
    config_data["mqtt"] = {"url": f"mqtt://127.0.0.1:{_closed_port()}"}
    path = write_config(config_data)
    text = run_cli("doctor", "--config", path, "--timeout", "1")
    data = run_cli("doctor", "--config", path, "--timeout", "1", "--json")
    assert text.returncode == data.returncode == 1, text.stderr
    checks = {c["name"]: c for c in json.loads(data.stdout)}
    assert list(checks) == [
        "config",
        "gpu",
        "cuda",
        "tensorrt",
        "onnxruntime",
        "disk",
        "credentials",
        "clock",
        "cloud",
        "broker",
    ]
    assert checks["config"]["result"] == PASS and checks["credentials"]["result"] == PASS
    assert checks["cloud"]["result"] == FAIL and checks["broker"]["result"] == FAIL
    assert checks["tensorrt"]["result"] in (ABSENT, PASS, WARN)
    assert "FAIL    cloud" in text.stdout and "-> check the network" in text.stdout
    assert "2 failed" in text.stdout.splitlines()[-1]


def test_doctor_of_a_config_run_refuses_fails_on_config(
    config_data: dict[str, Any], write_config: Callable[..., Path]
) -> None:
    config_data["server"]["tcp_address"] = "0.0.0.0:8001"
    result = run_cli("doctor", "--config", write_config(config_data), "--json")
    assert result.returncode == 1
    (config,) = [c for c in json.loads(result.stdout) if c["name"] == "config"]
    assert config["result"] == FAIL and "not a loopback address" in config["found"]
