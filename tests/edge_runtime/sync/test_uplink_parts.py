"""The uploader's parts: backoff, pacing, the compression decision, the cloud channel and token checks."""

from __future__ import annotations

import datetime
import ipaddress
import random
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import given
from hypothesis import strategies as st

from edge_runtime.config import CloudSection, UploadPolicy
from edge_runtime.errors import ConfigError
from edge_runtime.outbox import Outbox, UploadBatch
from edge_runtime.sync.grpc_control import GrpcControl
from edge_runtime.sync.uplink import Backoff, CloudChannel, Pacer, Uploader, compressible, read_token
from edgefleet.proto.edgefleet.v1 import results_pb2
from tests.loopcheck import LoopThread
from tests.waiting import wait_for


@given(st.integers(0, 200), st.integers(0, 2**32 - 1))
def test_backoff_delays_stay_within_the_growing_ceiling(failures: int, seed: int) -> None:
    backoff = Backoff(base_s=0.2, cap_s=30.0, rng=random.Random(seed))
    for n in range(failures):
        delay = backoff.next_delay()
        assert 0 <= delay <= min(30.0, 0.2 * 2**n)
    backoff.reset()
    assert backoff.next_delay() <= 0.2


def test_the_pacer_holds_the_byte_rate() -> None:
    pacer = Pacer(rate=1000, _at=0.0)
    assert pacer.delay_for(500, now=0.5) == 0.0  # 500 tokens accrued in 0.5 s
    assert pacer.delay_for(1000, now=0.5) == pytest.approx(1.0)  # 1000 short: one second
    assert Pacer(rate=0).delay_for(10**9, now=0.0) == 0.0


def batch_of(payloads: list[bytes]) -> UploadBatch:
    records = [results_pb2.ResultRecord(seq=i + 1, payload=p) for i, p in enumerate(payloads)]
    return UploadBatch(results_pb2.ResultBatch(records=records, after_seq=0, through_seq=len(records)))


def test_gzip_is_used_only_when_it_pays() -> None:
    text = [b"probabilities " * 50 for _ in range(20)]
    noise = [random.Random(i).randbytes(800) for i in range(20)]
    assert compressible(batch_of(text))
    assert not compressible(batch_of(noise))
    assert not compressible(batch_of([b"tiny"]))


@pytest.mark.parametrize("target", ["127.0.0.1:7000", "localhost:7000", "[::1]:7000"])
def test_plaintext_goes_to_a_loopback_cloud_sync(target: str) -> None:
    assert CloudChannel.read(CloudSection(grpc_target=target)) == CloudChannel(target, None)


