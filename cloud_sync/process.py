"""The cloud-sync process: device-facing gRPC, the admin HTTP API, and (with a broker) telemetry ingest.

One asyncio loop serves gRPC (grpc.aio) and HTTP (uvicorn); the database is synchronous SQLAlchemy on
named threads. State lives in the database, so replicas are interchangeable (DESIGN.md "Beyond one machine").
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import socket
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import structlog
import uvicorn
from prometheus_client import CollectorRegistry

from cloud_sync.api import ApiContext, create_app
from cloud_sync.config import CloudSyncConfig, ConfigProblem
from cloud_sync.store import Database, DeviceRegistry, ResultStore, TelemetryStore, open_database
from cloud_sync.telemetry.metrics import TelemetryMetrics
from cloud_sync.telemetry.subscriber import TelemetrySubscriber
from cloud_sync.uplink import DeviceAuthenticator, UplinkServicer
from edgefleet.addresses import AddressError, parse_host_port
from edgefleet.durable import fsync_dir
from edgefleet.proto.edgefleet.v1 import services_pb2
from edgefleet.rpc import add_service

__all__ = ["CloudSync", "Endpoints", "admin_token"]

log = structlog.get_logger(__name__)

ADMIN_TOKEN_FILE = "admin-token"
# Shorter than any token admin_token makes (47 characters); a person may put their own, but not a guessable one.
MIN_ADMIN_TOKEN_CHARS = 32


def admin_token(data_dir: Path) -> str:
    """The admin API token in data_dir (made on first use, mode 0600).

    Raises ConfigProblem for a token file that holds no token: the API would take an empty bearer token.
    """
    path = data_dir / ADMIN_TOKEN_FILE
    try:
        return _checked_token(path, path.read_text().strip())
    except FileNotFoundError:
        pass
    data_dir.mkdir(parents=True, exist_ok=True)
    # Linked into place, never renamed over it: of several processes making it at once (`cloud-sync
    # admin-token` beside a first `cloud-sync run`), the first one's token stands and every one returns it.
    fd, tmp = tempfile.mkstemp(prefix=f".{ADMIN_TOKEN_FILE}.", suffix=".tmp", dir=data_dir)  # mode 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(f"efa_{secrets.token_urlsafe(32)}\n".encode())
            f.flush()
            os.fsync(f.fileno())
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)
    finally:
        os.unlink(tmp)
    fsync_dir(data_dir)
    return _checked_token(path, path.read_text().strip())


def _checked_token(path: Path, token: str) -> str:
    if len(token) < MIN_ADMIN_TOKEN_CHARS or not (token.isascii() and token.isprintable()):
        raise ConfigProblem(
            f"the admin token file {path} holds no valid token (at least {MIN_ADMIN_TOKEN_CHARS} printable ASCII "
            "characters): delete it and cloud-sync makes a new one"
        )
    return token


def _host_port(address: str, key: str) -> tuple[str, int]:
    try:
        return parse_host_port(address)
    except AddressError as exc:
        raise ConfigProblem(f"{key}: {exc}") from None


@dataclass
class Endpoints:
    grpc_port: int = 0
    http_port: int = 0
    grpc_target: str = ""
    http_url: str = ""
    extra: dict[str, str] = field(default_factory=dict)


class CloudSync:
    def __init__(self, config: CloudSyncConfig) -> None:
        self.config = config
        self.registry = CollectorRegistry()
        self.endpoints = Endpoints()
        self._stop = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._io = ThreadPoolExecutor(config.grpc.ingest_threads, thread_name_prefix="ingest")

    def stop(self) -> None:
        """Drain and exit (what SIGTERM does); safe from any thread."""
        if self._loop is None:
            self._stop.set()
        else:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._stop.set)

    async def run(self, *, handle_signals: bool = True) -> None:
        loop = self._loop = asyncio.get_running_loop()
        began = time.monotonic()
        self.config.data_dir.mkdir(parents=True, exist_ok=True)
        # Whatever started is stopped again in reverse order on the way out, also when a later part fails to
        # start (a taken port): a grpc.aio server left running complains from its finalizer on a closed loop.
        async with contextlib.AsyncExitStack() as started:
            started.callback(self._io.shutdown, wait=True)
            db: Database = await loop.run_in_executor(self._io, open_database, self.config.database_url)
            started.callback(db.close)
            devices, results, telemetry = DeviceRegistry(db), ResultStore(db), TelemetryStore(db)
            subscriber = self._start_telemetry(telemetry)
            if subscriber is not None:
                # Closing stores and acknowledges what is queued (blocking): off the loop.
                started.push_async_callback(self._close_subscriber, subscriber)
            self.registry.register(TelemetryMetrics(telemetry, subscriber))
            http = await self._start_http(devices, results, telemetry)
            started.push_async_callback(self._stop_http, http)
            server = await self._start_grpc(devices, results)
            # Stopped first: devices' calls in flight get the grace period while the admin API still answers.
            started.push_async_callback(server.stop, self.config.server.shutdown_grace_s)
            if handle_signals:
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.add_signal_handler(sig, self.stop)
                    started.callback(loop.remove_signal_handler, sig)
            log.info(
                "cloud_sync.ready",
                seconds=round(time.monotonic() - began, 3),
                grpc=self.endpoints.grpc_target,
                http=self.endpoints.http_url,
                database=db.url,
                pid=os.getpid(),
            )
            await self._stop.wait()
            log.info("cloud_sync.stopping", grace_s=self.config.server.shutdown_grace_s)
        log.info("cloud_sync.stopped")

    async def _stop_http(self, server: uvicorn.Server) -> None:
        server.should_exit = True
        await self._http_task

    async def _start_grpc(self, devices: DeviceRegistry, results: ResultStore) -> grpc.aio.Server:
        limit = self.config.grpc.max_message_bytes
        server = grpc.aio.server(options=[("grpc.max_receive_message_length", limit), ("grpc.so_reuseport", 0)])
        add_service(
            server,
            services_pb2,
            "Uplink",
            UplinkServicer(DeviceAuthenticator(devices), results, self._io, self.registry),
        )
        host, port = _host_port(self.config.grpc.listen, "grpc.listen")
        try:
            self.endpoints.grpc_port = server.add_insecure_port(f"{host}:{port}")
        except RuntimeError as exc:
            await server.stop(None)
            raise ConfigProblem(f"cannot listen on grpc.listen {self.config.grpc.listen}: {exc}") from exc
        await server.start()
        self.endpoints.grpc_target = f"{host}:{self.endpoints.grpc_port}"
        return server

    async def _close_subscriber(self, subscriber: TelemetrySubscriber) -> None:
        await asyncio.get_running_loop().run_in_executor(None, subscriber.close)

    def _start_telemetry(self, store: TelemetryStore) -> TelemetrySubscriber | None:
        """Telemetry and presence from the broker, when one is configured (replicas share the messages)."""
        mqtt = self.config.mqtt
        if not mqtt.url:
            return None
        client_id = mqtt.client_id or f"cloud-sync-{socket.gethostname()}"
        subscriber = TelemetrySubscriber.from_config(mqtt, store, client_id=client_id)
        subscriber.start()
        self.endpoints.extra["mqtt"] = mqtt.url
        return subscriber

    async def _start_http(
        self, devices: DeviceRegistry, results: ResultStore, telemetry: TelemetryStore
    ) -> uvicorn.Server:
        token = admin_token(self.config.data_dir)
        app = create_app(ApiContext(devices, results, token, self.registry, telemetry=telemetry))
        host, port = _host_port(self.config.http.listen, "http.listen")
        # Bound here, not by uvicorn: a taken port is then our config error, not uvicorn's sys.exit(1).
        try:
            sock = socket.create_server((host, port), reuse_port=False)
        except OSError as exc:
            raise ConfigProblem(
                f"cannot serve the admin API on http.listen {self.config.http.listen}: {exc.strerror}"
            ) from exc
        server = _EmbeddedServer(uvicorn.Config(app, log_config=None, access_log=False, lifespan="off"))
        self._http_task = asyncio.ensure_future(server.serve(sockets=[sock]))
        self.endpoints.http_port = int(sock.getsockname()[1])
        self.endpoints.http_url = f"http://{host}:{self.endpoints.http_port}"
        return server


class _EmbeddedServer(uvicorn.Server):
    """uvicorn inside cloud-sync's loop: cloud-sync owns SIGTERM and SIGINT, uvicorn must not take them."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield
