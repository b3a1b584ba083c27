"""TrustStore: each update-framework threat refused with its reason word, and the seen serials kept across
restarts (a real file in a temp data dir)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from edge_runtime.control.trust import SEEN_FILE, ArtifactRefused, TrustStore
from edge_runtime.errors import VerificationFailed
from edgefleet.proto.edgefleet.v1.models_pb2 import SignedManifest
from tests.edge_runtime.control.artifacts_server import Signer, manifest_for

NOW = 1_800_000_000_000
MODEL = b"onnx bytes"
SHA = hashlib.sha256(MODEL).hexdigest()


@pytest.fixture
def signer() -> Signer:
    return Signer()


@pytest.fixture
def trust(tmp_path: Path, signer: Signer) -> TrustStore:
    return TrustStore(tmp_path, signer.public_key)


def signed(signer: Signer, name: str = "digits", version: int = 2, **options: int) -> SignedManifest:
    return signer.sign(manifest_for(name, version, MODEL), **options)


def refusal(trust: TrustStore, message: SignedManifest, sha: str | None = SHA, version: int = 2) -> ArtifactRefused:
    with pytest.raises(ArtifactRefused) as refused:
        trust.check(message, "digits", version, sha, NOW)
    assert isinstance(refused.value, VerificationFailed)  # what the converger and the agent already handle
    return refused.value


def test_a_good_envelope_is_verified(trust: TrustStore, signer: Signer) -> None:
    envelope = trust.check(signed(signer, serial=7), "digits", 2, SHA, NOW)
    assert (envelope.name, envelope.version, envelope.serial) == ("digits", 2, 7)
    assert envelope.manifest["sha256"] == SHA


def test_no_sha256_pin_accepts_any_model_of_that_version(trust: TrustStore, signer: Signer) -> None:
    assert trust.check(signed(signer), "digits", 2, None, NOW).name == "digits"
    assert trust.check(signed(signer), "digits", 2, "", NOW).name == "digits"


def test_another_key_is_refused(trust: TrustStore) -> None:
    assert refusal(trust, signed(Signer())).reason == "wrong-key"


def test_a_tampered_manifest_is_refused(trust: TrustStore, signer: Signer) -> None:
    message = signed(signer)
    message.manifest_json = message.manifest_json.replace(b'"version":2', b'"version":3')
    assert refusal(trust, message).reason == "bad-signature"


def test_an_expired_manifest_is_refused(trust: TrustStore, signer: Signer) -> None:
    refused = refusal(trust, signed(signer, expires_at_ms=NOW - 1))
    assert refused.reason == "expired" and "fleetctl models sign" in str(refused)


def test_the_manifest_of_another_version_is_a_mismatch(trust: TrustStore, signer: Signer) -> None:
    refused = refusal(trust, signed(signer, version=1))
    assert refused.reason == "mismatch" and "digits:1" in str(refused)


def test_a_model_other_than_the_assigned_one_is_a_mismatch(trust: TrustStore, signer: Signer) -> None:
    refused = refusal(trust, signed(signer), sha="0" * 64)
    assert refused.reason == "mismatch" and "not the assigned" in str(refused)


def test_a_signed_but_invalid_manifest_is_malformed(trust: TrustStore, signer: Signer) -> None:
    manifest = manifest_for("digits", 2, MODEL)
    del manifest["inputs"]
    assert refusal(trust, signer.sign(manifest)).reason == "malformed"


def test_an_older_serial_than_one_seen_is_a_rollback(trust: TrustStore, signer: Signer) -> None:
    trust.remember(trust.check(signed(signer, serial=5), "digits", 2, SHA, NOW))
    refused = refusal(trust, signed(signer, serial=4))
    assert refused.reason == "rollback" and "serial 4" in str(refused) and "serial 5" in str(refused)
    assert trust.check(signed(signer, serial=5), "digits", 2, SHA, NOW).serial == 5  # the same one again: fine
    assert trust.check(signed(signer, serial=9), "digits", 2, SHA, NOW).serial == 9


def test_rollback_is_judged_per_version(trust: TrustStore, signer: Signer) -> None:
    trust.remember(trust.check(signed(signer, serial=50), "digits", 2, SHA, NOW))
    assert trust.check(signed(signer, version=3, serial=4), "digits", 3, SHA, NOW).serial == 4


def test_seen_serials_survive_a_restart_in_a_private_file(tmp_path: Path, signer: Signer) -> None:
    first = TrustStore(tmp_path, signer.public_key)
    first.remember(first.check(signed(signer, serial=5), "digits", 2, SHA, NOW))
    first.remember(first.check(signed(signer, serial=5), "digits", 2, SHA, NOW))
    assert (tmp_path / SEEN_FILE).stat().st_mode & 0o777 == 0o600
    again = TrustStore(tmp_path, signer.public_key)
    assert again.highest_serial("digits", 2) == 5
    assert refusal(again, signed(signer, serial=3)).reason == "rollback"


def test_remembering_an_older_serial_never_lowers_the_mark(trust: TrustStore, signer: Signer) -> None:
    newer = trust.check(signed(signer, serial=8), "digits", 2, SHA, NOW)
    older = trust.check(signed(signer, serial=6), "digits", 2, SHA, NOW)
    trust.remember(newer)
    trust.remember(older)
    assert trust.highest_serial("digits", 2) == 8


@pytest.mark.parametrize(
    "content",
    [b"{not json", b"\xff\xfe", b'{"format": 9, "seen": {}}', b'{"format": 1, "seen": {"digits:2": "5"}}', b"[]"],
)
def test_a_damaged_seen_file_is_logged_and_read_as_empty(tmp_path: Path, signer: Signer, content: bytes) -> None:
    (tmp_path / SEEN_FILE).parent.mkdir(parents=True)
    (tmp_path / SEEN_FILE).write_bytes(content)
    with capture_logs() as logs:
        trust = TrustStore(tmp_path, signer.public_key)
    assert trust.highest_serial("digits", 2) == 0
    assert [e["event"] for e in logs] == ["control.seen_manifests_damaged"]
    trust.remember(trust.check(signed(signer, serial=2), "digits", 2, SHA, NOW))
    assert json.loads((tmp_path / SEEN_FILE).read_text())["seen"] == {"digits:2": 2}


@pytest.mark.parametrize("key", [b"", b"x" * 31, b"x" * 33])
def test_a_signing_key_of_the_wrong_size_is_refused_at_once(tmp_path: Path, key: bytes) -> None:
    with pytest.raises(ValueError, match="not a raw ed25519 public key"):
        TrustStore(tmp_path, key)


@settings(max_examples=30, deadline=None)
@given(serials=st.lists(st.integers(min_value=0, max_value=20), min_size=1, max_size=12))
def test_an_envelope_is_accepted_exactly_when_no_higher_serial_was_remembered(
    tmp_path_factory: pytest.TempPathFactory, serials: list[int]
) -> None:
    signer = Signer()
    trust = TrustStore(tmp_path_factory.mktemp("trust"), signer.public_key)
    highest = 0
    for serial in serials:
        message = signed(signer, serial=serial)
        if serial < highest:
            assert refusal(trust, message).reason == "rollback"
        else:
            trust.remember(trust.check(message, "digits", 2, SHA, NOW))
            highest = serial
        assert trust.highest_serial("digits", 2) == highest
