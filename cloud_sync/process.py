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
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import structlog
import uvicorn

from cloud_sync.admin_token import admin_token
from cloud_sync.api import ApiContext, create_app
from cloud_sync.api_audit import audit_routes
from cloud_sync.api_auth import BearerAuth
from cloud_sync.api_compare import compare_routes
from cloud_sync.api_compress import compress_routes
from cloud_sync.api_enrollment import enrollment_routes
from cloud_sync.api_models import model_routes
from cloud_sync.api_policies import policy_routes
from cloud_sync.api_rollouts import rollout_routes
from cloud_sync.api_samples import samples_routes
from cloud_sync.api_state import DeviceStates, state_routes
from cloud_sync.api_tokens import token_routes
from cloud_sync.broker_accounts import DynsecAccounts
from cloud_sync.certificates import FleetCA, ServerTls
from cloud_sync.config import CloudSyncConfig, ConfigProblem
from cloud_sync.control import ControlServicer, DesiredChanges
from cloud_sync.control_mqtt import CHECK_EVERY_S, MqttControl
from cloud_sync.dashboard import dashboard_routes
from cloud_sync.enrollment import EnrollmentServicer
from cloud_sync.errors import CloudSyncError
from cloud_sync.health import add_health
from cloud_sync.reconciler import Reconciler
from cloud_sync.registry import DirectoryBlobStore, FleetSigner, ModelRegistry
from cloud_sync.registry.artifacts import ArtifactsServicer
from cloud_sync.registry.signer import SIGNING_KEY_FILE
from cloud_sync.registry.store import RENEW_EVERY_S
from cloud_sync.rollouts.controller import RolloutController
from cloud_sync.rollouts.metrics import RolloutMetrics
from cloud_sync.rollouts.service import RolloutService
from cloud_sync.rollouts.store import RolloutStore
from cloud_sync.store import (
    ApiTokens,
    AuditLog,
    Database,
    DeviceRegistry,
    PolicyStore,
    ResultStore,
    TelemetryStore,
    open_database,
)
from cloud_sync.store.assignments import AssignmentStore
from cloud_sync.store.control import ControlStore
from cloud_sync.store.enrollment import EnrollmentTokens
from cloud_sync.telemetry.metrics import TelemetryMetrics, metrics_registry
from cloud_sync.telemetry.subscriber import TelemetrySubscriber
from cloud_sync.uplink import DeviceAuthenticator, UplinkServicer
from edgefleet.addresses import AddressError, parse_host_port
from edgefleet.embedded_http import EmbeddedServer
from edgefleet.proto.edgefleet.v1 import services_pb2
from edgefleet.rpc import add_service

__all__ = ["CloudSync", "Endpoints"]

log = structlog.get_logger(__name__)

# Device streams (WatchDesired) stay open for days. Devices ping every 30 s while a call is open (the uplink's
# channel settings): gRPC's default lets a client ping only every 5 minutes and answers more with GOAWAY,
# which cut every stream after three pings. Our own pings find a device that lost power (no RST ever comes)
# within about 80 s, so its presence turns offline.
_GRPC_OPTIONS = [
    ("grpc.so_reuseport", 0),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.http2.max_pings_without_data", 0),
]


def _delete_all(accounts: DynsecAccounts, device_ids: list[str]) -> None:
    for device_id in device_ids:
        accounts.delete(device_id)


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
    enrollment_target: str = ""  # with mTLS on grpc.listen: where devices without a certificate enroll
    extra: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class _Certificates:
    """What [tls] and [fleet_ca] name, read once at start (the same checks check-config made)."""

    server: ServerTls | None
    fleet_ca: FleetCA | None

    @classmethod
    def read(cls, config: CloudSyncConfig) -> _Certificates:
        tls, ca = config.tls, config.fleet_ca
        return cls(
            ServerTls.read(tls.cert_file, tls.key_file, tls.client_ca_file) if tls.cert_file else None,
            FleetCA.read(ca.cert_file, ca.key_file, ca.validity_days) if ca.cert_file else None,
        )


