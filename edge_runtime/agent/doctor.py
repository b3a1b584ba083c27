"""`edge-agent doctor`: what an operator would check by hand on a device, each check a small function.

Every check answers PASS, WARN, FAIL or ABSENT (the thing is not there, and the agent works without it) with
one line of what it found and one of what to do. The GPU stack (tensorrt, pycuda, libcudart) is imported or
loaded here only, never at the agent's start. Needs no running agent; `edge-agent status` asks a running one.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import datetime
import importlib
import re
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edge_runtime.config import AgentConfig
from edge_runtime.errors import ConfigError

__all__ = [
    "ABSENT",
    "FAIL",
    "PASS",
    "WARN",
    "Check",
    "check_broker",
    "check_clock",
    "check_cloud",
    "check_config",
    "check_credentials",
    "check_cuda",
    "check_disk",
    "check_gpu",
    "check_onnxruntime",
    "check_tensorrt",
    "jetpack_of",
    "parse_tegra_release",
    "render",
    "run_checks",
]

PASS, WARN, FAIL, ABSENT = "PASS", "WARN", "FAIL", "ABSENT"
# cloud-sync names its clock in this initial-metadata key (ms since the epoch) when it does; see check_clock.
SERVER_TIME_KEY = "edgefleet-server-time-ms"
# Past this, results' timestamps and certificate checks go wrong in ways operators notice.
MAX_SKEW_S = 5.0
CERT_WARN_DAYS = 14
# Below this much free space the outbox and model installs start failing whatever the budgets say.
MIN_FREE_BYTES = 256 * 1024 * 1024
# L4T release -> JetPack (NVIDIA's JetPack archive: https://developer.nvidia.com/embedded/jetpack-archive).
_JETPACK = {
    "36.4": "6.1/6.2",
    "36.3": "6.0",
    "36.2": "6.0 DP",
    "35.6": "5.1.4",
    "35.5": "5.1.3",
    "35.4": "5.1.2",
    "35.3": "5.1.1",
    "35.2": "5.1",
    "35.1": "5.0.2",
    "32.7": "4.6.x",
}


@dataclass(frozen=True)
class Check:
    name: str
    result: str  # PASS | WARN | FAIL | ABSENT
    found: str
    action: str = ""  # what to do; "" when nothing

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


# -- configuration ----------------------------------------------------------------------------------------------


def check_config(path: str) -> tuple[Check, AgentConfig | None]:
    """The config loads and passes every check `run` makes (preflight.py)."""
    from edge_runtime.agent.identity import apply_identity
    from edge_runtime.agent.preflight import preflight
    from edge_runtime.config import load_config

    try:
        config = apply_identity(load_config(path))
    except ConfigError as exc:
        return Check("config", FAIL, str(exc), "fix the config (edge-agent check-config shows each key)"), None
    try:
        preflight(config)
    except ConfigError as exc:
        return Check("config", FAIL, str(exc), "fix the key it names; `edge-agent run` refuses this config"), config
    return Check("config", PASS, f"{path} is valid"), config


# -- the GPU stack ----------------------------------------------------------------------------------------------


def parse_tegra_release(text: str) -> str | None:
    """L4T version ("36.3.0") from /etc/nv_tegra_release ("# R36 (release), REVISION: 3.0, ..."); None if not."""
    match = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*(\d+)\.(\d+)", text)
    return f"{match.group(1)}.{match.group(2)}.{match.group(3)}" if match else None


def jetpack_of(l4t: str) -> str | None:
    return _JETPACK.get(".".join(l4t.split(".")[:2]))


def check_gpu(
    dev: Path = Path("/dev"),
    tegra_release: Path = Path("/etc/nv_tegra_release"),
    nvidia_smi: str | None = None,
    run: Callable[[list[str]], str] | None = None,
) -> Check:
    """An NVIDIA GPU: a Jetson (nv_tegra_release, /dev/nvhost-*, /dev/nvmap) or a discrete GPU (nvidia-smi)."""
    if tegra_release.exists():
        l4t = parse_tegra_release(_read(tegra_release))
        nodes = sorted(p.name for p in dev.glob("nvhost-*")) + [p.name for p in (dev / "nvmap",) if p.exists()]
        if l4t is None:
            return Check("gpu", WARN, f"{tegra_release} does not name an L4T release", "reflash or update JetPack")
        jetpack = jetpack_of(l4t)
        found = f"Jetson, L4T {l4t}" + (f" (JetPack {jetpack})" if jetpack else " (JetPack version unknown)")
        if not nodes:
            return Check(
                "gpu",
                FAIL,
                f"{found}, but no /dev/nvhost-* or /dev/nvmap is visible",
                "give the agent the GPU device nodes (the systemd unit's DeviceAllow=, a container's --runtime nvidia)",
            )
        return Check("gpu", PASS, f"{found}; {len(nodes)} GPU device node(s)")
    smi = nvidia_smi if nvidia_smi is not None else shutil.which("nvidia-smi")
    if smi:
        try:
            names = (run or _run)([smi, "--query-gpu=name,driver_version", "--format=csv,noheader"]).strip()
        except (OSError, subprocess.SubprocessError) as exc:
            return Check("gpu", FAIL, f"nvidia-smi failed: {exc}", "check the NVIDIA driver (dmesg, nvidia-smi)")
        return Check("gpu", PASS, "; ".join(line.strip() for line in names.splitlines()) or "nvidia-smi found a GPU")
    nodes = sorted(p.name for p in dev.glob("nvidia[0-9]*"))
    if nodes:
        return Check("gpu", WARN, f"{', '.join(nodes)} present but no nvidia-smi", "install the NVIDIA driver tools")
    return Check(
        "gpu",
        ABSENT,
        "no NVIDIA GPU (no nvidia-smi, /dev/nvidia*, /dev/nvhost-* or /etc/nv_tegra_release)",
        "none needed: models run on ONNX Runtime's CPU provider",
    )


def check_cuda(load: Callable[[str], Any] = ctypes.CDLL, gpu: bool = True) -> Check:
    """The CUDA runtime libcudart, and the version it reports (cudaRuntimeGetVersion). `gpu`: whether
    check_gpu found one (a runtime without a GPU is installed but unused)."""
    names = [n for n in (ctypes.util.find_library("cudart"),) if n]
    names += ["libcudart.so", "libcudart.so.13", "libcudart.so.12", "libcudart.so.11.0"]
    for name in names:
        try:
            lib = load(name)
        except OSError:
            continue
        version = ctypes.c_int(0)
        try:
            code = lib.cudaRuntimeGetVersion(ctypes.byref(version))
        except AttributeError:
            return Check("cuda", WARN, f"{name} has no cudaRuntimeGetVersion", "reinstall the CUDA runtime")
        if code != 0:
            return Check("cuda", WARN, f"{name}: cudaRuntimeGetVersion failed ({code})", "check the CUDA install")
        v = version.value
        found = f"CUDA runtime {v // 1000}.{v % 1000 // 10} ({name})"
        if not gpu:
            return Check("cuda", ABSENT, f"{found} is installed, but there is no GPU for it", "none needed")
        return Check("cuda", PASS, found)
    return Check("cuda", ABSENT, "no libcudart found", "none needed without a GPU; on a Jetson install JetPack's CUDA")


def check_tensorrt(import_module: Callable[[str], Any] = importlib.import_module) -> Check:
    """tensorrt and pycuda importable (the TensorRT engine needs both), and their versions."""
    found: dict[str, str] = {}
    missing: list[str] = []
    for module, attr in (("tensorrt", "__version__"), ("pycuda", "VERSION_TEXT")):
        try:
            found[module] = str(getattr(import_module(module), attr, "?"))
        except ImportError:
            missing.append(module)
        except Exception as exc:  # a broken install raises anything at import (a missing libnvinfer…)
            return Check(
                "tensorrt", FAIL, f"importing {module} fails: {exc!r}", "reinstall it (JetPack's, on a Jetson)"
            )
    text = ", ".join(f"{m} {v}" for m, v in found.items())
    if not found:
        return Check(
            "tensorrt",
            ABSENT,
            "tensorrt and pycuda are not importable",
            "none needed: ONNX Runtime serves; for TensorRT install edgefleet[tensorrt] or use JetPack's "
            "(a venv made with --system-site-packages sees it)",
        )
    if missing:
        return Check(
            "tensorrt",
            WARN,
            f"{text}; {' and '.join(missing)} missing",
            f"install {' and '.join(missing)}: the TensorRT engine needs both (models fall back to ONNX Runtime)",
        )
    return Check("tensorrt", PASS, text)


def check_onnxruntime(import_module: Callable[[str], Any] = importlib.import_module) -> Check:
    try:
        ort = import_module("onnxruntime")
    except ImportError:
        return Check("onnxruntime", FAIL, "onnxruntime is not importable", "pip install 'edgefleet[agent]'")
    providers = list(ort.get_available_providers())
    return Check("onnxruntime", PASS, f"onnxruntime {ort.__version__}; providers {', '.join(providers)}")


# -- disk, credentials, clock -------------------------------------------------------------------------------------


def check_disk(config: AgentConfig, usage: Callable[[Path], Any] = shutil.disk_usage) -> Check:
    """Free space where the data dir is, against the outbox budget (buffer.max_bytes) and the models there."""
    where = config.data_dir
    while not where.exists() and where != where.parent:
        where = where.parent
    free = int(usage(where).free)
    outbox = _size(config.data_dir / "outbox.db") + _size(config.data_dir / "outbox.db-wal")
    outbox_room = max(0, config.buffer.max_bytes - outbox)
    models = _tree_size(config.data_dir / "models")
    # Room for the outbox to fill its budget, and for one more copy of the installed models (an update).
    wanted = outbox_room + models + MIN_FREE_BYTES
    found = (
        f"{_mib(free)} free at {where}; outbox may grow {_mib(outbox_room)} more (buffer.max_bytes), "
        f"models take {_mib(models)}"
    )
    if free < MIN_FREE_BYTES:
        return Check("disk", FAIL, found, "free space on that filesystem: the outbox and installs will fail")
    if free < wanted:
        return Check(
            "disk",
            WARN,
            found,
            f"free {_mib(wanted - free)} more, or lower buffer.max_bytes: a full outbox or a model update may not fit",
        )
    return Check("disk", PASS, found)


def check_credentials(config: AgentConfig, now: datetime.datetime | None = None) -> Check:
    """The device's identity: id and token (when it talks to a cloud) and its client certificate's expiry."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    cloud = config.cloud
    if not (cloud.grpc_target or config.mqtt.url or cloud.token_file):
        return Check(
            "credentials", ABSENT, "no cloud configured (a standalone device)", "edge-agent enroll to join a fleet"
        )
    if not cloud.device_id:
        return Check(
            "credentials", FAIL, "no cloud.device_id", "enroll the device: edge-agent enroll --url ... --token ..."
        )
    if not cloud.token_file:
        return Check("credentials", FAIL, "no cloud.token_file", "enroll the device, or set cloud.token_file")
    token = Path(cloud.token_file)
    try:
        present = bool(token.read_text().strip())
    except OSError as exc:
        return Check(
            "credentials", FAIL, f"cannot read {token}: {exc.strerror}", "enroll again, or fix its permissions"
        )
    if not present:
        return Check("credentials", FAIL, f"{token} is empty", "enroll the device again")
    try:
        expiry = _certificate_expiry(config)
    except (ConfigError, ValueError, OSError) as exc:
        return Check("credentials", FAIL, str(exc), "enroll the device again to get a new certificate")
    found = f"device {cloud.device_id}, token {token}"
    if expiry is None:
        return Check("credentials", PASS, found + "; no client certificate")
    days = (expiry - now).total_seconds() / 86400
    found += f"; client certificate valid until {expiry:%Y-%m-%d %H:%M} UTC"
    if days <= 0:
        return Check("credentials", FAIL, found + " (EXPIRED)", "enroll the device again: TLS peers refuse it")
    if days < CERT_WARN_DAYS:
        return Check("credentials", WARN, found + f" ({days:.0f} days left)", "enroll again before it expires")
    return Check("credentials", PASS, found)


