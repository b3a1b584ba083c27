"""A fleet of real processes for the control-plane tests: one cloud-sync, N enrolled edge-agents, fleetctl.

Everything is a real process on loopback, started the way an operator starts it: `cloud-sync run`, a
Mosquitto with its dynamic-security plugin (cloud-sync keeps the device accounts there) or no broker at all
(then the gRPC Control stream carries desired and reported state), `edge-agent enroll` with a token minted by
`fleetctl devices token create`, `edge-agent run`, and `fleetctl` for every change. Processes, their JSON logs
and config files come from tests/processes.py; Mosquitto from tests/mosquitto.py.

Polling for a condition reads the admin API directly (the same JSON `fleetctl --json` prints, without paying
an interpreter start every 10 ms); each check's final word is a real `fleetctl` run.

Not a fixture module (tests/fleet/conftest.py builds the fleets), nor a place for assertions about behaviour.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import onnxruntime as ort

from cloud_sync.process import admin_token
from edge_runtime.agent.identity import Identity
from edge_runtime.kserve import KServeClient
from tests.cloud_sync.conftest import cloud_sync_config
from tests.mosquitto import Mosquitto
from tests.processes import AGENT, REPO_ROOT, AgentProcess, CloudSyncProcess, run_program, toml_text
from tests.waiting import wait_for

__all__ = [
    "DYNSEC_PLUGIN",
    "LAB",
    "Clients",
    "Fleet",
    "FleetAgent",
    "FleetCloud",
    "Transport",
    "batch_sizes",
    "digits_input",
    "events",
    "expected_output",
    "start_fleet",
    "wait_all",
]

FLEETCTL = [sys.executable, "-m", "cloud_sync.fleetctl"]
DYNSEC_PLUGIN = "/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so"
BROKER_ADMIN = "cloud-sync-admin"
Transport = str  # "mqtt" (Mosquitto + dynsec accounts) or "grpc" (no broker: the Control stream)


def digits_input(rows: int = 1, seed: int = 0) -> np.ndarray[Any, Any]:
    """Pixels as digits takes them: `rows` x 64 values in 0..16."""
    return np.random.default_rng(seed).integers(0, 17, size=(rows, 64)).astype(np.float32)


def expected_output(package: Path, pixels: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """What the package's own model.onnx answers for `pixels`, run here with ONNX Runtime (the oracle)."""
    session = ort.InferenceSession(str(package / "model.onnx"), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {"pixels": pixels})
    return np.asarray(out)


def events(proc: AgentProcess | CloudSyncProcess | None, name: str, **fields: Any) -> list[dict[str, Any]]:
    """The process's log events called `name` whose fields equal `fields`."""
    if proc is None:
        return []
    seen = list(proc.events)  # a copy: the reader thread appends meanwhile
    return [e for e in seen if e.get("event") == name and all(e.get(k) == v for k, v in fields.items())]


