"""X.509 for cloud-sync: its TLS server certificate and key, and the fleet CA that signs device certificates.

Checks over PEM files and bytes with `cryptography` (both read at start and by `check-config`), and the
signing of an enrolling device's CSR. Not the servers that use them (process.py) nor enrollment itself.
"""

from __future__ import annotations

import datetime
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cloud_sync.errors import InvalidArgument

__all__ = [
    "MAX_CSR_BYTES",
    "CertificateProblem",
    "FleetCA",
    "ServerTls",
    "check_csr",
    "read_ca_bundle",
    "read_certificate_pair",
]

# A P-256 CSR is ~400 bytes, an RSA-4096 one ~1.7 KiB; anything far larger is not a CSR.
MAX_CSR_BYTES = 16 * 1024
# Issued certificates start a little in the past: a device whose clock is a few minutes behind the cloud's
# would otherwise hold a certificate "not yet valid" for the broker and refuse nothing but be refused.
_BACKDATE = datetime.timedelta(minutes=5)
_MIN_RSA_BITS = 2048
# Curves OpenSSL (Mosquitto) and BoringSSL (gRPC) both accept for TLS client authentication.
_CURVES = (ec.SECP256R1, ec.SECP384R1)
_PEM_CERTIFICATE = b"-----BEGIN CERTIFICATE-----"

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey


class CertificateProblem(InvalidArgument):
    """A certificate, key or CSR that cannot be used; the message names the config key or the field."""


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _read(path: str, key: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise CertificateProblem(f"{key}: cannot read {path}: {exc.strerror}") from exc


def _certificates(data: bytes, path: str, key: str) -> list[x509.Certificate]:
    if _PEM_CERTIFICATE not in data:
        raise CertificateProblem(f"{key}: {path} holds no PEM certificate (-----BEGIN CERTIFICATE-----)")
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise CertificateProblem(f"{key}: {path} is not a valid PEM certificate: {exc}") from exc


def _check_dates(cert: x509.Certificate, path: str, key: str, now: datetime.datetime) -> None:
    if cert.not_valid_after_utc <= now:
        raise CertificateProblem(
            f"{key}: the certificate in {path} expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC: renew it"
        )
    if cert.not_valid_before_utc > now + _BACKDATE:
        raise CertificateProblem(
            f"{key}: the certificate in {path} is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC "
            "(check this host's clock)"
        )


def _public_der(key: object) -> bytes:
    public = key.public_key()  # type: ignore[attr-defined]
    der: bytes = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return der


def read_certificate_pair(
    cert_file: str, key_file: str, keys: tuple[str, str], *, now: datetime.datetime | None = None
) -> tuple[list[x509.Certificate], PrivateKey, bytes, bytes]:
    """The certificate chain and private key in two PEM files, checked: both parse, the key is the
    certificate's, the certificate is valid now. CertificateProblem names the key (`tls.cert_file`)."""
    cert_key, key_key = keys
    cert_pem, key_pem = _read(cert_file, cert_key), _read(key_file, key_key)
    chain = _certificates(cert_pem, cert_file, cert_key)
    try:
        private = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise CertificateProblem(f"{key_key}: {key_file} is encrypted: give the key without a passphrase") from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise CertificateProblem(f"{key_key}: {key_file} is not a PEM private key ({exc})") from None
    if not isinstance(private, PrivateKey):
        raise CertificateProblem(f"{key_key}: {key_file} holds a {type(private).__name__}, not a signing key")
    if _public_der(private) != _public_der(chain[0]):
        raise CertificateProblem(
            f"{key_key}: {key_file} is not the private key of the certificate in {cert_file} ({cert_key})"
        )
    _check_dates(chain[0], cert_file, cert_key, now or _now())
    return chain, private, cert_pem, key_pem


def read_ca_bundle(path: str, key: str, *, now: datetime.datetime | None = None) -> bytes:
    """A PEM bundle of CA certificates, checked: parses, holds at least one certificate valid now."""
    data = _read(path, key)
    certs = _certificates(data, path, key)
    at = now or _now()
    if all(c.not_valid_after_utc <= at for c in certs):
        raise CertificateProblem(f"{key}: every certificate in {path} has expired: renew the CA")
    return data


@dataclass(frozen=True)
class ServerTls:
    """cloud-sync's server certificate chain and key (PEM), and the CA that client certificates must chain
    to when the device port asks for them (None: it asks for none)."""

    cert_pem: bytes
    key_pem: bytes
    cert_file: str
    key_file: str
    client_ca_pem: bytes | None = None

    @classmethod
    def read(cls, cert_file: str, key_file: str, client_ca_file: str = "") -> ServerTls:
        _chain, _key, cert_pem, key_pem = read_certificate_pair(cert_file, key_file, ("tls.cert_file", "tls.key_file"))
        client_ca = read_ca_bundle(client_ca_file, "tls.client_ca_file") if client_ca_file else None
        return cls(cert_pem, key_pem, cert_file, key_file, client_ca)


@dataclass(frozen=True)
class FleetCA:
    """The CA that signs device client certificates at enrollment (CN = the device id, clientAuth only)."""

    certificate: x509.Certificate
    key: PrivateKey
    ca_pem: bytes
    validity: datetime.timedelta

    @classmethod
    def read(cls, cert_file: str, key_file: str, validity_days: int) -> FleetCA:
        """The CA in two PEM files; CertificateProblem naming `fleet_ca.*` when they cannot sign."""
        chain, key, _cert_pem, _key_pem = read_certificate_pair(
            cert_file, key_file, ("fleet_ca.cert_file", "fleet_ca.key_file")
        )
        cert = chain[0]
        try:
            constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            constraints = None
        if constraints is None or not constraints.ca:
            raise CertificateProblem(
                f"fleet_ca.cert_file: {cert_file} is not a CA certificate (basicConstraints CA:TRUE): devices' "
                "certificates must be signed by a CA"
            )
        return cls(cert, key, cert.public_bytes(serialization.Encoding.PEM), datetime.timedelta(days=validity_days))

    def issue(self, csr_pem: bytes, device_id: str, *, now: datetime.datetime | None = None) -> bytes:
        """A client certificate (PEM) for `device_id` on the CSR's key; CertificateProblem for a CSR that is
        no CSR, is not signed by its own key, or holds a key TLS peers would refuse.

        The subject is CN=device_id whatever the CSR asks: the broker takes the CN as the device's username.
        """
        csr = check_csr(csr_pem)
        at = now or _now()
        not_after = min(at + self.validity, self.certificate.not_valid_after_utc)
        ca_public = self.certificate.public_key()
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
            .issuer_name(self.certificate.subject)
            .public_key(csr.public_key())
            .serial_number(int.from_bytes(secrets.token_bytes(16), "big") >> 1)
            .not_valid_before(at - _BACKDATE)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=isinstance(csr.public_key(), rsa.RSAPublicKey),
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(csr.public_key()), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_public),  # type: ignore[arg-type]
                critical=False,
            )
        )
        algorithm = None if isinstance(self.key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey) else hashes.SHA256()
        return builder.sign(self.key, algorithm).public_bytes(serialization.Encoding.PEM)