def _certificate_expiry(config: AgentConfig) -> datetime.datetime | None:
    if config.cloud.client_cert_file:
        from cryptography import x509

        data = Path(config.cloud.client_cert_file).read_bytes()
        return x509.load_pem_x509_certificate(data).not_valid_after_utc
    from edge_runtime.agent.identity import client_certificate_expiry

    return client_certificate_expiry(config.data_dir)


def check_clock(
    server_time_ms: int | None, measured_at_ms: int, synchronised: Callable[[], bool | None] | None = None
) -> Check:
    """The device clock: against cloud-sync's when it told its time (skew), else the kernel's NTP sync flag.

    Results are stamped with this clock and TLS judges certificates by it; cloud-sync keeps its own receive time
    beside every record, so skew loses nothing but makes the device's times wrong.
    """
    if server_time_ms is not None:
        skew = (measured_at_ms - server_time_ms) / 1000
        found = f"{abs(skew):.1f} s {'ahead of' if skew > 0 else 'behind'} cloud-sync's clock"
        if abs(skew) > MAX_SKEW_S:
            return Check("clock", WARN, found, "enable time sync: timedatectl set-ntp true (or chrony)")
        return Check("clock", PASS, found)
    synced = (synchronised or kernel_clock_synchronised)()
    if synced is None:
        return Check("clock", WARN, "cannot tell whether the clock is synchronised", "check timedatectl status")
    if not synced:
        return Check(
            "clock",
            WARN,
            "the kernel clock is not synchronised (no NTP)",
            "enable time sync: timedatectl set-ntp true (or chrony); results are stamped with this clock",
        )
    return Check("clock", PASS, "the kernel clock is synchronised (NTP); cloud-sync did not tell its time")


