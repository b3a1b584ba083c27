"""The edge-agent lifecycle: listen, load the active models, serve, and drain on SIGTERM.

One asyncio loop owns the network; model loading and shutdown of engines run on a named loader thread so
the loop keeps answering health probes and pinging systemd's watchdog meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
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
from edge_runtime.models.repository import ModelRepository
from edge_runtime.models.served import ServedModel
from edge_runtime.observability.metrics import AgentMetrics
from edge_runtime.outbox import Outbox
from edge_runtime.sync.mqtt import MqttLink
from edge_runtime.sync.uplink import Uploader, read_token
from edge_runtime.telemetry import SystemProbe, TelemetryCollector

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
        token = read_token(config.cloud) if config.cloud.grpc_target else ""
        if config.mqtt.url and not config.cloud.device_id:
            raise ConfigError("mqtt.url is set but cloud.device_id is not: topics are named after the device")
        config.data_dir.mkdir(parents=True, exist_ok=True)
        self.outbox = Outbox.open(
            config.data_dir / OUTBOX_FILE, max_bytes=config.buffer.max_bytes, max_age_s=config.buffer.max_age_s
        )
        self.keeper = Keeper(self.outbox, config.upload.sample_rate)
        self.repository = ModelRepository(config, self.metrics, self.keeper)
        self.uploader = Uploader(self.outbox, config.cloud, config.upload, token) if token else None
        self.link: MqttLink | None = None
        self.endpoints = AgentEndpoints()
        self.started = asyncio.Event()
        self._stop = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model-loader")

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
        telemetry = self._start_telemetry(loop)
        # READY to systemd once apps can connect; model readiness is ServerReady's business (a TensorRT
        # build may take minutes, longer than any sensible TimeoutStartSec).
        self.notifier.notify(READY="1", STATUS="listening; loading models")
        self.started.set()
        try:
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
            await loop.run_in_executor(self._loader, self.repository.close, grace)
            if uploading is not None:
                # A stream cut here is safe: its records stay in the outbox, marked in doubt, and go again.
                uploading.cancel()
                await asyncio.gather(uploading, return_exceptions=True)
            if telemetry is not None:
                telemetry.cancel()
                await asyncio.gather(telemetry, return_exceptions=True)
            if self.link is not None:
                await self.link.aclose()  # publishes status offline first
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

    def _start_telemetry(self, loop: asyncio.AbstractEventLoop) -> asyncio.Future[None] | None:
        """Presence and telemetry over MQTT when a broker is configured; the agent works the same without."""
        if not self.config.mqtt.url:
            return None
        self.link = MqttLink.from_config(self.config, loop)
        self.link.start()
        collector = TelemetryCollector(
            self.config.cloud.device_id,
            self.repository,
            outbox=self.outbox,
            system=SystemProbe().read,
            interval_s=self.config.telemetry.interval_s,
        )
        return asyncio.ensure_future(collector.run(self.link.publish_telemetry))

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


def _stop_http_server(httpd: HTTPServer) -> None:
    httpd.shutdown()
    httpd.server_close()


def _ref(served: ServedModel) -> str:
    return f"{served.name}:{served.version}"


def _totals(served: ServedModel) -> dict[str, int]:
    """Lifetime request counts of a version, for the log line that closes a run."""
    snap = served.stats.snapshot()
    return {"success": snap.success.count, "failure": sum(snap.failures.values())}
