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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.server import HTTPServer

import structlog
from prometheus_client import start_http_server

from edge_runtime import __version__
from edge_runtime.agent.systemd import SystemdNotifier
from edge_runtime.config import AgentConfig
from edge_runtime.errors import ConfigError
from edge_runtime.inference.keeping import Keeper
from edge_runtime.kserve.server import InferenceServer, parse_tcp_address
from edge_runtime.models.repository import ModelRepository, ModelStatus
from edge_runtime.models.served import ModelState, ServedModel
from edge_runtime.observability.metrics import AgentMetrics
from edge_runtime.outbox import Outbox
from edge_runtime.policy import EffectivePolicy, PolicyChange, parse_policy
from edge_runtime.sync.control import ControlTransport, open_control
from edge_runtime.sync.uplink import CloudChannel, Uploader, read_token
from edge_runtime.telemetry import TelemetryCollector, deferred_probe
from edgefleet.proto.edgefleet.v1 import state_pb2

__all__ = ["OUTBOX_FILE", "Agent", "AgentEndpoints"]

OUTBOX_FILE = "outbox.db"

log = structlog.get_logger(__name__)

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@dataclass
class AgentEndpoints:
    """Where a running agent listens (ports resolved when the config asked for port 0)."""

    inference: list[str] = field(default_factory=list)
    metrics_port: int = 0