class FleetCloud:
    """cloud-sync as a process, with a dynsec Mosquitto (transport "mqtt") or none ("grpc"); fleetctl at hand."""

    def __init__(self, workdir: Path, transport: Transport, sections: Mapping[str, Mapping[str, Any]] = {}) -> None:
        self.workdir = workdir
        self.transport = transport
        self.sections = {name: dict(values) for name, values in sections.items()}  # over the test defaults
        self.broker: Mosquitto | None = None
        self.proc: CloudSyncProcess | None = None
        self.api: httpx.Client | None = None
        self.http_url = self.grpc_target = self.admin_token = ""

    def start(self) -> FleetCloud:
        self.workdir.mkdir(parents=True, exist_ok=True)
        sections: dict[str, dict[str, Any]] = {name: dict(values) for name, values in self.sections.items()}
        if self.transport == "mqtt":
            self.broker, mqtt = _dynsec_broker(self.workdir / "broker")
            sections["mqtt"] = {**mqtt, **sections.get("mqtt", {})}
        (self.workdir / "cloud").mkdir(exist_ok=True)
        self.proc = CloudSyncProcess(cloud_sync_config(self.workdir / "cloud", **sections))
        ready = self.proc.wait_ready(60)
        self.http_url, self.grpc_target = ready["http"], ready["grpc"]
        self.admin_token = admin_token(self.workdir / "cloud" / "data")
        self.api = httpx.Client(
            base_url=self.http_url,
            headers={"Authorization": f"Bearer {self.admin_token}"},
            timeout=30,
            trust_env=False,
        )
        return self

    def close(self) -> None:
        if self.api is not None:
            self.api.close()
        if self.proc is not None:
            self.proc.kill()
        if self.broker is not None:
            self.broker.kill()

    # -- fleetctl, the operator's way in ----------------------------------------------------------------------

    def fleetctl(self, *args: str | Path) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETCTL_") and k != "COLUMNS"}
        env.update(FLEETCTL_URL=self.http_url, FLEETCTL_TOKEN=self.admin_token, COLUMNS="250")
        return subprocess.run(
            [*FLEETCTL, *map(str, args)], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT, env=env
        )

    def ok(self, *args: str | Path) -> str:
        """fleetctl ARGS, which must succeed; its stdout."""
        done = self.fleetctl(*args)
        assert done.returncode == 0, (args, done.returncode, done.stdout, done.stderr)
        return done.stdout

    def json(self, *args: str | Path) -> Any:
        """fleetctl --json ARGS, parsed."""
        import json

        return json.loads(self.ok("--json", *args))

    # -- the admin API, for polling ----------------------------------------------------------------------------

    def get(self, path: str) -> Any:
        assert self.api is not None
        response = self.api.get(path)
        assert response.status_code == 200, (path, response.status_code, response.text)
        return response.json()

    def state(self, device_id: str) -> dict[str, Any]:
        """GET /v1/devices/{id}/state: desired, reported, per model, in_sync, converged."""
        found: dict[str, Any] = self.get(f"/v1/devices/{device_id}/state")
        return found

    def devices(self) -> dict[str, dict[str, Any]]:
        """GET /v1/devices by id."""
        return {d["device_id"]: d for d in self.get("/v1/devices")["devices"]}


def _dynsec_broker(directory: Path) -> tuple[Mosquitto, dict[str, Any]]:
    """A Mosquitto whose accounts live in its dynamic-security plugin, and cloud-sync's [mqtt] to keep them."""
    directory.mkdir(parents=True, exist_ok=True)
    dynsec = directory / "dynamic-security.json"
    password = "fleet-admin-password"
    subprocess.run(
        ["mosquitto_ctrl", "dynsec", "init", str(dynsec), BROKER_ADMIN, password], check=True, capture_output=True
    )
    password_file = directory / "admin-password"
    password_file.write_text(password + "\n")
    broker = Mosquitto(directory, f"plugin {DYNSEC_PLUGIN}\nplugin_opt_config_file {dynsec}", anonymous=False)
    broker.start()
    mqtt = {
        "url": broker.url,
        "username": BROKER_ADMIN,
        "password_file": str(password_file),
        "manage_accounts": "mosquitto-dynsec",
    }
    return broker, mqtt


