"""The certificate parts without a fleet: cloud-sync's [tls] and [fleet_ca] checks (at start and in
check-config), the fleet CA's signing of CSRs, and the device's identity files and expiry helper."""

from __future__ import annotations

import datetime
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from structlog.testing import capture_logs

from cloud_sync.certificates import CertificateProblem, FleetCA
from cloud_sync.config import ConfigProblem, config_from_dict
from edge_runtime.agent.enroll import _key_and_csr
from edge_runtime.agent.identity import ClientCertificate, Identity, apply_identity, client_certificate_expiry
from edge_runtime.config import AgentConfig, AgentSection, CloudSection, MqttSection
from edge_runtime.errors import ConfigError
from edge_runtime.sync.tls import client_certificate_problem
from edge_runtime.sync.uplink import CloudChannel
from tests.cloud_sync.conftest import run_cloud_sync_cli
from tests.tls.pki import Authority, Pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def ca(pki: Pki) -> Authority:
    return pki.ca("fleet-ca")


def _problem(data: dict[str, dict[str, object]]) -> str:
    with pytest.raises(ConfigProblem) as refused:
        config_from_dict(data, "cloud-sync.toml")
    return refused.value.message


def test_a_server_certificate_and_its_key_are_accepted(pki: Pki, ca: Authority) -> None:
    cert, key = pki.server(ca, "cloud-good")
    config = config_from_dict({"tls": {"cert_file": str(cert), "key_file": str(key)}})
    assert config.tls.cert_file == str(cert)


def test_a_key_of_another_certificate_is_refused_naming_both_keys(pki: Pki, ca: Authority) -> None:
    cert, _ = pki.server(ca, "cloud-a")
    _, other_key = pki.server(ca, "cloud-b")
    said = _problem({"tls": {"cert_file": str(cert), "key_file": str(other_key)}})
    assert said.startswith("cloud-sync.toml: tls.key_file:") and "not the private key" in said
    assert "(tls.cert_file)" in said


def test_an_expired_server_certificate_is_refused(pki: Pki, ca: Authority) -> None:
    cert, key = pki.server(ca, "cloud-old", expired=True)
    said = _problem({"tls": {"cert_file": str(cert), "key_file": str(key)}})
    assert "tls.cert_file:" in said and "expired on" in said and "renew it" in said


def test_a_key_file_that_is_no_key_is_refused(pki: Pki, ca: Authority, tmp_path: Path) -> None:
    cert, _ = pki.server(ca, "cloud-c")
    junk = tmp_path / "junk.key"
    junk.write_text("not a key\n")
    said = _problem({"tls": {"cert_file": str(cert), "key_file": str(junk)}})
    assert "tls.key_file:" in said and "not a PEM private key" in said


def test_an_unreadable_client_ca_is_refused(pki: Pki, ca: Authority, tmp_path: Path) -> None:
    cert, key = pki.server(ca, "cloud-d")
    said = _problem(
        {
            "tls": {"cert_file": str(cert), "key_file": str(key), "client_ca_file": str(tmp_path / "none.pem")},
            "grpc": {"enrollment_listen": "127.0.0.1:0"},
        }
    )
    assert "tls.client_ca_file: cannot read" in said


def test_mtls_without_an_enrollment_port_is_refused(pki: Pki, ca: Authority) -> None:
    cert, key = pki.server(ca, "cloud-e")
    said = _problem({"tls": {"cert_file": str(cert), "key_file": str(key), "client_ca_file": str(ca.cert_file)}})
    assert "grpc.enrollment_listen" in said


def test_a_fleet_ca_that_is_no_ca_is_refused(pki: Pki, ca: Authority) -> None:
    cert, key = pki.server(ca, "not-a-ca")
    said = _problem({"fleet_ca": {"cert_file": str(cert), "key_file": str(key)}})
    assert "fleet_ca.cert_file:" in said and "not a CA certificate" in said


def test_check_config_applies_the_certificate_checks(pki: Pki, ca: Authority, tmp_path: Path) -> None:
    cert, key = pki.server(ca, "cloud-f", expired=True)
    path = tmp_path / "cloud-sync.toml"
    path.write_text(f'[tls]\ncert_file = "{cert}"\nkey_file = "{key}"\n')
    done = run_cloud_sync_cli("check-config", path)
    assert done.returncode == 2 and "tls.cert_file" in done.stderr and "expired" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_the_fleet_ca_names_the_certificate_after_the_device_whatever_the_csr_asks(ca: Authority) -> None:
    fleet = FleetCA.read(str(ca.cert_file), str(ca.key_file), 30)
    key = ec.generate_private_key(ec.SECP256R1())
    asks = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cloud-sync-admin")])
    csr = x509.CertificateSigningRequestBuilder().subject_name(asks).sign(key, hashes.SHA256())
    now = datetime.datetime.now(datetime.timezone.utc)
    issued = x509.load_pem_x509_certificate(fleet.issue(csr.public_bytes(serialization.Encoding.PEM), "cam-9", now=now))
    assert issued.subject == x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cam-9")])
    assert issued.issuer == ca.certificate.subject
    assert issued.not_valid_after_utc - now == datetime.timedelta(days=30) - datetime.timedelta(
        microseconds=now.microsecond
    )
    assert list(issued.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH
    ]
    assert not issued.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    issued.verify_directly_issued_by(ca.certificate)


def _csr_with_a_broken_signature() -> bytes:
    _, csr = _key_and_csr()
    der = bytearray(x509.load_pem_x509_csr(csr).public_bytes(serialization.Encoding.DER))
    der[-3] ^= 0x01  # inside the signature
    return x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM)


