"""The device's TLS client certificate judged locally: refused peers say little ("Socket closed"), so the
agent says why first when it can (expired, not yet valid). Not where channels are made (uplink.py, mqtt.py).
"""

from __future__ import annotations

import datetime
from pathlib import Path

import structlog

__all__ = ["REFUSED_CERTIFICATE_HINT", "client_certificate_problem", "warn_if_unusable"]

log = structlog.get_logger(__name__)

# What a TLS peer that refuses our certificate looks like from here: gRPC reports the closed socket, nothing more.
REFUSED_CERTIFICATE_HINT = (
    "the server may refuse this device's client certificate (cloud.client_cert_file): expired, or not signed by "
    "the CA it trusts; edge-agent enroll --force with a new token issues a new one"
)


def client_certificate_problem(cert_file: str, now: datetime.datetime | None = None) -> str | None:
    """Why a peer would refuse the certificate in `cert_file` (expired, not yet valid, unreadable), or None."""
    from cryptography import x509  # here: only agents with a certificate pay for the X.509 parser

    try:
        certificate = x509.load_pem_x509_certificate(Path(cert_file).read_bytes())
    except OSError as exc:
        return f"cannot read it: {exc.strerror}"
    except ValueError:
        return "it is not a PEM certificate"
    at = now or datetime.datetime.now(datetime.timezone.utc)
    if certificate.not_valid_after_utc <= at:
        return f"it expired on {certificate.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"
    if certificate.not_valid_before_utc > at:
        return f"it is not valid before {certificate.not_valid_before_utc:%Y-%m-%d %H:%M} UTC (check the clock)"
    return None


def warn_if_unusable(cert_file: str, used_for: str) -> None:
    """Log `tls.client_certificate_unusable` (warning) when peers will refuse the certificate; the agent runs on
    (it still serves inference), the message says what to do."""
    if not cert_file:
        return
    problem = client_certificate_problem(cert_file)
    if problem is not None:
        log.warning(
            "tls.client_certificate_unusable",
            file=cert_file,
            problem=problem,
            refused_by=used_for,
            fix="enroll again (edge-agent enroll --force with a new token) for a new certificate",
        )
