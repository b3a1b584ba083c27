"""The device-facing Enrollment service: a one-time token in, the device's identity out.

The call carries no bearer token: the enrollment token is the credential. The answer (device id, device
token, the fleet's public signing key, the endpoints, the labels, and with a fleet CA a client certificate
for the CSR the device sent) is everything `edge-agent enroll` writes to the device's data dir. Not the
token store (cloud_sync/store/enrollment.py) nor the admin API that mints tokens (cloud_sync/api_enrollment.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import grpc
import structlog

from cloud_sync.certificates import FleetCA, check_csr
from cloud_sync.errors import CloudSyncError, InvalidArgument
from cloud_sync.status import INTERNAL_MESSAGE, grpc_code, unexpected_error_fields
from cloud_sync.store.enrollment import MAX_ENROLLMENT_TOKEN_CHARS, EnrollmentRefused, EnrollmentTokens, Redemption
from edgefleet.proto.edgefleet.v1 import services_pb2

__all__ = ["DeviceAccounts", "EnrollmentServicer", "check_enroll_request"]

log = structlog.get_logger(__name__)

# Each AgentInfo string (a version, a hostname, a GPU name) is a line, not a document.
MAX_AGENT_FIELD_CHARS = 256
MAX_PROVIDERS = 32


class DeviceAccounts(Protocol):
    """What must exist for a device before it is told its identity (cloud_sync/broker_accounts.py)."""

    def create(self, device_id: str, device_token: str) -> None: ...

    def delete(self, device_id: str) -> None: ...


def _check_text(value: str, name: str) -> None:
    if len(value) > MAX_AGENT_FIELD_CHARS or not value.isprintable():
        raise InvalidArgument(f"agent.{name}: at most {MAX_AGENT_FIELD_CHARS} printable characters")


def check_enroll_request(request: services_pb2.EnrollRequest) -> None:
    """InvalidArgument naming the field for a request no device sends; the token's own checks come later."""
    token = request.token
    if not token:
        raise InvalidArgument("token: the one-time enrollment token is missing (fleetctl devices token create)")
    if len(token) > MAX_ENROLLMENT_TOKEN_CHARS or not (token.isascii() and token.isprintable()):
        raise InvalidArgument(f"token: at most {MAX_ENROLLMENT_TOKEN_CHARS} printable ASCII characters")
    agent = request.agent
    for name in ("agent_version", "python_version", "platform", "hostname", "onnxruntime_version", "tensorrt_version"):
        _check_text(getattr(agent, name), name)
    _check_text(agent.gpu, "gpu")
    if len(agent.providers) > MAX_PROVIDERS:
        raise InvalidArgument(f"agent.providers: at most {MAX_PROVIDERS}")
    for provider in agent.providers:
        _check_text(provider, "providers")
    if request.csr_pem:
        check_csr(request.csr_pem)  # before the token is used: a device with a broken CSR may try again


class EnrollmentServicer:
    """edgefleet.v1.Enrollment: register `add_service(server, services_pb2, "Enrollment", servicer)`."""

    def __init__(
        self,
        tokens: EnrollmentTokens,
        signing_public_key: bytes,
        endpoints: Callable[[], services_pb2.Endpoints],
        executor: ThreadPoolExecutor,
        on_enrolled: Callable[[str], None],
        accounts: DeviceAccounts | None = None,
        fleet_ca: FleetCA | None = None,
    ) -> None:
        """`endpoints` is called per enrollment (the gRPC port is known only once the server listens);
        `on_enrolled(device_id)` runs after the commit, on the executor (the reconciler computes the
        device's desired state); `accounts` makes the device's broker account before the commit; `fleet_ca`
        signs the device's CSR (without one a CSR is ignored and the device token is the only credential)."""
        self._tokens = tokens
        self._signing_public_key = signing_public_key
        self._endpoints = endpoints
        self._executor = executor
        self._on_enrolled = on_enrolled
        self._accounts = accounts
        self._fleet_ca = fleet_ca

    def _enroll(self, request: services_pb2.EnrollRequest) -> tuple[Redemption, bytes]:
        """Blocking: check the token, issue the certificate, prepare the broker account, commit (the token
        used, the device in); the redemption and the client certificate (PEM, empty without a fleet CA)."""
        check_enroll_request(request)
        redemption = self._tokens.reserve(request.token, request.agent.hostname)
        # Issued before the commit: a certificate that cannot be made leaves the token unused.
        certificate = b""
        if self._fleet_ca is not None and request.csr_pem:
            certificate = self._fleet_ca.issue(request.csr_pem, redemption.device_id)
        if self._accounts is not None:
            # Before the commit: a device is never told an identity the broker does not know. A failure
            # here leaves the token unused, so the device may try again.
            self._accounts.create(redemption.device_id, redemption.device_token)
        try:
            self._tokens.commit(request.token, redemption)
        except BaseException:
            if self._accounts is not None:
                self._accounts.delete(redemption.device_id)
            raise
        try:
            self._on_enrolled(redemption.device_id)
        except Exception as exc:  # the device is enrolled: the periodic reconcile pass catches up
            log.error("enrollment.on_enrolled_failed", device=redemption.device_id, **unexpected_error_fields(exc))
        return redemption, certificate

    async def Enroll(
        self, request: services_pb2.EnrollRequest, context: grpc.aio.ServicerContext
    ) -> services_pb2.EnrollResponse:
        loop = asyncio.get_running_loop()
        try:
            redemption, certificate = await loop.run_in_executor(self._executor, self._enroll, request)
        except grpc.aio.AbortError:
            raise
        except CloudSyncError as exc:
            reason = exc.reason if isinstance(exc, EnrollmentRefused) else type(exc).__name__
            log.warning("enrollment.refused", reason=reason, detail=exc.message, host=request.agent.hostname[:64])
            await context.abort(grpc_code(exc), exc.message)
            raise AssertionError("context.abort returned") from None  # pragma: no cover
        except Exception as exc:
            log.error("enrollment.internal_error", **unexpected_error_fields(exc))
            await context.abort(grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE)
            raise AssertionError("context.abort returned") from None  # pragma: no cover
        log.info(
            "enrollment.enrolled",
            device=redemption.device_id,
            labels=redemption.labels,
            host=request.agent.hostname,
            agent=request.agent.agent_version,
            certificate=bool(certificate),
        )
        return services_pb2.EnrollResponse(
            device_id=redemption.device_id,
            device_token=redemption.device_token,
            client_cert_pem=certificate,
            ca_cert_pem=self._fleet_ca.ca_pem if certificate and self._fleet_ca is not None else b"",
            signing_public_key=self._signing_public_key,
            endpoints=self._endpoints(),
            labels=redemption.labels,
        )