@pytest.mark.parametrize(
    ("target", "words"),
    [
        ("cloud.example.com:7000", "cloud.grpc_target cloud.example.com:7000 is not loopback: set cloud.ca_file"),
        ("10.0.0.5:7000", "cloud.grpc_target 10.0.0.5:7000 is not loopback: set cloud.ca_file"),
        ("cloud.example.com", "cloud.grpc_target: 'cloud.example.com' must be host:port"),
        ("127.0.0.1:0", "cloud.grpc_target '127.0.0.1:0' needs cloud-sync's port, not 0"),
        ("", "cloud.grpc_target: '' must be host:port"),
    ],
)
def test_a_target_it_cannot_use_is_a_config_error_naming_the_key(target: str, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        CloudChannel.read(CloudSection(grpc_target=target))


@pytest.mark.parametrize(
    ("ca", "words"),
    [
        ("missing", "cannot read cloud.ca_file {path}: No such file or directory"),
        ("directory", "cannot read cloud.ca_file {path}: Is a directory"),
        ("empty", "cloud.ca_file {path} holds no PEM certificate"),
        ("a key, not a certificate", "cloud.ca_file {path} holds no PEM certificate"),
    ],
)
def test_a_ca_file_it_cannot_use_is_a_config_error_naming_the_key(tmp_path: Path, ca: str, words: str) -> None:
    path = tmp_path / "ca.pem"
    if ca == "directory":
        path.mkdir()
    elif ca == "empty":
        path.write_bytes(b"")
    elif ca != "missing":
        path.write_bytes(_private_pem(_key()))
    with pytest.raises(ConfigError, match=words.format(path=path)):
        CloudChannel.read(CloudSection(grpc_target="cloud.example.com:7000", ca_file=str(path)))


def test_the_ca_is_read_once_and_a_remote_target_takes_tls(tmp_path: Path) -> None:
    ca_cert, _ = _authority("fleet CA")
    path = tmp_path / "ca.pem"
    path.write_bytes(ca_cert)
    channel = CloudChannel.read(CloudSection(grpc_target="cloud.example.com:7000", ca_file=str(path)))
    path.unlink()  # opening the channel later needs the bytes read now, never the file
    assert channel == CloudChannel("cloud.example.com:7000", ca_cert)


@pytest.fixture
def outbox(tmp_path: Path) -> Iterator[Outbox]:
    opened = Outbox.open(tmp_path / "outbox.db", max_bytes=1 << 20, max_age_s=0)
    yield opened
    opened.close()


@pytest.mark.parametrize(
    ("cloud", "words"),
    [
        (CloudSection(grpc_target="cloud.example.com:7000"), "not loopback: set cloud.ca_file"),
        (
            CloudSection(grpc_target="cloud.example.com:7000", ca_file="/nonexistent/ca.pem"),
            "cannot read cloud.ca_file",
        ),
    ],
)
def test_both_cloud_links_refuse_a_config_when_made_not_when_started(
    outbox: Outbox, cloud: CloudSection, words: str
) -> None:
    """Made off the loop, before anything starts: an error raised inside their tasks would go unseen."""
    with pytest.raises(ConfigError, match=words):
        Uploader(outbox, cloud, UploadPolicy(), "efd_x")
    with pytest.raises(ConfigError, match=words):
        GrpcControl(cloud, "cam-1", "efd_x")


class TlsServer:
    """A real gRPC server on loopback behind TLS, its certificate for 127.0.0.1 signed by `ca_cert`."""

    def __init__(self) -> None:
        self.ca_cert, ca_key = _authority("fleet CA")
        key = _key()
        cert = _certificate(key, "127.0.0.1", issuer=x509.load_pem_x509_certificate(self.ca_cert), issuer_key=ca_key)
        self.server = grpc.server(ThreadPoolExecutor(max_workers=1))
        credentials = grpc.ssl_server_credentials([(_private_pem(key), cert.public_bytes(serialization.Encoding.PEM))])
        self.target = f"127.0.0.1:{self.server.add_secure_port('127.0.0.1:0', credentials)}"
        self.server.start()

    def close(self) -> None:
        self.server.stop(None)


@pytest.fixture
def tls_server() -> Iterator[TlsServer]:
    server = TlsServer()
    yield server
    server.close()


def _connectivity(loop: LoopThread, channel: grpc.aio.Channel) -> grpc.ChannelConnectivity:
    return loop.call(channel.get_state, True)


def test_the_channel_trusts_the_ca_it_read_and_opens_without_the_disk(
    loop: LoopThread, tls_server: TlsServer, tmp_path: Path
) -> None:
    """The loop fixture fails the test if opening the channel read a file on the loop."""
    trusted, stranger = tmp_path / "ca.pem", tmp_path / "other-ca.pem"
    trusted.write_bytes(tls_server.ca_cert)
    stranger.write_bytes(_authority("someone else's CA")[0])
    good = CloudChannel.read(CloudSection(grpc_target=tls_server.target, ca_file=str(trusted)))
    bad = CloudChannel.read(CloudSection(grpc_target=tls_server.target, ca_file=str(stranger)))
    good_channel, bad_channel = loop.call(good.open), loop.call(bad.open)
    try:
        # The handshake completes only with the CA that signed the server's certificate.
        loop.run(good_channel.channel_ready(), timeout=10)
        wait_for(
            lambda: _connectivity(loop, bad_channel) is grpc.ChannelConnectivity.TRANSIENT_FAILURE,
            10,
            "the handshake under the wrong CA to fail",
        )
        assert _connectivity(loop, good_channel) is grpc.ChannelConnectivity.READY
    finally:
        loop.run(good_channel.close())
        loop.run(bad_channel.close())


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _authority(name: str) -> tuple[bytes, ec.EllipticCurvePrivateKey]:
    """A self-signed CA: its certificate as PEM, and its key."""
    key = _key()
    return _certificate(key, name, issuer=None, issuer_key=key).public_bytes(serialization.Encoding.PEM), key


def _certificate(
    key: ec.EllipticCurvePrivateKey,
    name: str,
    *,
    issuer: x509.Certificate | None,
    issuer_key: ec.EllipticCurvePrivateKey,
) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if issuer is not None:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(name))]), critical=False
        )
    return builder.sign(issuer_key, hashes.SHA256())


def test_the_token_file_is_required_readable_and_not_empty(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cloud.token_file is not set"):
        read_token(CloudSection(grpc_target="127.0.0.1:1"))
    with pytest.raises(ConfigError, match="cannot read cloud.token_file"):
        read_token(CloudSection(token_file=str(tmp_path / "missing")))
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(ConfigError, match="is empty"):
        read_token(CloudSection(token_file=str(empty)))
    good = tmp_path / "token"
    good.write_text("efd_abc\n")
    assert read_token(CloudSection(token_file=str(good))) == "efd_abc"
