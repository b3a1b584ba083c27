"""`edge-agent enroll`: trade a one-time enrollment token for the device's identity, and write it.

One Enrollment.Enroll call to cloud-sync (gRPC, TLS when a CA file is given; plaintext only to loopback, as
the uplink), carrying a CSR for a key made here (EC P-256; the key never leaves the device), then
agent/identity.py writes what came back: with a fleet CA on the cloud, a client certificate for that key.
An existing identity is kept unless `force`, checked before the call so a refused overwrite does not use up
the token. Not the agent's runtime use of the
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
from edge_runtime.agent.identity import DEVICE_FILE, ClientCertificate, Identity, identity_dir
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


def _read_ca(ca_file: str) -> bytes:
    try:
        ca = Path(ca_file).read_bytes()
    except OSError as exc:
        raise EnrollmentRefused(f"cannot read --ca-file {ca_file}: {exc.strerror}") from exc
    if _PEM_CERTIFICATE not in ca:
        raise EnrollmentRefused(f"--ca-file {ca_file} holds no PEM certificate (-----BEGIN CERTIFICATE-----)")
    return ca


def _channel(target: str, ca: bytes | None) -> grpc.Channel:
    if ca is not None:
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


def _key_and_csr() -> tuple[bytes, bytes]:
    """A new EC P-256 key (PEM, unencrypted: it lives 0600 in the identity dir) and a CSR for it.

    P-256: what every TLS stack (Mosquitto's OpenSSL, gRPC's BoringSSL) takes for client authentication.
    The subject is left to the cloud, which names the certificate after the device id it assigns."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(key, hashes.SHA256())
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return key_pem, csr.public_bytes(serialization.Encoding.PEM)


def _failure(target: str, ca_file: str | None, code: grpc.StatusCode, details: str) -> EnrollmentFailed:
    """What to tell the operator when the call did not get through; a TLS failure names the CA file."""
    if ca_file and any(word in details for word in ("CERTIFICATE_VERIFY_FAILED", "certificate verify failed")):
        return EnrollmentFailed(
            f"cloud-sync's TLS certificate at {target} does not verify against --ca-file {ca_file} "
            f"(CERTIFICATE_VERIFY_FAILED): give the CA that signed cloud-sync's tls.cert_file ({details})"
        )
    if ca_file and any(word in details for word in ("handshake", "SSL", "TLS")):
        return EnrollmentFailed(
            f"no TLS connection to cloud-sync at {target} with --ca-file {ca_file} ({code.name}: {details}); "
            "does it serve TLS (tls.cert_file), and does its certificate name this host?"
        )
    return EnrollmentFailed(
        f"cannot enroll at cloud-sync {target} ({code.name}: {details}); check the address and try again "
        "(the token is still unused)"
    )


def _client_certificate(response: services_pb2.EnrollResponse, key_pem: bytes) -> ClientCertificate | None:
    """The certificate the cloud issued for our key, checked; None when the cloud issues none."""
    if not response.client_cert_pem:
        return None
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        cert = x509.load_pem_x509_certificate(response.client_cert_pem)
        x509.load_pem_x509_certificates(response.ca_cert_pem)
    except ValueError as exc:
        raise EnrollmentFailed(
            f"cloud-sync sent a client certificate that does not parse ({exc}): nothing written"
        ) from None
    key = serialization.load_pem_private_key(key_pem, password=None)
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    if cert.public_key().public_bytes(serialization.Encoding.DER, spki) != key.public_key().public_bytes(
        serialization.Encoding.DER, spki
    ):
        raise EnrollmentFailed("cloud-sync sent a client certificate for another key: nothing written")
    return ClientCertificate(key_pem, response.client_cert_pem, response.ca_cert_pem)


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
    ca = _read_ca(ca_file) if ca_file else None
    key_pem, csr_pem = _key_and_csr()
    channel = _channel(target, ca)
    try:
        stub = services_pb2_grpc.EnrollmentStub(channel)
        request = services_pb2.EnrollRequest(token=token, agent=_agent_info(), csr_pem=csr_pem)
        response: services_pb2.EnrollResponse = stub.Enroll(request, timeout=timeout_s)
    except grpc.RpcError as exc:
        code, details = exc.code(), exc.details() or ""
        if code in _REFUSALS:
            raise EnrollmentRefused(f"cloud-sync refused the enrollment: {details}") from None
        raise _failure(target, ca_file, code, details) from None
    finally:
        channel.close()
    _check_response(response)
    certificate = _client_certificate(response, key_pem)
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
        client_certificate=certificate,
        # The CA that vouched for cloud-sync now vouches for it (and the broker) when the agent runs.
        server_ca_pem=ca or b"",
    )
