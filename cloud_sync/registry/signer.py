"""The fleet's signing key in cloud-sync: signs model manifests into the envelope devices verify.

The key is made on first start (`{data_dir}/fleet-signing.key`, PKCS#8 PEM, mode 0600) and read on every
later one; replicas share it (the same file, or the same secret mounted). Devices pin its public key at
enrollment. Not for checking envelopes (devices do that, edgefleet/signing.py) nor for deciding what to sign
(registry/store.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cloud_sync.config import ConfigProblem
from cloud_sync.store.database import now_ms
from edgefleet.proto.edgefleet.v1.models_pb2 import SignedManifest
from edgefleet.signing import key_id, load_or_create_private_key, public_key_bytes, sign_manifest

__all__ = ["SIGNING_KEY_FILE", "FleetSigner"]

SIGNING_KEY_FILE = "fleet-signing.key"


class FleetSigner:
    """Signs manifests with one ed25519 key. Thread-safe (signing holds no state)."""

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key
        self.public_key = public_key_bytes(key)
        self.key_id = key_id(self.public_key)

    @classmethod
    def open(cls, path: Path) -> FleetSigner:
        """The key in `path`, made there on first use (blocking: call it off the loop)."""
        try:
            return cls(load_or_create_private_key(path))
        except (OSError, ValueError) as exc:
            raise ConfigProblem(
                f"cannot use the fleet signing key {path} ({exc}): restore it from backup; a new key means "
                "re-enrolling every device"
            ) from exc

    def sign(
        self, manifest: dict[str, Any], serial: int, expires_at_ms: int, signed_at_ms: int | None = None
    ) -> SignedManifest:
        envelope, signature, kid = sign_manifest(
            self._key,
            manifest,
            serial=serial,
            signed_at_ms=now_ms() if signed_at_ms is None else signed_at_ms,
            expires_at_ms=expires_at_ms,
        )
        return SignedManifest(manifest_json=envelope, signature=signature, key_id=kid)