def check_csr(csr_pem: bytes) -> x509.CertificateSigningRequest:
    """The CSR in `csr_pem`, checked (size, parse, key type, its own signature); CertificateProblem else."""
    if len(csr_pem) > MAX_CSR_BYTES:
        raise CertificateProblem(f"csr_pem: larger than {MAX_CSR_BYTES} bytes; a CSR is a few hundred")
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError:
        raise CertificateProblem(
            "csr_pem: not a PEM certificate signing request (-----BEGIN CERTIFICATE REQUEST-----)"
        ) from None
    try:
        public = csr.public_key()
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise CertificateProblem(f"csr_pem: its public key cannot be read ({exc})") from None
    if isinstance(public, ec.EllipticCurvePublicKey):
        if not isinstance(public.curve, _CURVES):
            raise CertificateProblem(f"csr_pem: curve {public.curve.name} is not accepted; use P-256 or P-384")
    elif isinstance(public, rsa.RSAPublicKey):
        if public.key_size < _MIN_RSA_BITS:
            raise CertificateProblem(f"csr_pem: an RSA key of {public.key_size} bits; at least {_MIN_RSA_BITS}")
    else:
        raise CertificateProblem(f"csr_pem: a {type(public).__name__} key is not accepted; use EC P-256 (or RSA)")
    if not csr.is_signature_valid:
        raise CertificateProblem("csr_pem: its signature does not verify: the CSR was not signed by its own key")
    return csr
