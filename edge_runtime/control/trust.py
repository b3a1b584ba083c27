"""Whether the device trusts a signed model manifest: the fleet key pinned at enrollment, plus the checks that
need the device's own memory (an envelope older than one seen for that version, one for another model).

`check` is pure CPU (an ed25519 verify), safe on the loop; building a TrustStore and `remember` touch the disk.
Not for verifying the downloaded bytes against the manifest (control/fetch.py) nor for fetching them.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import structlog

from edge_runtime.errors import ArtifactRefused, PackageError
from edge_runtime.models.package import ModelManifest, parse_manifest
from edgefleet.durable import write_atomic
from edgefleet.proto.edgefleet.v1.models_pb2 import SignedManifest
from edgefleet.signing import Envelope, SignatureRefused, key_id, load_public_key, verify_envelope

__all__ = ["REASONS", "SEEN_FILE", "ArtifactRefused", "TrustStore", "verified_manifest"]

log = structlog.get_logger(__name__)

SEEN_FILE = Path("control") / "seen-manifests.json"
# One word per refusal, for the reported state and for operators to search logs by.
REASONS = ("wrong-key", "bad-signature", "malformed", "expired", "rollback", "mismatch", "too-large")
_SEEN_FORMAT = 1
# Far more (name, version) pairs than a device ever holds; a bigger file is not ours.
_MAX_SEEN_BYTES = 4 * 1024 * 1024


class TrustStore:
    """The fleet key and the highest envelope serial seen per model version (`{data_dir}/control/seen-manifests.json`).

    Construct off the loop (reads that file). Thread-safe.
    """

    def __init__(self, data_dir: Path, signing_key: bytes) -> None:
        try:
            load_public_key(signing_key)
        except (SignatureRefused, ValueError) as exc:
            raise ValueError(f"the fleet signing key is not a raw ed25519 public key: {exc}") from exc
        self.signing_key = bytes(signing_key)
        self.key_id = key_id(self.signing_key)
        self.path = Path(data_dir) / SEEN_FILE
        self._lock = threading.Lock()
        self._seen = _read_seen(self.path)

    def check(self, signed: SignedManifest, name: str, version: int, sha256: str | None, now_ms: int) -> Envelope:
        """The verified envelope of name:version; ArtifactRefused with the reason otherwise.

        `sha256` is what the desired state's assignment names (None or "": no pin).
        """
        ref = f"{name}:{version}"
        try:
            envelope = verify_envelope(
                self.signing_key, signed.manifest_json, signed.signature, signed.key_id, now_ms=now_ms
            )
        except SignatureRefused as exc:
            raise ArtifactRefused(exc.reason, f"{ref}: {exc}") from None
        if envelope.name != name or envelope.version != version:
            raise ArtifactRefused(
                "mismatch", f"{ref}: the cloud sent the signed manifest of {envelope.name}:{envelope.version}"
            )
        manifest = verified_manifest(envelope)
        if sha256 and manifest.sha256 != sha256:
            raise ArtifactRefused(
                "mismatch",
                f"{ref}: the signed manifest's model sha256 {manifest.sha256[:12]}… is not the assigned "
                f"{sha256[:12]}…: the version was re-pushed or the assignment is stale; waiting for the cloud",
            )
        with self._lock:
            highest = self._seen.get(ref, 0)
        if envelope.serial < highest:
            raise ArtifactRefused(
                "rollback",
                f"{ref}: the signed manifest has serial {envelope.serial}, older than serial {highest} this device "
                "already saw: refusing a replayed manifest",
            )
        return envelope

    def highest_serial(self, name: str, version: int) -> int:
        """The highest serial remembered for name:version (0: none)."""
        with self._lock:
            return self._seen.get(f"{name}:{version}", 0)

    def remember(self, envelope: Envelope) -> None:
        """Record the envelope's serial so an older one is refused from now on (blocks: writes a file)."""
        ref = f"{envelope.name}:{envelope.version}"
        with self._lock:
            if self._seen.get(ref, 0) >= envelope.serial:
                return
            self._seen[ref] = envelope.serial
            data = json.dumps({"format": _SEEN_FORMAT, "seen": self._seen}, sort_keys=True, indent=1).encode()
            write_atomic(self.path, data, mode=0o600)


def verified_manifest(envelope: Envelope) -> ModelManifest:
    """The package manifest inside a verified envelope; ArtifactRefused("malformed") when it is not one."""
    try:
        return parse_manifest(envelope.manifest_json())
    except PackageError as exc:
        raise ArtifactRefused("malformed", f"{envelope.name}:{envelope.version}: signed, but {exc}") from None


def _read_seen(path: Path) -> dict[str, int]:
    """The remembered serials; a damaged file is logged and read as empty (never stops the agent)."""
    try:
        with path.open("rb") as f:
            raw = f.read(_MAX_SEEN_BYTES + 1)
    except FileNotFoundError:
        return {}
    try:
        if len(raw) > _MAX_SEEN_BYTES:
            raise ValueError(f"larger than {_MAX_SEEN_BYTES} bytes")
        return _parse_seen(json.loads(raw.decode("utf-8")))
    except (UnicodeDecodeError, ValueError) as exc:
        log.warning("control.seen_manifests_damaged", path=str(path), error=str(exc))
        return {}


def _parse_seen(data: Any) -> dict[str, int]:
    if not isinstance(data, dict) or data.get("format") != _SEEN_FORMAT or not isinstance(data.get("seen"), dict):
        raise ValueError(f"not a format-{_SEEN_FORMAT} seen-manifests file")
    seen: dict[str, int] = {}
    for ref, serial in data["seen"].items():
        if not isinstance(serial, int) or isinstance(serial, bool) or serial < 0:
            raise ValueError(f"serial of {ref!r} is not a non-negative integer")
        seen[str(ref)] = serial
    return seen