class FleetAgent:
    """One device: its config file (no cloud keys: enrollment fills them), enroll, run, signals."""

    def __init__(
        self,
        name: str,
        labels: Mapping[str, str],
        workdir: Path,
        socket_dir: Path,
        transport: Transport,
        overrides: Mapping[str, Mapping[str, Any]] = {},
    ):
        self.name = name
        self.labels = dict(labels)
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.data_dir = workdir / "data"
        self.socket = socket_dir / f"{name}.sock"
        data: dict[str, dict[str, Any]] = {
            "agent": {"data_dir": str(self.data_dir), "shutdown_grace_s": 5.0},
            "server": {
                "unix_socket": str(self.socket),
                "tcp_address": "",
                "metrics_address": "",
                "http_unix_socket": "",
                "http_tcp_address": "",
            },
            "engine": {"backend": "onnxruntime", "intra_op_threads": 1, "warmup_inferences": 1},
            # One request per batch until a policy says otherwise: a policy's batching shows in the statistics.
            "inference": {"adaptive": False, "max_batch_size": 1, "max_queue_depth": 256},
            "upload": {"sample_rate": 0.0, "interval_s": 0.1},
            "telemetry": {"interval_s": 3600.0},
        }
        if transport == "mqtt":
            data["mqtt"] = {"keepalive_s": 5}  # the broker calls a stopped device offline within 7.5 s
        for section, values in overrides.items():  # a test's own settings over these, section by section
            data.setdefault(section, {}).update(values)
        self.config = workdir / "edge-agent.toml"
        self.config.write_text(toml_text(data))
        self.proc: AgentProcess | None = None
        self.identity: Identity | None = None

    @property
    def device_id(self) -> str:
        assert self.identity is not None, "enroll first"
        return self.identity.device_id

    @property
    def token(self) -> str:
        assert self.identity is not None, "enroll first"
        return self.identity.token_file.read_text().strip()

    @property
    def target(self) -> str:
        return f"unix:{self.socket}"

    def enroll_argv(self, grpc_target: str, token: str) -> list[str]:
        return ["enroll", "--url", grpc_target, "--token", token, "--config", str(self.config)]

    def enrolled(self) -> Identity:
        self.identity = Identity.load(self.data_dir)
        assert self.identity is not None, f"{self.name}: no identity after enrolling"
        return self.identity

    def start(self) -> AgentProcess:
        self.proc = AgentProcess(self.config)
        return self.proc

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.proc.poll() is None

    def pause(self) -> None:
        """SIGSTOP: the device is gone (network, power) but keeps everything it runs."""
        assert self.proc is not None
        self.proc.signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.signal(signal.SIGCONT)

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.signal(signal.SIGCONT)  # a stopped process must run to die cleanly
            self.proc.kill()

    def client(self, timeout_s: float = 10) -> KServeClient:
        return KServeClient(self.target, timeout_s=timeout_s)


def enroll_all(agents: Sequence[FleetAgent], grpc_target: str, tokens: Mapping[str, str]) -> None:
    """`edge-agent enroll` for every agent at once (each a process of its own)."""
    with ThreadPoolExecutor(len(agents)) as pool:
        done = list(
            pool.map(lambda a: run_program(AGENT, *a.enroll_argv(grpc_target, tokens[a.name]), timeout=120), agents)
        )
    for agent, result in zip(agents, done, strict=True):
        assert result.returncode == 0, (agent.name, result.returncode, result.stdout, result.stderr)
        agent.enrolled()


def mint_tokens(cloud: FleetCloud, agents: Sequence[FleetAgent]) -> dict[str, str]:
    """`fleetctl devices token create --labels ... --device-id NAME` per agent, at once; {name: token}."""

    def mint(agent: FleetAgent) -> str:
        labels = ",".join(f"{k}={v}" for k, v in agent.labels.items())
        return cloud.ok("devices", "token", "create", "--labels", labels, "--device-id", agent.name).strip()

    with ThreadPoolExecutor(len(agents)) as pool:
        return dict(zip((a.name for a in agents), pool.map(mint, agents), strict=True))


def short_socket_dir() -> Path:
    """A short directory for Unix sockets (107 bytes at most); the caller removes it."""
    return Path(tempfile.mkdtemp(prefix="ef-fleet-", dir="/tmp"))


def remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


LAB = {"site": "lab"}


class Fleet:
    """cloud-sync and its enrolled agents (by name), shared by a module's numbered checks.

    `broken` names the first check that failed: the later ones build on its state, so they skip.
    """

    def __init__(self, cloud: FleetCloud, agents: Sequence[FleetAgent], packages: Mapping[str, Path]) -> None:
        self.cloud = cloud
        self.agents = {a.name: a for a in agents}
        self.packages = dict(packages)
        self.broken = ""

    @property
    def transport(self) -> Transport:
        return self.cloud.transport

    def matching(self, selector: Mapping[str, str] = LAB) -> list[FleetAgent]:
        return [a for a in self.agents.values() if all(a.labels.get(k) == v for k, v in selector.items())]

    def others(self, selector: Mapping[str, str] = LAB) -> list[FleetAgent]:
        chosen = {a.name for a in self.matching(selector)}
        return [a for a in self.agents.values() if a.name not in chosen]

    def close(self) -> None:
        for agent in self.agents.values():
            agent.kill()
        self.cloud.close()