class _Timex(ctypes.Structure):
    # struct timex (linux/timex.h): modes, offset, freq, maxerror, esterror, status, ... (the rest padding)
    _fields_ = [
        ("modes", ctypes.c_uint),
        ("offset", ctypes.c_long),
        ("freq", ctypes.c_long),
        ("maxerror", ctypes.c_long),
        ("esterror", ctypes.c_long),
        ("status", ctypes.c_int),
        ("padding", ctypes.c_byte * 200),
    ]


_TIME_ERROR = 5  # adjtimex's return value when the clock is not synchronised (STA_UNSYNC)


def kernel_clock_synchronised() -> bool | None:
    """adjtimex(2) read-only (modes 0): False when the kernel says the clock is unsynchronised."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        timex = _Timex()
        state = libc.adjtimex(ctypes.byref(timex))
    except (OSError, AttributeError):
        return None
    if state < 0:
        return None
    return bool(state != _TIME_ERROR)


# -- the network ----------------------------------------------------------------------------------------------


def check_cloud(config: AgentConfig, timeout_s: float = 3.0) -> tuple[Check, int | None]:
    """cloud-sync answers gRPC at cloud.grpc_target (a grpc.health.v1 Check: any gRPC answer proves it is
    there); also its clock, when it names it in the answer's initial metadata."""
    target = config.cloud.grpc_target
    if not target:
        return Check(
            "cloud", ABSENT, "no cloud.grpc_target (a standalone device)", "edge-agent enroll to join a fleet"
        ), None
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from edge_runtime.sync.uplink import CloudChannel

    try:
        channel_config = CloudChannel.read(config.cloud)
    except ConfigError as exc:
        return Check("cloud", FAIL, str(exc), "fix the key it names"), None
    if channel_config.root_certificates is None:
        channel = grpc.insecure_channel(target)
    else:
        credentials = grpc.ssl_channel_credentials(
            channel_config.root_certificates, channel_config.client_key, channel_config.client_chain
        )
        channel = grpc.secure_channel(target, credentials)
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            _answer, call = stub.Check.with_call(health_pb2.HealthCheckRequest(), timeout=timeout_s)
            metadata = call.initial_metadata()
            found = f"cloud-sync answers at {target} ({'TLS' if channel_config.root_certificates else 'plaintext'})"
        except grpc.RpcError as exc:
            code = exc.code()
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                return (
                    Check(
                        "cloud",
                        FAIL,
                        f"no gRPC answer from {target} within {timeout_s:g} s: {exc.details()}",
                        "check the network, cloud.grpc_target, and (TLS) cloud.ca_file; results wait in the outbox",
                    ),
                    None,
                )
            metadata = exc.initial_metadata() if hasattr(exc, "initial_metadata") else ()
            found = f"cloud-sync answers at {target} ({code.name} to a health check: it serves no health service)"
    return Check("cloud", PASS, found), _server_time(metadata)


