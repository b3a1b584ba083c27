"""The edge-agent lifecycle: listen, load the active models, serve, follow the cloud's policy, drain on SIGTERM.

One asyncio loop owns the network; model loading and shutdown of engines run on a named loader thread so
the loop keeps answering health probes and pinging systemd's watchdog meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import platform
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import structlog

from edge_runtime import __version__
from edge_runtime.agent.health import STUCK_BATCH_S, gather, judge
from edge_runtime.agent.metrics_http import MetricsServer
from edge_runtime.agent.preflight import preflight
from edge_runtime.agent.status import AgentAdminServicer
from edge_runtime.agent.systemd import SystemdNotifier
from edge_runtime.config import AgentConfig
from edge_runtime.control.converge import Converger
from edge_runtime.control.desired_store import DesiredStore
from edge_runtime.control.trust import TrustStore
from edge_runtime.errors import ConfigError, EdgeRuntimeError
from edge_runtime.inference.hard import HardExamples
from edge_runtime.inference.keeping import Keeper
from edge_runtime.kserve.health import AgentHealth
from edge_runtime.kserve.http import HttpInferenceServer
from edge_runtime.kserve.server import InferenceServer, parse_tcp_address
from edge_runtime.models.repository import ModelRepository
from edge_runtime.models.served import ServedModel
from edge_runtime.observability.metrics import AgentMetrics
from edge_runtime.outbox import Outbox
from edge_runtime.policy import EffectivePolicy, PolicyChange, parse_policy
from edge_runtime.sync.control import ControlTransport
from edge_runtime.sync.uplink import Uploader
from edge_runtime.telemetry import TelemetryCollector, deferred_probe
from edgefleet.proto.edgefleet.v1 import state_pb2

__all__ = ["DOWNLOADS_DIR", "NO_SIGNING_KEY", "OUTBOX_FILE", "Agent", "AgentEndpoints"]

OUTBOX_FILE = "outbox.db"
DOWNLOADS_DIR = "downloads"
# Where enrollment leaves the fleet's public key when the config names no cloud.signing_key_file.
IDENTITY_SIGNING_KEY = "identity/fleet-signing.pub"
NO_SIGNING_KEY = "no fleet signing key: enroll the device (edge-agent enroll) or set cloud.signing_key_file"

log = structlog.get_logger(__name__)

_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# How often the health loop judges the agent and refreshes the gRPC health status (and, when systemd's
# watchdog asks for pings more often than this, how often it pings).
HEALTH_TICK_S = 1.0


@dataclass
class AgentEndpoints:
    """Where a running agent listens (ports resolved when the config asked for port 0)."""

    inference: list[str] = field(default_factory=list)
    http: list[str] = field(default_factory=list)  # KServe v2 HTTP/REST: http:// and http+unix:// URLs
    metrics_port: int = 0


class Agent:
    def __init__(
        self, config: AgentConfig, notifier: SystemdNotifier | None = None, *, stuck_batch_s: float = STUCK_BATCH_S
    ) -> None:
        self.config = config
        # A batch running longer than this is an engine that hangs: the agent turns unhealthy (health.py).
        self.stuck_batch_s = stuck_batch_s
        self.began = time.monotonic()
        self.unhealthy = ""  # why the agent is not healthy ("" while it is): what the watchdog follows
        self.notifier = notifier or SystemdNotifier()
        self.metrics = AgentMetrics()
        # Everything `run` refuses is refused here, before anything is opened (preflight.py, which check-config
        # and doctor run too): listen addresses, the token, cloud-sync's address and CA (cloud.ca_file is read
        # here, off the loop) and the control transport (MQTT, or the gRPC stream to cloud-sync). A config they
        # refuse leaves nothing behind and fails the start naming the key, rather than a task nobody awaits.
        checked = preflight(config)
        token, cloud = checked.token, checked.cloud
        self.control: ControlTransport | None = checked.control
        config.data_dir.mkdir(parents=True, exist_ok=True)
        self.outbox = Outbox.open(
            config.data_dir / OUTBOX_FILE, max_bytes=config.buffer.max_bytes, max_age_s=config.buffer.max_age_s
        )
        # The buffer bounds in force are read at scrape time (self.policy is assigned below).
        self.metrics.track_outbox(self.outbox.counters, lambda: self.policy.buffer)
        self.keeper = Keeper(self.outbox, config.upload.sample_rate)
        # Hard examples (uncertain answers, shadow disagreements) within the samples section's byte budget.
        self.hard_examples = HardExamples(self.outbox, config.samples)
        self.repository = ModelRepository(config, self.metrics, self.keeper, self.hard_examples)
        self.repository.expect_load()  # not ready before the store's models are loaded (run() loads them)
        self.uploader = (
            Uploader(self.outbox, config.cloud, config.upload, token, channel=cloud) if cloud and token else None
        )
        if self.uploader is not None:
            uploader = self.uploader
            self.metrics.track_uplink(lambda: uploader.status, lambda: dict(uploader.status.failures))
        # The config file's policy sections are the base every policy from the cloud is laid over.
        self.base_policy = self.policy = EffectivePolicy.from_config(config)
        self.collector: TelemetryCollector | None = None
        self._agent_info = _agent_info()  # platform.platform() reads files: once, here, off the loop
        self.endpoints = AgentEndpoints()
        self.started = asyncio.Event()
        self._stop = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model-loader")
        # Installs and engine builds of converging models: a long build never holds up the loader's switches
        # or a live inference-policy change.
        self._builder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model-builder")
        self._policy_lock: asyncio.Lock | None = None  # made on the loop
        self._cloud = cloud
        self._token = token
        self._artifacts: grpc.aio.Channel | None = None  # opened on the loop at the first download
        self.health = AgentHealth(self.repository.ready, lambda: self.unhealthy)
        self.converger = Converger(
            device_id=config.cloud.device_id,
            repository=self.repository,
            persistence=DesiredStore(config.data_dir) if self.control is not None else None,
            accept_policy=self._accept_policy,
            publish=self._publish_reported,
            loader=self._loader,
            builder=self._builder,
            fetch=self._fetch if cloud is not None and token else None,
            no_fetch_reason="model assignments need cloud-sync's artifact service: set cloud.grpc_target and "
            "cloud.token_file",
            agent_info=self._agent_info,
        )
        # Read from the scrape thread: reported() copies the converger's dicts in single C-level calls.
        self.metrics.track_model_states(lambda: self.converger.reported().models)

    @property
    def applied_generation(self) -> int:
        """The generation of the desired state accepted (its policy applied; its models converging)."""
        return self.converger.generation

    @property
    def policy_hash(self) -> str:
        """The accepted desired state's policy_hash ("" on the config file's policy)."""
        return self.converger.policy_hash

    def stop(self) -> None:
        """Ask the agent to drain and exit (what SIGTERM does); safe to call from any thread."""
        loop = self._loop
        if loop is None or _running_loop() is loop:
            self._stop.set()
            return
        # asyncio.Event is not thread-safe: set off the loop, its waiter would never wake. A closed loop
        # (RuntimeError) means the agent has stopped already.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self._stop.set)

    async def run(self, *, handle_signals: bool = True) -> None:
        loop = asyncio.get_running_loop()
        self._loop = loop
        began = self.began = time.monotonic()
        try:
            server = await InferenceServer.start(
                self.repository,
                self.config.server,
                __version__,
                health=self.health,
                admin=AgentAdminServicer(self),
            )
        except BaseException:
            await loop.run_in_executor(self._loader, self.outbox.close)
            raise
        http_server: HttpInferenceServer | None = None
        try:
            http_server = await HttpInferenceServer.start(
                self.repository, self.config.server, __version__, shm=server.shared_memory
            )
            metrics_server = self._start_metrics()
        except BaseException:
            if http_server is not None:
                await http_server.stop(0)
            await server.stop(0)
            await loop.run_in_executor(self._loader, self.outbox.close)
            raise
        self.endpoints.inference = list(server.targets)
        self.endpoints.http = list(http_server.targets) if http_server is not None else []
        if handle_signals:
            for sig in _SIGNALS:
                loop.add_signal_handler(sig, self.stop)
        watchdog = asyncio.ensure_future(self._health_loop())
        uploading = asyncio.ensure_future(self.uploader.run()) if self.uploader else None
        telemetry: asyncio.Future[None] | None = None
        try:
            telemetry = self._start_control()
            # READY to systemd once apps can connect; model readiness is ServerReady's business (a TensorRT
            # build may take minutes, longer than any sensible TimeoutStartSec).
            self.notifier.notify(READY="1", STATUS="listening; loading models")
            self.started.set()
            loading = loop.run_in_executor(self._loader, self.repository.load_active)
            # Queued behind that load on the loader thread: the persisted desired state finds what it runs.
            await self.converger.start()
            statuses = await loading
            ready = sum(1 for s in statuses if s.active)
            self.notifier.notify(STATUS=f"serving {ready} model(s)")
            log.info(
                "agent.ready",
                seconds=round(time.monotonic() - began, 3),
                models=[repr(s) for s in statuses],
                listen=server.targets,
                http=self.endpoints.http,
                metrics_port=self.endpoints.metrics_port,
            )
            await self._stop.wait()
        finally:
            self.notifier.notify(STOPPING="1", STATUS="draining")
            grace = self.config.agent.shutdown_grace_s
            served = self.repository.models()
            log.info("agent.stopping", grace_s=grace, pending={_ref(s): s.batcher.pending() for s in served})
            # Both answer with the same shared-memory regions: unmapped once both are done.
            stopping = [server.stop(grace, close_shared_memory=False)]
            if http_server is not None:
                stopping.append(http_server.stop(grace))
            await asyncio.gather(*stopping)
            if server.shared_memory is not None:
                server.shared_memory.close()
            await self.converger.aclose()  # partial downloads stay for the next start
            if self._artifacts is not None:
                await self._artifacts.close()
            await loop.run_in_executor(self._loader, self.repository.close, grace)
            # A build still running cannot be stopped: the closed repository unloads it when it ends.
            self._builder.shutdown(wait=False, cancel_futures=True)
            if uploading is not None:
                # A stream cut here is safe: its records stay in the outbox, marked in doubt, and go again.
                uploading.cancel()
                await asyncio.gather(uploading, return_exceptions=True)
            if telemetry is not None:
                telemetry.cancel()
                await asyncio.gather(telemetry, return_exceptions=True)
            if self.control is not None:
                await self.control.aclose()  # MQTT publishes status offline first; gRPC ends its stream
            await loop.run_in_executor(self._loader, self.outbox.close, grace)
            if metrics_server is not None:
                # shutdown() waits for serve_forever's next poll (up to 0.5 s): not on the loop.
                await loop.run_in_executor(self._loader, metrics_server.stop)
            self._loader.shutdown(wait=True)
            watchdog.cancel()
            if handle_signals:
                for sig in _SIGNALS:
                    loop.remove_signal_handler(sig)
            self.notifier.close()
            log.info(
                "agent.stopped",
                seconds=round(time.monotonic() - began, 3),
                requests={_ref(s): _totals(s) for s in served},
            )

    # -- policy and desired state ---------------------------------------------------------------------------

    async def apply_policy(self, policy: EffectivePolicy) -> PolicyChange:
        """Run with `policy` from now on, live: no restart, and no accepted request dropped.

        Only the sections that changed are touched: upload (uploader pace and interval, keeper's sample rate),
        samples (the hard examples' measure and byte budget) and telemetry (the collector's interval) at once
        on the loop; buffer (outbox bounds, with the eviction
        they call for) on the outbox's writer thread; inference last, on the model-loader thread, where it
        waits for a model load in progress (loading holds the repository's switch lock). Queued and running
        requests finish under the plan they were queued under; the next batch forms under the new one.
        """
        if self._policy_lock is None:
            self._policy_lock = asyncio.Lock()
        async with self._policy_lock:
            change = PolicyChange.between(self.policy, policy)
            if change.upload:
                self.keeper.sample_rate = policy.upload.sample_rate
                if self.uploader is not None:
                    self.uploader.apply_policy(policy.upload)
                    self.uploader.kick()  # it may be sleeping out the old interval
            if change.samples:
                self.hard_examples.apply(policy.samples)
            if change.telemetry and self.collector is not None:
                self.collector.set_interval(policy.telemetry.interval_s)
            if change.buffer:
                await asyncio.wrap_future(self.outbox.set_limits(policy.buffer.max_bytes, policy.buffer.max_age_s))
            if change.inference:
                loop = asyncio.get_running_loop()
                await loop.run_in_executor(self._loader, self.repository.apply_policy, policy.inference)
            self.policy = policy
            log.info("policy.applied", sections=change.sections)
            return change

    def _start_control(self) -> asyncio.Future[None] | None:
        """The control transport and telemetry through it, when one is configured; the agent works the same
        without (a standalone device)."""
        if self.control is None:
            return None
        self.control.start(self._on_desired)
        self.collector = TelemetryCollector(
            self.config.cloud.device_id,
            self.repository,
            outbox=self.outbox,
            system=deferred_probe(),
            interval_s=self.policy.telemetry.interval_s,
        )
        return asyncio.ensure_future(self.collector.run(self.control.publish_telemetry))

    def _on_desired(self, state: state_pb2.DesiredState) -> None:
        """A desired state arrived (on the loop): the converger takes the newest, one at a time."""
        self.converger.offer(state)

    async def _accept_policy(self, state: state_pb2.DesiredState) -> Callable[[], Awaitable[PolicyChange]]:
        """Validate a desired state's policy over the config file's (ConfigError names the key, nothing
        changes); what applies it live once the converger accepted the state."""
        policy = parse_policy(state.policy_json, self.base_policy)

        async def apply() -> PolicyChange:
            return await self.apply_policy(policy)

        return apply

    def _publish_reported(self, state: state_pb2.ReportedState) -> None:
        if self.control is not None:
            self.control.publish_reported(state)

    async def _fetch(
        self,
        name: str,
        version: int,
        sha256: str,
        on_progress: Callable[[float], None],
        on_phase: Callable[[int], None],
    ) -> Path:
        """Download and verify name:version from cloud-sync's artifact service (the converger's Fetch)."""
        from edge_runtime.control.fetch import fetch_package

        trust = await asyncio.to_thread(self._trust_store)
        if self._artifacts is None:
            assert self._cloud is not None
            self._artifacts = self._cloud.open()
        assert self._token is not None
        downloads = self.config.data_dir / DOWNLOADS_DIR
        return await fetch_package(
            self._artifacts, self._token, trust, name, version, sha256, downloads, on_progress, on_phase
        )

    def _trust_store(self) -> TrustStore:
        """The fleet key (read at every download: enrollment may bring it while the agent runs) and the serials
        seen. Blocks: off the loop."""
        configured = getattr(self.config.cloud, "signing_key_file", "")  # stream E's key; the identity's else
        path = Path(configured) if configured else self.config.data_dir / IDENTITY_SIGNING_KEY
        try:
            key = path.read_bytes()
        except FileNotFoundError:
            raise EdgeRuntimeError(f"{NO_SIGNING_KEY} ({path} does not exist)") from None
        except OSError as exc:
            raise EdgeRuntimeError(f"cannot read the fleet signing key {path}: {exc.strerror}") from None
        try:
            return TrustStore(self.config.data_dir, key)
        except ValueError as exc:
            raise EdgeRuntimeError(f"{path}: {exc}; enroll the device again") from None

    def _start_metrics(self) -> MetricsServer | None:
        address = self.config.server.metrics_address
        if not address:
            return None
        # Read-only figures: unlike the inference API, a LAN address (for the fleet's Prometheus) is fine.
        try:
            host, port = parse_tcp_address(address)
        except ConfigError as exc:
            raise ConfigError(f"server.metrics_address {address!r} must be host:port") from exc
        try:
            # Served from its own threads (GET /metrics only); a scrape only reads our counters.
            server = MetricsServer(host, port, self.metrics.registry)
        except OSError as exc:
            raise ConfigError(f"cannot serve metrics on server.metrics_address {address}: {exc.strerror}") from exc
        self.endpoints.metrics_port = server.port
        return server

    def check_health(self) -> str:
        """Judge the agent now (health.py); "" when healthy. On the loop: reads memory and thread stacks only."""
        facts = gather(self.repository.models(), self.outbox, time.monotonic())
        return judge(facts, self.stuck_batch_s)

    async def _health_loop(self) -> None:
        """Judge health every tick; ping systemd's watchdog only while healthy, and keep grpc.health current.

        Run on the loop on purpose: a wedged loop stops the pings too. An unhealthy agent logs why once and
        stops pinging, so systemd restarts it after WatchdogSec; if it recovers first, pings resume.
        """
        interval = self.notifier.watchdog_interval_s
        pinging = interval is not None and self.config.agent.watchdog
        tick = min(interval, HEALTH_TICK_S) if pinging and interval is not None else HEALTH_TICK_S
        while True:
            reason = self.check_health()
            if reason != self.unhealthy:
                if reason:
                    log.error(
                        "agent.unhealthy",
                        reason=reason,
                        watchdog="pings stopped: systemd restarts the agent" if pinging else "off",
                    )
                    self.notifier.notify(STATUS=f"unhealthy: {reason}")
                else:
                    log.warning("agent.healthy_again", was=self.unhealthy)
                    self.notifier.notify(STATUS="healthy again")
                self.unhealthy = reason
            if pinging and not reason:
                self.notifier.notify(WATCHDOG="1")
            await self.health.refresh()
            await asyncio.sleep(tick)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _agent_info() -> state_pb2.AgentInfo:
    import onnxruntime

    return state_pb2.AgentInfo(
        agent_version=__version__,
        python_version=platform.python_version(),
        platform=platform.platform(),
        hostname=socket.gethostname(),
        onnxruntime_version=onnxruntime.__version__,
        providers=onnxruntime.get_available_providers(),
    )


def _ref(served: ServedModel) -> str:
    return f"{served.name}:{served.version}"


def _totals(served: ServedModel) -> dict[str, int]:
    """Lifetime request counts of a version, for the log line that closes a run."""
    snap = served.stats.snapshot()
    return {"success": snap.success.count, "failure": sum(snap.failures.values())}