def start_fleet(
    workdir: Path,
    socket_dir: Path,
    transport: Transport,
    labels: Mapping[str, Mapping[str, str]],
    packages: Mapping[str, Path],
    cloud_sections: Mapping[str, Mapping[str, Any]] = {},
    agent_sections: Mapping[str, Mapping[str, Any]] = {},
) -> Fleet:
    """cloud-sync (and its broker), then one enrolled, running agent per entry of `labels` ({name: labels});
    `cloud_sections` and `agent_sections` go over the config files' defaults, section by section."""
    cloud = FleetCloud(workdir / "cloud", transport, cloud_sections)
    agents = [
        FleetAgent(name, lab, workdir / name, socket_dir, transport, agent_sections) for name, lab in labels.items()
    ]
    fleet = Fleet(cloud, agents, packages)
    try:
        cloud.start()
        enroll_all(agents, cloud.grpc_target, mint_tokens(cloud, agents))
        for agent in agents:
            agent.start()
        for agent in agents:
            assert agent.proc is not None
            agent.proc.wait_ready(120)
    except BaseException:
        fleet.close()
        raise
    return fleet


class Clients:
    """`threads` apps, each sending digits requests one after another to one device; every outcome counted.

    `sent` counts requests handed to gRPC, `outcomes` their answers by status ("ok" or the gRPC code name):
    after `stop`, sent == sum(outcomes) means no request went unanswered. Each request carries `rows` rows:
    the next ones of `inputs` in turn (one fixed row if None), so a shadow version is compared on varied inputs.
    """

    def __init__(
        self, target: str, threads: int = 16, inputs: np.ndarray[Any, Any] | None = None, rows: int = 1
    ) -> None:
        self.sent = 0
        self.outcomes: Counter[str] = Counter()
        self.versions: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._inputs = digits_input(rows) if inputs is None else np.asarray(inputs, np.float32)
        self._rows = rows
        self._next = 0
        self._threads = [threading.Thread(target=self._run, args=(target,), daemon=True) for _ in range(threads)]
        for t in self._threads:
            t.start()

    def _run(self, target: str) -> None:
        with KServeClient(target, timeout_s=30) as client:
            while not self._stop.is_set():
                with self._lock:
                    self.sent += 1
                    first = self._next * self._rows % (len(self._inputs) - self._rows + 1)
                    self._next += 1
                try:
                    reply = client.infer("digits", {"pixels": self._inputs[first : first + self._rows]})
                    outcome, version = "ok", reply.model_version
                except grpc.RpcError as exc:
                    outcome, version = exc.code().name, ""
                with self._lock:
                    self.outcomes[outcome] += 1
                    self.versions[version] += 1

    def answered(self) -> int:
        with self._lock:
            return self.outcomes["ok"]

    def wait_answers(self, more: int, timeout: float = 60) -> None:
        start = self.answered()
        wait_for(lambda: self.answered() >= start + more, timeout, f"{more} more answers from the device")

    def stop(self) -> Counter[str]:
        self._stop.set()
        for t in self._threads:
            t.join(60)
        assert not any(t.is_alive() for t in self._threads), "a client thread is stuck in a request"
        return self.outcomes


def batch_sizes(agent: FleetAgent, version: str = "") -> dict[int, int]:
    """{batch size: executions} of digits on the device, from KServe's ModelStatistics."""
    with agent.client() as client:
        stats = client.statistics("digits", version)
    return {int(b.batch_size): int(b.compute_infer.count) for s in stats.model_stats for b in s.batch_stats}


def wait_all(agents: Sequence[FleetAgent], check: Callable[[FleetAgent], bool], timeout: float, what: str) -> None:
    """Wait until `check(agent)` holds for every agent, naming the ones that never got there."""

    def behind() -> list[str]:
        return [a.name for a in agents if not check(a)]

    try:
        wait_for(lambda: not behind(), timeout, what, poll=0.1)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; still behind: {behind()}") from None