def _server_time(metadata: Sequence[Any] | None) -> int | None:
    for key, value in metadata or ():
        if key == SERVER_TIME_KEY:
            try:
                return int(value)
            except ValueError:
                return None
    return None


def check_broker(config: AgentConfig, timeout_s: float = 3.0) -> Check:
    """The MQTT broker accepts a TCP connection (and a TLS handshake for mqtts://, with cloud.ca_file). Not an
    MQTT CONNECT: that would take over the running agent's session, whose client id is the device id."""
    if not config.mqtt.url:
        return Check("broker", ABSENT, "no mqtt.url (control over gRPC, or a standalone device)")
    from edgefleet.addresses import AddressError, parse_broker_url

    try:
        address = parse_broker_url(config.mqtt.url)
    except AddressError as exc:
        return Check("broker", FAIL, f"mqtt.url: {exc}", "fix mqtt.url")
    try:
        with socket.create_connection((address.host, address.port), timeout=timeout_s) as raw:
            if address.tls:
                context = ssl.create_default_context(cafile=config.cloud.ca_file or None)
                with context.wrap_socket(raw, server_hostname=address.host):
                    pass
    except ssl.SSLError as exc:
        return Check(
            "broker", FAIL, f"TLS to {address.host}:{address.port} failed: {exc.reason}", "check cloud.ca_file"
        )
    except OSError as exc:
        return Check(
            "broker",
            FAIL,
            f"cannot connect to {address.host}:{address.port} within {timeout_s:g} s: {exc.strerror or exc}",
            "check the network and mqtt.url; telemetry waits (the newest window) until it is back",
        )
    return Check("broker", PASS, f"{address.host}:{address.port} accepts connections{' (TLS)' if address.tls else ''}")