def _csr(key: object) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(key, algorithm).public_bytes(serialization.Encoding.PEM)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("csr", "says"),
    [
        (b"x", "not a PEM certificate signing request"),
        (b"-----BEGIN CERTIFICATE REQUEST-----\n" + b"A" * 20000, "larger than"),
        (_csr_with_a_broken_signature(), "signature does not verify"),
        (_csr(rsa.generate_private_key(65537, 1024)), "RSA key of 1024 bits"),
        (_csr(ec.generate_private_key(ec.SECP521R1())), "curve secp521r1"),
        (_csr(ed25519.Ed25519PrivateKey.generate()), "Ed25519PublicKey key is not accepted"),
    ],
    ids=["junk", "huge", "bad-signature", "small-rsa", "p521", "ed25519"],
)
def test_a_csr_that_cannot_be_signed_is_refused(ca: Authority, csr: bytes, says: str) -> None:
    fleet = FleetCA.read(str(ca.cert_file), str(ca.key_file), 90)
    with pytest.raises(CertificateProblem) as refused:
        fleet.issue(csr, "cam-9")
    assert refused.value.message.startswith("csr_pem:") and says in refused.value.message


def _identity(tmp_path: Path, ca: Authority, mqtt_url: str) -> Identity:
    key_pem, csr = _key_and_csr()
    cert_pem = FleetCA.read(str(ca.cert_file), str(ca.key_file), 90).issue(csr, "cam-9")
    return Identity.save(
        tmp_path,
        device_id="cam-9",
        device_token="efd_token",
        signing_key=bytes(32),
        grpc_target="127.0.0.1:7000",
        mqtt_url=mqtt_url,
        topic_prefix="edgefleet/v1",
        labels={},
        enrolled_at_ms=1,
        client_certificate=ClientCertificate(key_pem, cert_pem, ca.cert_file.read_bytes()),
        server_ca_pem=ca.cert_file.read_bytes(),
    )


def test_the_identity_keeps_the_certificate_and_the_config_uses_it(tmp_path: Path, ca: Authority) -> None:
    saved = _identity(tmp_path, ca, "mqtts://127.0.0.1:8883")
    assert Identity.load(tmp_path) == saved
    for path in (saved.client_key_file, saved.client_cert_file, saved.fleet_ca_file, saved.server_ca_file):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    config = apply_identity(AgentConfig(agent=AgentSection(data_dir=str(tmp_path))))
    assert config.cloud.client_cert_file == str(saved.client_cert_file)
    assert config.cloud.client_key_file == str(saved.client_key_file)
    assert config.cloud.ca_file == str(saved.server_ca_file)
    channel = CloudChannel.read(config.cloud)
    assert channel.client_chain == saved.client_cert_file.read_bytes()
    expiry = client_certificate_expiry(tmp_path)
    assert expiry is not None and expiry > datetime.datetime.now(datetime.timezone.utc)
    assert client_certificate_problem(str(saved.client_cert_file)) is None


def test_a_certificate_named_in_the_config_wins_and_a_plaintext_broker_gets_none(tmp_path: Path, ca: Authority) -> None:
    _identity(tmp_path, ca, "mqtt://127.0.0.1:1883")
    config = apply_identity(AgentConfig(agent=AgentSection(data_dir=str(tmp_path))))
    assert (config.cloud.client_cert_file, config.cloud.client_key_file) == ("", "")
    own = AgentConfig(
        agent=AgentSection(data_dir=str(tmp_path)),
        cloud=CloudSection(client_cert_file="/etc/own.pem", client_key_file="/etc/own.key"),
        mqtt=MqttSection(url="mqtts://broker:8883"),
    )
    assert apply_identity(own).cloud.client_cert_file == "/etc/own.pem"


def test_an_identity_missing_its_certificate_is_damaged(tmp_path: Path, ca: Authority) -> None:
    saved = _identity(tmp_path, ca, "mqtts://127.0.0.1:8883")
    saved.client_key_file.unlink()
    with pytest.raises(ConfigError) as damaged:
        Identity.load(tmp_path)
    assert str(saved.client_key_file) in str(damaged.value) and "--force" in str(damaged.value)


def test_a_device_without_a_certificate_has_no_expiry(tmp_path: Path) -> None:
    assert client_certificate_expiry(tmp_path) is None


def test_an_expired_client_certificate_is_named_with_its_date(pki: Pki, ca: Authority) -> None:
    cert, _ = pki.client(ca, "cam-9", name="cam-9-expired", expired=True)
    problem = client_certificate_problem(str(cert))
    assert problem is not None and problem.startswith("it expired on")


def test_half_a_client_certificate_is_a_config_error(tmp_path: Path, ca: Authority) -> None:
    cloud = CloudSection(grpc_target="127.0.0.1:7000", ca_file=str(ca.cert_file), client_cert_file=str(ca.cert_file))
    with pytest.raises(ConfigError) as refused:
        CloudChannel.read(cloud)
    assert "cloud.client_key_file" in str(refused.value)


def test_the_device_says_why_before_the_cloud_refuses_its_expired_certificate(pki: Pki, ca: Authority) -> None:
    cert, key = pki.client(ca, "cam-9", name="cam-9-expired-2", expired=True)
    cloud = CloudSection(
        grpc_target="127.0.0.1:7000", ca_file=str(ca.cert_file), client_cert_file=str(cert), client_key_file=str(key)
    )
    with capture_logs() as logs:
        CloudChannel.read(cloud)
    (warning,) = [e for e in logs if e["event"] == "tls.client_certificate_unusable"]
    assert warning["file"] == str(cert) and warning["problem"].startswith("it expired on")
    assert warning["log_level"] == "warning" and "edge-agent enroll --force" in warning["fix"]