class Agent:
    def __init__(self, config: AgentConfig, notifier: SystemdNotifier | None = None) -> None:
        self.config = config
        self.notifier = notifier or SystemdNotifier()
        self.metrics = AgentMetrics()
        token = read_token(config.cloud) if config.cloud.grpc_target or config.cloud.token_file else None
        # cloud-sync's address and CA (cloud.ca_file is read here, off the loop) and the control transport (MQTT,
        # or the gRPC stream to cloud-sync) are checked before anything is opened: a config they refuse leaves
        # nothing behind and fails the start naming the key, rather than a task nobody awaits.
        cloud = CloudChannel.read(config.cloud) if config.cloud.grpc_target else None
        self.control: ControlTransport | None = open_control(config, token, cloud)
        config.data_dir.mkdir(parents=True, exist_ok=True)
        self.outbox = Outbox.open(
            config.data_dir / OUTBOX_FILE, max_bytes=config.buffer.max_bytes, max_age_s=config.buffer.max_age_s
        )
        self.metrics.track_outbox(self.outbox.counters)
        self.keeper = Keeper(self.outbox, config.upload.sample_rate)
        self.repository = ModelRepository(config, self.metrics, self.keeper)
        self.uploader = (
            Uploader(self.outbox, config.cloud, config.upload, token, channel=cloud) if cloud and token else None
        )
        # The config file's policy sections are the base every policy from the cloud is laid over.
        self.base_policy = self.policy = EffectivePolicy.from_config(config)
        self.applied_generation = 0  # of the last desired state applied (not persisted yet: 0 after a restart)
        self.policy_hash = ""  # the applied desired state's policy_hash ("" on the config file's policy)
        self.collector: TelemetryCollector | None = None
        self._agent_info = _agent_info()  # platform.platform() reads files: once, here, off the loop
        self._converging: set[asyncio.Future[None]] = set()
        self.endpoints = AgentEndpoints()
        self.started = asyncio.Event()
        self._stop = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model-loader")
        self._policy_lock: asyncio.Lock | None = None  # made on the loop
        self._converge_lock: asyncio.Lock | None = None

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
        began = time.monotonic()
        try:
            server = await InferenceServer.start(self.repository, self.config.server, __version__)
        except BaseException:
            await loop.run_in_executor(self._loader, self.outbox.close)
            raise
        try:
            metrics_server = self._start_metrics()
        except BaseException:
            await server.stop(0)
            await loop.run_in_executor(self._loader, self.outbox.close)
            raise
        self.endpoints.inference = list(server.targets)
        if handle_signals:
            for sig in _SIGNALS:
                loop.add_signal_handler(sig, self.stop)
        watchdog = asyncio.ensure_future(self._watchdog())
        uploading = asyncio.ensure_future(self.uploader.run()) if self.uploader else None
        telemetry: asyncio.Future[None] | None = None
        try:
            telemetry = self._start_control()
            # READY to systemd once apps can connect; model readiness is ServerReady's business (a TensorRT
            # build may take minutes, longer than any sensible TimeoutStartSec).
            self.notifier.notify(READY="1", STATUS="listening; loading models")
            self.started.set()
            statuses = await loop.run_in_executor(self._loader, self.repository.load_active)
            ready = sum(1 for s in statuses if s.active)
            self.notifier.notify(STATUS=f"serving {ready} model(s)")
            log.info(
                "agent.ready",
                seconds=round(time.monotonic() - began, 3),
                models=[repr(s) for s in statuses],
                listen=server.targets,
                metrics_port=self.endpoints.metrics_port,
            )
            await self._stop.wait()
        finally:
            self.notifier.notify(STOPPING="1", STATUS="draining")
            grace = self.config.agent.shutdown_grace_s
            served = self.repository.models()
            log.info("agent.stopping", grace_s=grace, pending={_ref(s): s.batcher.pending() for s in served})
            await server.stop(grace)
            for converging in list(self._converging):
                converging.cancel()
            await asyncio.gather(*self._converging, return_exceptions=True)
            await loop.run_in_executor(self._loader, self.repository.close, grace)
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
                await loop.run_in_executor(self._loader, _stop_http_server, metrics_server)
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

        Only the sections that changed are touched: upload (uploader pace and interval, keeper's sample rate)
        and telemetry (the collector's interval) at once on the loop; buffer (outbox bounds, with the eviction
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
        """A desired state arrived (on the loop): converge to it in a task of its own, one at a time."""
        task = asyncio.ensure_future(self._converge(state))
        self._converging.add(task)
        task.add_done_callback(self._converging.discard)

    async def _converge(self, state: state_pb2.DesiredState) -> None:
        """Apply a desired state's policy and report the outcome, one desired state at a time. Model
        assignments are the control plane's next step: logged, not yet acted on."""
        if self._converge_lock is None:
            self._converge_lock = asyncio.Lock()
        # Whole, under one lock: two states arriving together must not both pass the generation check and
        # then apply in the wrong order (the older one last).
        async with self._converge_lock:
            await self._converge_one(state)

    async def _converge_one(self, state: state_pb2.DesiredState) -> None:
        device_id = self.config.cloud.device_id
        if state.device_id != device_id:
            # A broker ACL that lets another device's state through: refuse it, say so, change nothing.
            reason = f"desired state for device {state.device_id[:128]!r} arrived at {device_id!r}"
            log.error("control.desired_refused", generation=state.generation, reason=reason)
            self._report(error=reason)
            return
        if state.generation <= self.applied_generation:
            return  # the retained copy again (every MQTT connect), or one overtaken by a newer state
        try:
            policy = parse_policy(state.policy_json, self.base_policy)
        except ConfigError as exc:
            log.error("control.desired_refused", generation=state.generation, reason=str(exc))
            self._report(error=f"generation {state.generation} refused: {exc}")
            return
        await self.apply_policy(policy)
        self.applied_generation, self.policy_hash = state.generation, state.policy_hash
        log.info("control.desired_applied", generation=state.generation, models=len(state.models))
        self._report()

    def _report(self, error: str = "") -> None:
        if self.control is None:
            return
        self.control.publish_reported(
            state_pb2.ReportedState(
                device_id=self.config.cloud.device_id,
                generation=self.applied_generation,
                models=[_model_status(s) for s in self.repository.status()],
                policy_hash=self.policy_hash,
                agent=self._agent_info,
                reported_at_ms=time.time_ns() // 1_000_000,
                error=error,
            )
        )

    def _start_metrics(self) -> HTTPServer | None:
        address = self.config.server.metrics_address
        if not address:
            return None
        # Read-only figures: unlike the inference API, a LAN address (for the fleet's Prometheus) is fine.
        try:
            host, port = parse_tcp_address(address)
        except ConfigError as exc:
            raise ConfigError(f"server.metrics_address {address!r} must be host:port") from exc
        try:
            # prometheus_client serves from its own daemon thread; it only reads our counters.
            httpd, _thread = start_http_server(port, addr=host, registry=self.metrics.registry)
        except OSError as exc:
            raise ConfigError(f"cannot serve metrics on server.metrics_address {address}: {exc.strerror}") from exc
        self.endpoints.metrics_port = int(httpd.server_port)
        return httpd

    async def _watchdog(self) -> None:
        interval = self.notifier.watchdog_interval_s
        if interval is None or not self.config.agent.watchdog:
            return
        # Pinged from the loop on purpose: a wedged loop stops the pings and systemd restarts the agent.
        while True:
            self.notifier.notify(WATCHDOG="1")
            await asyncio.sleep(interval)


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


def _model_status(status: ModelStatus) -> state_pb2.ModelStatus:
    """A version's state as the control plane reports it (LOADING covers verifying and building)."""
    if status.state is ModelState.FAILED:
        state = state_pb2.MODEL_STATE_FAILED
    elif status.state is ModelState.LOADING:
        state = state_pb2.MODEL_STATE_BUILDING
    else:
        state = state_pb2.MODEL_STATE_ACTIVE if status.active else state_pb2.MODEL_STATE_READY
    role = state_pb2.MODEL_ROLE_ACTIVE if status.active else state_pb2.MODEL_ROLE_UNSPECIFIED
    return state_pb2.ModelStatus(
        name=status.name, version=status.version, role=role, state=state, reason=status.reason, backend=status.backend
    )


def _stop_http_server(httpd: HTTPServer) -> None:
    httpd.shutdown()
    httpd.server_close()


def _ref(served: ServedModel) -> str:
    return f"{served.name}:{served.version}"


def _totals(served: ServedModel) -> dict[str, int]:
    """Lifetime request counts of a version, for the log line that closes a run."""
    snap = served.stats.snapshot()
    return {"success": snap.success.count, "failure": sum(snap.failures.values())}