# -- all of them ----------------------------------------------------------------------------------------------


def run_checks(config_path: str, timeout_s: float = 3.0) -> list[Check]:
    """Every check, in the order an operator reads them; later ones that need the config skip without one."""
    config_check, config = check_config(config_path)
    gpu = check_gpu()
    checks = [config_check, gpu, check_cuda(gpu=gpu.result != ABSENT), check_tensorrt(), check_onnxruntime()]
    if config is None:
        return [*checks, Check("disk", ABSENT, "no valid config: the data dir is unknown", "fix the config first")]
    checks += [check_disk(config), check_credentials(config)]
    cloud, server_time = check_cloud(config, timeout_s)
    measured = time.time_ns() // 1_000_000
    checks += [check_clock(server_time, measured), cloud, check_broker(config, timeout_s)]
    return checks


def render(checks: Sequence[Check]) -> str:
    width = max(len(c.name) for c in checks)
    lines = []
    for c in checks:
        lines.append(f"{c.result:<6}  {c.name:<{width}}  {c.found}")
        if c.action:
            lines.append(f"{'':<6}  {'':<{width}}  -> {c.action}")
    failed = sum(c.result == FAIL for c in checks)
    warned = sum(c.result == WARN for c in checks)
    lines.append(f"{failed} failed, {warned} warning(s), {len(checks)} checks")
    return "\n".join(lines)


def _run(argv: list[str]) -> str:
    return subprocess.run(argv, capture_output=True, text=True, timeout=10, check=True).stdout


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _tree_size(path: Path) -> int:
    if not path.is_dir():
        return 0
    return sum(_size(p) for p in path.rglob("*") if p.is_file())


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB" if n < 2**30 * 10 else f"{n / 2**30:.1f} GiB"
