"""The fleet signer: one key made on first start (0600) and kept, envelopes devices verify."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from cloud_sync.config import ConfigProblem
from cloud_sync.registry.signer import FleetSigner
from edgefleet.signing import SignatureRefused, key_id, verify_envelope

from .helpers import FAR_FUTURE_MS


def test_the_key_is_made_once_private_and_read_again(tmp_path: Path) -> None:
    path = tmp_path / "data" / "fleet-signing.key"
    first = FleetSigner.open(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = FleetSigner.open(path)
    assert again.public_key == first.public_key and len(first.public_key) == 32
    assert first.key_id == key_id(first.public_key)


def test_a_signed_manifest_verifies_against_the_public_key_and_not_another(tmp_path: Path) -> None:
    signer = FleetSigner.open(tmp_path / "a.key")
    signed = signer.sign({"name": "digits", "version": 3}, serial=7, expires_at_ms=FAR_FUTURE_MS)
    envelope = verify_envelope(
        signer.public_key, signed.manifest_json, signed.signature, signed.key_id, now_ms=1_700_000_000_000
    )
    assert (envelope.name, envelope.version, envelope.serial, envelope.expires_at_ms) == ("digits", 3, 7, FAR_FUTURE_MS)
    other = FleetSigner.open(tmp_path / "b.key")
    with pytest.raises(SignatureRefused) as refused:
        verify_envelope(other.public_key, signed.manifest_json, signed.signature, signed.key_id, now_ms=0)
    assert refused.value.reason == "wrong-key"


def test_a_damaged_key_file_is_a_config_problem_that_says_what_to_do(tmp_path: Path) -> None:
    path = tmp_path / "fleet-signing.key"
    path.write_text("not a key")
    with pytest.raises(ConfigProblem, match="restore it from backup"):
        FleetSigner.open(path)
