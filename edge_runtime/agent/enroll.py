"""`edge-agent enroll`: trade a one-time enrollment token for the device's identity, and write it.

One Enrollment.Enroll call to cloud-sync (gRPC, TLS when a CA file is given; plaintext only to loopback, as
the uplink), then agent/identity.py writes what came back. An existing identity is kept unless `force`,
checked before the call so a refused overwrite does not use up the token. Not the agent's runtime use of the
identity (identity.apply_identity).
"""

from __future__ import annotations

import platform
import socket
import sys
import time
from pathlib import Path

import grpc

from edge_runtime import __version__
from edge_runtime.agent.identity import DEVICE_FILE, Identity, identity_dir
from edge_runtime.errors import EdgeRuntimeError
from edgefleet.addresses import AddressError, is_loopback, parse_broker_url, parse_host_port
from edgefleet.proto.edgefleet.v1 import services_pb2, services_pb2_grpc, state_pb2

__all__ = ["EnrollmentFailed", "EnrollmentRefused", "enroll", "parse_enroll_url"]

ENROLL_TIMEOUT_S = 30.0
_PEM_CERTIFICATE = b"-----BEGIN CERTIFICATE-----"
# The cloud will refuse the same request again: a person must act (a new token, another device id).
_REFUSALS = {
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.FAILED_PRECONDITION,
}


class EnrollmentRefused(EdgeRuntimeError):
    """Bad input or a token the cloud refused (used, expired, unknown); the message says what to do (exit 2)."""


class EnrollmentFailed(EdgeRuntimeError):
    """cloud-sync could not be reached or failed; trying again may help (exit 1)."""


def parse_enroll_url(url: str) -> str:
    """`HOST:PORT` or `grpc://HOST:PORT` -> the gRPC target HOST:PORT; EnrollmentRefused otherwise."""
    target = url.removeprefix("grpc://")
    try:
        host, port = parse_host_port(target)
    except AddressError as exc:
        raise EnrollmentRefused(f"--url: {exc} (cloud-sync's gRPC address, e.g. cloud.example:7000)") from None
    if port == 0 or "/" in host:
        raise EnrollmentRefused(f"--url {url!r}: give cloud-sync's gRPC host:port, e.g. cloud.example:7000")
    return target


def _channel(target: str, ca_file: str | None) -> grpc.Channel:
    if ca_file:
        try:
            ca = Path(ca_file).read_bytes()
        except OSError as exc:
            raise EnrollmentRefused(f"cannot read --ca-file {ca_file}: {exc.strerror}") from exc
        if _PEM_CERTIFICATE not in ca:
            raise EnrollmentRefused(f"--ca-file {ca_file} holds no PEM certificate (-----BEGIN CERTIFICATE-----)")
        return grpc.secure_channel(target, grpc.ssl_channel_credentials(ca))
    host, _port = parse_host_port(target)
    if not is_loopback(host):
        raise EnrollmentRefused(
            f"{target} is not loopback: give --ca-file (or cloud.ca_file) to enroll over TLS; the token and the "
            "device's credential must not cross the network in plaintext"
        )
    return grpc.insecure_channel(target)


def _agent_info() -> state_pb2.AgentInfo:
    return state_pb2.AgentInfo(
        agent_version=__version__,
        python_version=platform.python_version(),
        platform=f"{sys.platform}-{platform.machine()}",
        hostname=socket.gethostname()[:256],
    )


def _check_response(response: services_pb2.EnrollResponse) -> None:
    """A response the device can live with; else EnrollmentFailed (the cloud answered nonsense)."""
    problems = []
    if not response.device_id or not response.device_token:
        problems.append("no device id or token")
    if len(response.signing_public_key) != 32:
        problems.append(f"a fleet key of {len(response.signing_public_key)} bytes, not 32")
    try:
        if response.endpoints.grpc_target:
            parse_host_port(response.endpoints.grpc_target)
        if response.endpoints.mqtt_url:
            parse_broker_url(response.endpoints.mqtt_url)
    except AddressError as exc:
        problems.append(str(exc))
    if problems:
        raise EnrollmentFailed(f"cloud-sync's enrollment answer is unusable ({'; '.join(problems)}): nothing written")


def enroll(
    url: str,
    token: str,
    data_dir: Path,
    *,
    ca_file: str | None = None,
    force: bool = False,
    timeout_s: float = ENROLL_TIMEOUT_S,
) -> Identity:
    """Enroll with `token` at cloud-sync's gRPC `url` and write the identity into `data_dir`."""
    token = token.strip()
    if not token or len(token) > 128 or not (token.isascii() and token.isprintable()):
        raise EnrollmentRefused("--token: give the one-time token `fleetctl devices token create` printed")
    target = parse_enroll_url(url)
    existing = identity_dir(data_dir) / DEVICE_FILE
    if existing.exists() and not force:
        raise EnrollmentRefused(
            f"this device is enrolled already ({existing}): pass --force to replace its identity (the old device "
            "id stays registered in the cloud until revoked)"
        )
    channel = _channel(target, ca_file)
    try:
        stub = services_pb2_grpc.EnrollmentStub(channel)
        request = services_pb2.EnrollRequest(token=token, agent=_agent_info())
        response: services_pb2.EnrollResponse = stub.Enroll(request, timeout=timeout_s)
    except grpc.RpcError as exc:
        code, details = exc.code(), exc.details() or ""
        if code in _REFUSALS:
            raise EnrollmentRefused(f"cloud-sync refused the enrollment: {details}") from None
        raise EnrollmentFailed(
            f"cannot enroll at cloud-sync {target} ({code.name}: {details}); check the address and try again "
            "(the token is still unused)"
        ) from None
    finally:
        channel.close()
    _check_response(response)
    endpoints = response.endpoints
    return Identity.save(
        data_dir,
        device_id=response.device_id,
        device_token=response.device_token,
        signing_key=response.signing_public_key,
        # Empty: the cloud names no public address; the one the device just reached is the one to use.
        grpc_target=endpoints.grpc_target or target,
        mqtt_url=endpoints.mqtt_url,
        topic_prefix=endpoints.topic_prefix,
        labels=dict(response.labels),
        enrolled_at_ms=time.time_ns() // 1_000_000,
    )
