"""Certificates made in the test with `cryptography`: CAs, server certificates for loopback, client ones.

    pki = Pki(tmp_path)
    server_ca = pki.ca("server-ca")
    cert, key = pki.server(server_ca, "cloud-sync")             # SAN 127.0.0.1, ::1 and localhost
    cert, key = pki.client(fleet_ca, "cam-1", expired=True)

Every file is PEM, keys unencrypted and 0600. Not a fixture (tests/tls/conftest.py builds the fleet).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["Authority", "Pki"]

DAY = datetime.timedelta(days=1)


@dataclass(frozen=True)
class Authority:
    name: str
    cert_file: Path
    key_file: Path
    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


class Pki:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    def _write(self, name: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> tuple[Path, Path]:
        cert_file, key_file = self.directory / f"{name}.pem", self.directory / f"{name}.key"
        cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_file.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        os.chmod(key_file, 0o600)
        return cert_file, key_file

    def ca(self, name: str, *, expired: bool = False) -> Authority:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        start, end = (now - 30 * DAY, now - DAY) if expired else (now - DAY, now + 365 * DAY)
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(_name(name))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        cert_file, key_file = self._write(name, cert, key)
        return Authority(name, cert_file, key_file, cert, key)

    def _leaf(
        self,
        ca: Authority,
        name: str,
        common_name: str,
        usage: x509.ObjectIdentifier,
        *,
        expired: bool,
        san: bool,
    ) -> tuple[Path, Path]:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        start, end = (now - 30 * DAY, now - DAY) if expired else (now - DAY, now + 90 * DAY)
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(ca.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False)
        )
        if san:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [
                        x509.DNSName("localhost"),
                        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                        x509.IPAddress(ipaddress.ip_address("::1")),
                    ]
                ),
                critical=False,
            )
        return self._write(name, builder.sign(ca.key, hashes.SHA256()), key)

    def server(self, ca: Authority, name: str, *, expired: bool = False) -> tuple[Path, Path]:
        """A server certificate for loopback (SAN localhost, 127.0.0.1, ::1)."""
        return self._leaf(ca, name, name, ExtendedKeyUsageOID.SERVER_AUTH, expired=expired, san=True)

    def client(self, ca: Authority, common_name: str, *, name: str = "", expired: bool = False) -> tuple[Path, Path]:
        """A client certificate whose CN is `common_name` (a device id)."""
        return self._leaf(
            ca,
            name or f"client-{common_name}",
            common_name,
            ExtendedKeyUsageOID.CLIENT_AUTH,
            expired=expired,
            san=False,
        )
