"""Signed model manifests: the envelope the registry signs with the fleet's ed25519 key and a device verifies.

Both sides use this one definition: cloud-sync signs (cloud_sync/registry), edge-agent verifies before it
parses anything else (edge_runtime/control). The signed bytes are canonical JSON of

    {"type": "edgefleet.signed-manifest/v1",
     "manifest": {...the package's manifest.json as a JSON object...},
     "serial": 17,              # registry-wide signing counter: of two envelopes of one version, the higher is newer
     "signed_at_ms": ...,
     "expires_at_ms": ...}      # after this a device refuses the envelope (a freeze attack replays old metadata)

carried in `edgefleet.v1.SignedManifest` with the signature and the key id (the first 16 hex digits of the
sha256 of the raw public key). What a device checks beyond the signature (an envelope older than one it has
seen for the same version, a blob that does not match, one larger than declared) needs its own state and
lives with the device.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edgefleet.durable import create_once

__all__ = [
    "ENVELOPE_TYPE",
    "MAX_ENVELOPE_BYTES",
    "Envelope",
    "SignatureRefused",
    "canonical_json",
    "key_id",
    "load_or_create_private_key",
    "load_public_key",
    "public_key_bytes",
    "sign_manifest",
    "verify_envelope",
]

ENVELOPE_TYPE = "edgefleet.signed-manifest/v1"
# A manifest is a few KiB; the envelope adds a few dozen bytes.
MAX_ENVELOPE_BYTES = 1 << 20
_SIGNATURE_BYTES = 64
_PUBLIC_KEY_BYTES = 32


class SignatureRefused(ValueError):
    """An envelope that must not be trusted. `reason` is one word an operator can search for (wrong-key,
    bad-signature, malformed, expired); the message says what to do."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Envelope:
    """A verified envelope: the manifest object and the signing metadata."""

    manifest: dict[str, Any]
    serial: int
    signed_at_ms: int
    expires_at_ms: int
    key_id: str

    @property
    def name(self) -> str:
        return str(self.manifest.get("name", ""))

    @property
    def version(self) -> int:
        version = self.manifest.get("version", 0)
        return version if isinstance(version, int) else 0

    def manifest_json(self) -> bytes:
        """The manifest as manifest.json holds it (models/package.py's canonical form)."""
        return json.dumps(self.manifest, sort_keys=True, indent=2, ensure_ascii=False).encode() + b"\n"


def canonical_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def public_key_bytes(key: Ed25519PrivateKey | Ed25519PublicKey) -> bytes:
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(public_key: bytes) -> str:
    return hashlib.sha256(public_key).hexdigest()[:16]


def load_public_key(raw: bytes) -> Ed25519PublicKey:
    if len(raw) != _PUBLIC_KEY_BYTES:
        raise SignatureRefused("malformed", f"a fleet signing key is {_PUBLIC_KEY_BYTES} raw bytes, not {len(raw)}")
    return Ed25519PublicKey.from_public_bytes(raw)


def sign_manifest(
    key: Ed25519PrivateKey, manifest: dict[str, Any], *, serial: int, signed_at_ms: int, expires_at_ms: int
) -> tuple[bytes, bytes, str]:
    """(envelope bytes, signature, key id) for `manifest`."""
    body = canonical_json(
        {
            "type": ENVELOPE_TYPE,
            "manifest": manifest,
            "serial": serial,
            "signed_at_ms": signed_at_ms,
            "expires_at_ms": expires_at_ms,
        }
    )
    return body, key.sign(body), key_id(public_key_bytes(key))


def verify_envelope(
    trusted_key: bytes, envelope: bytes, signature: bytes, signed_key_id: str, *, now_ms: int
) -> Envelope:
    """Check `envelope` against the pinned `trusted_key` and the clock; SignatureRefused says what failed.

    The signature is checked before a byte of the envelope is parsed.
    """
    trusted_id = key_id(trusted_key)
    if signed_key_id != trusted_id:
        raise SignatureRefused(
            "wrong-key",
            f"the manifest is signed by key {signed_key_id[:32]!r}, this device trusts the fleet key {trusted_id}: "
            "re-enroll the device if the fleet's key was replaced",
        )
    if len(envelope) > MAX_ENVELOPE_BYTES or len(signature) != _SIGNATURE_BYTES:
        raise SignatureRefused("malformed", "the signed manifest or its signature has the wrong size")
    try:
        load_public_key(trusted_key).verify(signature, envelope)
    except InvalidSignature:
        raise SignatureRefused(
            "bad-signature", "the manifest's signature does not verify against the fleet key: refusing it"
        ) from None
    try:
        data = json.loads(envelope.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise SignatureRefused("malformed", f"the signed manifest is not JSON ({exc})") from None
    fields = ("manifest", "serial", "signed_at_ms", "expires_at_ms")
    if (
        not isinstance(data, dict)
        or data.get("type") != ENVELOPE_TYPE
        or not isinstance(data.get("manifest"), dict)
        or not all(_is_int(data.get(f)) for f in fields[1:])
    ):
        raise SignatureRefused("malformed", f"the signed manifest is not an {ENVELOPE_TYPE} envelope")
    if data["expires_at_ms"] <= now_ms:
        raise SignatureRefused(
            "expired",
            f"the manifest expired at {data['expires_at_ms']} ms (now {now_ms}): the registry must sign it again "
            "(fleetctl models sign)",
        )
    return Envelope(data["manifest"], data["serial"], data["signed_at_ms"], data["expires_at_ms"], signed_key_id)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63


def load_or_create_private_key(path: Path) -> Ed25519PrivateKey:
    """The fleet's signing key in `path` (PKCS#8 PEM, mode 0600), made on first use.

    Linked into place, never renamed over: of several processes making it at once, the first one's key stands.
    """
    try:
        return _read_private_key(path)
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    pem = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    create_once(path, pem)
    return _read_private_key(path)


def _read_private_key(path: Path) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path} holds no ed25519 private key")
    return key