def _server_credentials(tls: ServerTls, *, client_certificates: bool) -> grpc.ServerCredentials:
    return grpc.ssl_server_credentials(
        [(tls.key_pem, tls.cert_pem)],
        root_certificates=tls.client_ca_pem if client_certificates else None,
        require_client_auth=client_certificates,
    )


class CloudSync:
    def __init__(self, config: CloudSyncConfig) -> None:
        self.config = config
        self.registry = metrics_registry()
        self.endpoints = Endpoints()
        self._stop = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._io = ThreadPoolExecutor(config.grpc.ingest_threads, thread_name_prefix="ingest")
        self.control_store: ControlStore | None = None  # set once the database is open
        self.policy_store: PolicyStore | None = None  # set once the database is open
        self.model_registry: ModelRegistry | None = None  # set once the database is open
        self.enrollment_tokens: EnrollmentTokens | None = None  # set once the database is open
        self.broker_accounts: DynsecAccounts | None = None  # with mqtt.manage_accounts = "mosquitto-dynsec"
        self.assignment_store: AssignmentStore | None = None  # set once the database is open
        self.reconciler: Reconciler | None = None  # set once the database is open
        self.rollout_service: RolloutService | None = None  # set once the database is open
        self.control_link: MqttControl | None = None  # with a broker: desired states out, reports in
        self._certificates = _Certificates(None, None)  # read at start

    def model_in_use(self, name: str, version: int) -> list[str]:
        """What holds a model version (its delete is refused while any does): the assignments naming it, the
        devices whose desired state names it and the devices that report running it."""
        assert self.model_registry is not None and self.reconciler is not None
        held = self.reconciler.in_use(name, version)
        told = [f"device {d}" for d in self.model_registry.assigned(name, version)]
        return [*held, *(t for t in told if t not in held)]

    def _open_registry(self, db: Database) -> ModelRegistry:
        """The model registry: blobs in registry.blob_dir, the fleet key made on first start (blocking)."""
        registry = self.config.registry
        blobs = DirectoryBlobStore(Path(registry.blob_dir) if registry.blob_dir else self.config.data_dir / "blobs")
        key = Path(registry.signing_key_file) if registry.signing_key_file else self.config.data_dir / SIGNING_KEY_FILE
        return ModelRegistry(db, blobs, FleetSigner.open(key))

    def on_enrolled(self, device_id: str) -> None:
        """A device enrolled (called on an ingest thread, after the commit).

        The reconciler computes the device's first desired state now (its failure is logged; the periodic
        pass picks the device up).
        """
        log.debug("cloud_sync.device_enrolled", device=device_id)
        if self.reconciler is not None:
            self.reconciler.on_enrolled(device_id)

    def device_endpoints(self) -> services_pb2.Endpoints:
        """Where an enrolling device is told to connect: server.public_grpc_target (else the gRPC address this
        process listens on) and mqtt.device_url (else mqtt.url; empty: no broker, control over gRPC)."""
        mqtt = self.config.mqtt
        return services_pb2.Endpoints(
            grpc_target=self.config.server.public_grpc_target or self.endpoints.grpc_target,
            mqtt_url=mqtt.device_url or mqtt.url,
            topic_prefix=mqtt.topic_prefix,
        )

    def _start_accounts(self, devices: DeviceRegistry) -> DynsecAccounts | None:
        """The broker's device accounts, when cloud-sync manages them (reads a password file: off the loop).

        Enrolling creates a device's account, revoking disables it; at start every revoked device's account
        is disabled again (a revocation made while the broker was away), in the background."""
        mqtt = self.config.mqtt
        if mqtt.manage_accounts == "none":
            return None
        # Its own client id with a random part: it keeps no session, and a second cloud-sync started by
        # mistake cannot take over this one's.
        client_id = f"{mqtt.client_id or f'cloud-sync-{socket.gethostname()}'}-accounts-{secrets.token_hex(3)}"
        accounts = DynsecAccounts.from_config(mqtt, client_id)
        accounts.start()
        devices.on_revoked.append(accounts.disable)
        # A device known by its certificate (use_identity_as_username) is never asked for its password: a
        # disabled account lets it straight back in, and Mosquitto 2.0's dynsec ACLs ignore `disabled` (seen:
        # telemetry stored a second after the revocation). Its account and role go too, so it may do nothing.
        certificates = self._certificates.fleet_ca is not None
        if certificates:
            devices.on_revoked.append(accounts.delete)
        if mqtt.username:  # cloud-sync's own user may publish desired states (in the background, as below)
            granted = self._io.submit(accounts.grant_cloud_sync, [mqtt.username])
            granted.add_done_callback(
                lambda f: f.exception() and log.error("broker_accounts.cloud_role_failed", error=str(f.exception()))
            )
        revoked = [d.device_id for d in devices.list_devices() if d.revoked]
        if revoked:
            future = self._io.submit(accounts.disable_all, revoked)
            future.add_done_callback(
                lambda f: f.exception() and log.warning("broker_accounts.resync_failed", error=str(f.exception()))
            )
            if certificates:
                deleted = self._io.submit(_delete_all, accounts, revoked)
                deleted.add_done_callback(
                    lambda f: f.exception() and log.warning("broker_accounts.resync_failed", error=str(f.exception()))
                )
        return accounts

    def _enrollment(self) -> EnrollmentServicer:
        assert self.enrollment_tokens is not None and self.model_registry is not None
        return EnrollmentServicer(
            self.enrollment_tokens,
            self.model_registry.signer.public_key,
            self.device_endpoints,
            self._io,
            self.on_enrolled,
            self.broker_accounts,
            self._certificates.fleet_ca,
        )

    def on_policy_change(self) -> None:
        """A policy was set or deleted (called on the admin API's thread, after the commit).

        The reconciler recomputes every device's desired state before the API answers (its failure is
        logged; the periodic pass retries).
        """
        log.info("cloud_sync.policy_changed")
        if self.reconciler is not None:
            self.reconciler.on_change()

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
        grace = self.config.server.shutdown_grace_s
        await asyncio.to_thread(self.config.data_dir.mkdir, parents=True, exist_ok=True)
        self._certificates = await asyncio.to_thread(_Certificates.read, self.config)
        # Whatever started is stopped again in reverse order on the way out, also when a later part fails to
        # start (a taken port): a grpc.aio server left running complains from its finalizer on a closed loop.
        # Blocking steps of the way out (joining the ingest threads, closing the database) run on threads.
        async with contextlib.AsyncExitStack() as started:
            started.push_async_callback(asyncio.to_thread, self._io.shutdown, True)
            db: Database = await loop.run_in_executor(self._io, open_database, self.config.database_url)
            started.push_async_callback(asyncio.to_thread, db.close)
            devices, results, telemetry = DeviceRegistry(db), ResultStore(db), TelemetryStore(db)
            self.control_store = control_store = ControlStore(db)
            self.policy_store = PolicyStore(db)
            self.model_registry = await asyncio.to_thread(self._open_registry, db)
            self.enrollment_tokens = EnrollmentTokens(db, devices)
            self.assignment_store = AssignmentStore(db)
            rollout_store = RolloutStore(db)
            self.reconciler = Reconciler(
                devices, self.assignment_store, self.policy_store, self.model_registry, control_store, rollout_store
            )
            self.rollout_service = RolloutService(
                db, self.reconciler, self.assignment_store, self.model_registry, devices
            )
            self.broker_accounts = await asyncio.to_thread(self._start_accounts, devices)
            if self.broker_accounts is not None:
                started.push_async_callback(asyncio.to_thread, self.broker_accounts.close)
            changes = DesiredChanges(control_store, loop)
            # One authenticator (one token cache) for both device services: a token is looked up once per
            # AUTH_CACHE_S whichever service the device calls, and revocation takes effect in both together.
            auth = DeviceAuthenticator(devices)
            # A revocation made here cuts the device off at once: its cached token and its open control streams.
            devices.on_revoked += [auth.forget, changes.revoked]
            control = ControlServicer(auth, control_store, telemetry, self._io, changes, self.registry)
            started.push_async_callback(asyncio.to_thread, control.presence.close)
            # Both ports are claimed before anything else starts: a second `cloud-sync run` on the same config
            # must fail here, before its MQTT client (the same client id) takes the running one's session.
            server = self._grpc_server(auth, results, control)
            started.push_async_callback(server.stop, None)  # unstarted, or stopped already: returns at once
            await self._claim_grpc_port(server)
            enrolling = self._enrollment_server()
            if enrolling is not None:
                started.push_async_callback(enrolling.stop, None)
            sock = self._claim_http_port()
            started.callback(sock.close)
            subscriber = await asyncio.to_thread(self._start_telemetry, telemetry)
            if subscriber is not None:
                # Closing stores and acknowledges what is queued (blocking): off the loop.
                started.push_async_callback(asyncio.to_thread, subscriber.close)
            self.registry.register(TelemetryMetrics(telemetry, subscriber))
            self.registry.register(RolloutMetrics(db))
            self.control_link = await asyncio.to_thread(self._start_control_link, control_store)
            if self.control_link is not None:
                started.push_async_callback(asyncio.to_thread, self.control_link.close)
            http = await self._start_http(sock, db, devices, results, telemetry)
            started.push_async_callback(self._stop_http, http)
            await server.start()
            if enrolling is not None:
                await enrolling.start()
                started.push_async_callback(enrolling.stop, grace)
            # Stopped first: devices' calls in flight get the grace period while the admin API still answers.
            started.push_async_callback(server.stop, grace)
            polling = asyncio.ensure_future(changes.poll(self._io))
            started.callback(polling.cancel)
            assert self.reconciler is not None
            reconciling = asyncio.ensure_future(self.reconciler.run_periodically(self._io))
            started.callback(reconciling.cancel)
            renewing = asyncio.ensure_future(self._renew_signatures())
            started.callback(renewing.cancel)
            # Every replica runs the loop; only the one holding the rollouts' lock steps (controller.py).
            rollouts = RolloutController(self.rollout_service, control_store, self.config.rollouts.tick_s)
            started.push_async_callback(asyncio.to_thread, rollouts.close)
            stepping = asyncio.ensure_future(rollouts.run(self._io))
            started.callback(stepping.cancel)
            if handle_signals:
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.add_signal_handler(sig, self.stop)
                    started.callback(loop.remove_signal_handler, sig)
            log.info(
                "cloud_sync.ready",
                seconds=round(time.monotonic() - began, 3),
                grpc=self.endpoints.grpc_target,
                grpc_tls=self._grpc_tls_mode(),
                http=self.endpoints.http_url,
                database=db.url,
                **({"enrollment": self.endpoints.enrollment_target} if self.endpoints.enrollment_target else {}),
                pid=os.getpid(),
            )
            await self._stop.wait()
            log.info("cloud_sync.stopping", grace_s=grace)
        log.info("cloud_sync.stopped")

    async def _renew_signatures(self, interval_s: float = RENEW_EVERY_S) -> None:
        """Until cancelled: every `interval_s` (the first at once), sign again the manifests past half their
        validity, so none expires under the fleet while the key is online (a failure is logged and retried)."""
        assert self.model_registry is not None
        loop = asyncio.get_running_loop()
        while True:
            try:
                renewed = await loop.run_in_executor(self._io, self.model_registry.renew_expiring)
                if renewed:
                    log.info("registry.renewed", versions=[v.ref for v in renewed])
            except CloudSyncError as exc:
                log.warning("registry.renew_failed", error=exc.message)
            await asyncio.sleep(interval_s)

    async def _stop_http(self, server: uvicorn.Server) -> None:
        server.should_exit = True
        await self._http_task

    def _grpc_server(
        self, auth: DeviceAuthenticator, results: ResultStore, control: ControlServicer
    ) -> grpc.aio.Server:
        limit = self.config.grpc.max_message_bytes
        server = grpc.aio.server(options=[("grpc.max_receive_message_length", limit), *_GRPC_OPTIONS])
        add_service(
            server,
            services_pb2,
            "Uplink",
            UplinkServicer(auth, results, self._io, self.registry),
        )
        add_service(server, services_pb2, "Control", control)
        assert self.model_registry is not None and self.control_store is not None
        artifacts = ArtifactsServicer(auth, self.model_registry, self.control_store, self._io, self.registry)
        add_service(server, services_pb2, "Artifacts", artifacts)
        if not self.config.grpc.enrollment_listen:  # else on a port of its own, without client certificates
            add_service(server, services_pb2, "Enrollment", self._enrollment())
        add_health(server)
        return server

    def _grpc_tls_mode(self) -> str:
        """What the ready line says of the device port: plaintext, tls or mtls (client certificates required)."""
        server = self._certificates.server
        if server is None:
            return "plaintext"
        return "mtls" if server.client_ca_pem is not None else "tls"

    def _add_port(self, server: grpc.aio.Server, address: str, key: str, *, client_certificates: bool) -> int:
        host, port = _host_port(address, key)
        tls = self._certificates.server
        try:
            if tls is None:
                return int(server.add_insecure_port(f"{host}:{port}"))
            credentials = _server_credentials(tls, client_certificates=client_certificates)
            return int(server.add_secure_port(f"{host}:{port}", credentials))
        except RuntimeError as exc:
            raise ConfigProblem(f"cannot listen on {key} {address}: {exc}") from exc

    async def _claim_grpc_port(self, server: grpc.aio.Server) -> None:
        listen = self.config.grpc.listen
        mtls = self._grpc_tls_mode() == "mtls"
        self.endpoints.grpc_port = self._add_port(server, listen, "grpc.listen", client_certificates=mtls)
        self.endpoints.grpc_target = f"{_host_port(listen, 'grpc.listen')[0]}:{self.endpoints.grpc_port}"

    def _enrollment_server(self) -> grpc.aio.Server | None:
        """With mTLS on grpc.listen: Enrollment alone on grpc.enrollment_listen, server-side TLS only (a device
        has no client certificate before it enrolls). Claimed with the other ports, started with them."""
        listen = self.config.grpc.enrollment_listen
        if not listen:
            return None
        server = grpc.aio.server(options=_GRPC_OPTIONS)
        add_service(server, services_pb2, "Enrollment", self._enrollment())
        port = self._add_port(server, listen, "grpc.enrollment_listen", client_certificates=False)
        self.endpoints.enrollment_target = f"{_host_port(listen, 'grpc.enrollment_listen')[0]}:{port}"
        return server

    def _claim_http_port(self) -> socket.socket:
        host, port = _host_port(self.config.http.listen, "http.listen")
        # Bound here, not by uvicorn: a taken port is then our config error, not uvicorn's sys.exit(1).
        try:
            sock = socket.create_server((host, port), reuse_port=False)
        except OSError as exc:
            raise ConfigProblem(
                f"cannot serve the admin API on http.listen {self.config.http.listen}: {exc.strerror}"
            ) from exc
        self.endpoints.http_port = int(sock.getsockname()[1])
        scheme = "https" if self._certificates.server is not None else "http"
        self.endpoints.http_url = f"{scheme}://{host}:{self.endpoints.http_port}"
        return sock

    def _start_telemetry(self, store: TelemetryStore) -> TelemetrySubscriber | None:
        """Telemetry and presence from the broker, when one is configured (replicas share the messages).

        Reads the broker's password file: call it off the loop."""
        mqtt = self.config.mqtt
        if not mqtt.url:
            return None
        client_id = mqtt.client_id or f"cloud-sync-{socket.gethostname()}"
        subscriber = TelemetrySubscriber.from_config(mqtt, store, client_id=client_id)
        subscriber.start()
        self.endpoints.extra["mqtt"] = mqtt.url
        return subscriber

    def _start_control_link(self, control: ControlStore) -> MqttControl | None:
        """Desired states out and reported states in over the broker, when one is configured (with none, the
        gRPC Control stream delivers). Reads the broker's password file: call it off the loop."""
        mqtt = self.config.mqtt
        if not mqtt.url:
            return None
        base = mqtt.client_id or f"cloud-sync-{socket.gethostname()}"
        after = mqtt.republish_after_s
        link = MqttControl.from_config(
            mqtt,
            control,
            client_id=f"{base}-control",
            republish_after_s=after,
            check_every_s=min(CHECK_EVERY_S, after / 3),
        )
        link.start()
        return link

    async def _start_http(
        self,
        sock: socket.socket,
        db: Database,
        devices: DeviceRegistry,
        results: ResultStore,
        telemetry: TelemetryStore,
    ) -> uvicorn.Server:
        # The first start writes the token file (and fsyncs it and its directory); building the app costs
        # 0.1-0.15 s of CPU (FastAPI's routes and models, measured): both off the loop.
        token = await asyncio.to_thread(admin_token, self.config.data_dir)
        # One BearerAuth (one token cache) for every route: a revoke through this replica drops its entries.
        tokens = ApiTokens(db)
        auth = BearerAuth(token, tokens)
        audit = AuditLog(db)
        assert self.policy_store is not None, "the database is open before the admin API starts"
        routes = [policy_routes(self.policy_store, devices, auth, self.on_policy_change, audit)]
        assert self.model_registry is not None
        max_blob = self.config.registry.max_blob_bytes
        routes.append(model_routes(self.model_registry, auth, self.model_in_use, max_blob, audit))
        routes.append(compress_routes(db, self.model_registry, auth, audit))
        assert self.enrollment_tokens is not None
        routes.append(enrollment_routes(self.enrollment_tokens, auth, audit))
        assert self.assignment_store is not None and self.reconciler is not None and self.control_store is not None
        states = DeviceStates(self.control_store, self.reconciler.problems)
        digests = self.model_registry.digests
        routes.append(
            state_routes(
                self.assignment_store,
                devices,
                states,
                auth,
                lambda name, version: digests().get((name, version)),
                self.reconciler.on_change,
                audit,
                self.rollout_service.variant if self.rollout_service is not None else None,
            )
        )
        routes.append(compare_routes(db, telemetry, devices, auth))
        assert self.rollout_service is not None, "made with the stores, before the admin API starts"
        routes.append(rollout_routes(self.rollout_service, auth))
        routes.append(token_routes(tokens, auth))
        routes.append(audit_routes(audit, auth))
        routes.append(samples_routes(db, auth, audit))
        routes.append(dashboard_routes(db, telemetry, devices, auth))
        context = ApiContext(
            devices,
            results,
            auth,
            self.registry,
            extra_routes=routes,
            telemetry=telemetry,
            max_body_bytes=self.config.http.max_body_bytes,
            device_states=states,
            audit=audit,
        )
        app = await asyncio.to_thread(create_app, context)
        tls = self._certificates.server
        # The admin API never asks for client certificates: operators authenticate with the bearer token.
        server = EmbeddedServer(
            uvicorn.Config(
                app,
                log_config=None,
                access_log=False,
                lifespan="off",
                ssl_certfile=tls.cert_file if tls is not None else None,
                ssl_keyfile=tls.key_file if tls is not None else None,
            )
        )
        self._http_task = asyncio.ensure_future(server.serve(sockets=[sock]))
        return server
