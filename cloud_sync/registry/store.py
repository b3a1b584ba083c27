"""The model registry: which (name, version) exist, their files, and each one's signed manifest.

A version is registered once its blobs are uploaded (registry/blobs.py): the manifest's fields the registry
relies on are checked (name and version alphabet, sha256 and size of model.onnx and warmup.npz), the blobs
must be there with those sizes, and the manifest is signed under the next registry-wide serial. The serial
orders envelopes: signing a version again (a new expiry) gives a higher one, and a device that saw it refuses
the older envelope. Not for who runs what (assignments, desired state) nor for serving files (artifacts.py).
"""

from __future__ import annotations

import builtins
import contextlib
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
import structlog
from sqlalchemy import exc as sa_exc

from cloud_sync.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from cloud_sync.registry.blobs import BlobStore, check_sha256
from cloud_sync.store.database import Database, now_ms
from cloud_sync.store.schema import metadata
from edgefleet.proto.edgefleet.v1.models_pb2 import SignedManifest
from edgefleet.proto.edgefleet.v1.state_pb2 import DesiredState
from edgefleet.signing import MAX_ENVELOPE_BYTES, canonical_json

if TYPE_CHECKING:  # the signer imports the config; the store package imports this module for its table
    from cloud_sync.registry.signer import FleetSigner

__all__ = [
    "MODEL_FILE",
    "WARMUP_FILE",
    "ModelRegistry",
    "ModelVersion",
    "assigned_devices",
    "check_manifest",
    "check_model_ref",
    "model_versions",
]

log = structlog.get_logger(__name__)

MODEL_FILE = "model.onnx"
WARMUP_FILE = "warmup.npz"
# The envelope wraps the manifest in a few dozen bytes; leave room for them under the envelope's limit.
MAX_MANIFEST_BYTES = MAX_ENVELOPE_BYTES - 4096
# The same alphabet as a device's model names (edge_runtime/models/package.py check_ref).
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
_MAX_VERSION = 2**31 - 1
_SERIAL_ATTEMPTS = 5
# renew_expiring signs a version again once less than this share of its validity is left (15 of 30 days).
RENEW_WHEN_LEFT = 0.5
# How often cloud-sync looks for versions to renew.
RENEW_EVERY_S = 3600.0
# Any constant: the advisory lock under which PostgreSQL replicas assign serials one at a time ("efserial").
_SERIAL_LOCK_KEY = 0x6566_7365_7269_616C

model_versions = sa.Table(
    "model_versions",
    metadata,
    sa.Column("name", sa.Text, primary_key=True),
    sa.Column("version", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("sha256", sa.Text, nullable=False),
    sa.Column("size", sa.BigInteger, nullable=False),
    # warmup.npz's blob, when the manifest names one (so a delete finds the blobs no other version uses).
    sa.Column("warmup_sha256", sa.Text, nullable=True),
    sa.Column("warmup_size", sa.BigInteger, nullable=True),
    sa.Column("manifest", sa.JSON, nullable=False),
    # The signed envelope (edgefleet/signing.py) exactly as devices receive it.
    sa.Column("envelope", sa.LargeBinary, nullable=False),
    sa.Column("signature", sa.LargeBinary, nullable=False),
    sa.Column("key_id", sa.Text, nullable=False),
    # Registry-wide signing counter: unique, increasing with every signature.
    sa.Column("serial", sa.BigInteger, nullable=False, unique=True),
    sa.Column("signed_at_ms", sa.BigInteger, nullable=False),
    sa.Column("expires_at_ms", sa.BigInteger, nullable=False),
    sa.Column("created_at_ms", sa.BigInteger, nullable=False),
)


@dataclass(frozen=True)
class ModelVersion:
    name: str
    version: int
    sha256: str
    size: int
    manifest: dict[str, Any]
    envelope: SignedManifest
    serial: int
    expires_at_ms: int
    created_at_ms: int
    signed_at_ms: int = 0

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"

    @property
    def key_id(self) -> str:
        return self.envelope.key_id

    def files(self) -> dict[str, tuple[str, int]]:
        """{file name: (sha256, size)} of the package's blobs: model.onnx, and warmup.npz when it has one."""
        found = {MODEL_FILE: (self.sha256, self.size)}
        warmup = self.manifest.get("warmup")
        if isinstance(warmup, dict) and warmup.get("file"):
            found[WARMUP_FILE] = (str(warmup["sha256"]), int(warmup["size"]))
        return found


def check_model_ref(name: object, version: object) -> tuple[str, int]:
    """A valid model name and version; InvalidArgument otherwise."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise InvalidArgument(
            f"model name {str(name)[:80]!r} must be 1-63 characters of a-z, 0-9, '.', '_', '-', starting with a "
            "letter or digit"
        )
    if not isinstance(version, int) or isinstance(version, bool) or not 0 < version <= _MAX_VERSION:
        raise InvalidArgument(f"model version {str(version)[:40]!r} must be an integer in 1..{_MAX_VERSION}")
    return name, version


def _positive(value: object, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value < 2**63:
        raise InvalidArgument(f"{what} must be a positive integer (bytes)")
    return value


def check_manifest(manifest: object) -> dict[str, tuple[str, int]]:
    """The package files `manifest` names ({file: (sha256, size)}), after checking the fields the registry relies
    on; InvalidArgument naming the field otherwise. The device checks the rest (tensors, shapes) on install."""
    if not isinstance(manifest, dict):
        raise InvalidArgument("manifest must be a JSON object (a package's manifest.json)")
    try:
        size = len(canonical_json(manifest))
    except (TypeError, ValueError) as exc:
        raise InvalidArgument(f"manifest is not plain JSON ({exc})") from None
    if size > MAX_MANIFEST_BYTES:
        raise InvalidArgument(f"manifest is {size} bytes (at most {MAX_MANIFEST_BYTES})")
    check_model_ref(manifest.get("name"), manifest.get("version"))
    if manifest.get("platform", "onnx") != "onnx":
        raise InvalidArgument("manifest.platform must be 'onnx'")
    for key in ("inputs", "outputs"):
        if not isinstance(manifest.get(key), list) or not manifest[key]:
            raise InvalidArgument(f"manifest.{key} must list the model's tensors")
    files = {
        MODEL_FILE: (
            check_sha256(manifest.get("sha256"), "manifest.sha256"),
            _positive(manifest.get("size"), "manifest.size"),
        )
    }
    warmup = manifest.get("warmup")
    if warmup is not None:
        if not isinstance(warmup, dict):
            raise InvalidArgument("manifest.warmup must be an object")
        if warmup.get("file"):
            if warmup["file"] != WARMUP_FILE:
                raise InvalidArgument(f"manifest.warmup.file must be {WARMUP_FILE!r}")
            files[WARMUP_FILE] = (
                check_sha256(warmup.get("sha256"), "manifest.warmup.sha256"),
                _positive(warmup.get("size"), "manifest.warmup.size"),
            )
    return files


def assigned_devices(db: Database, name: str, version: int) -> list[str]:
    """Devices whose current desired state names (name, version): the registry's default `in_use` check.

    Reads every desired state: fine for a registry delete (rare), not for a hot path.
    """
    from cloud_sync.store.control import desired_state

    def read(conn: sa.Connection) -> list[str]:
        found = []
        for row in conn.execute(sa.select(desired_state.c.device_id, desired_state.c.payload)):
            state = DesiredState.FromString(bytes(row.payload))
            if any(m.name == name and m.version == version for m in state.models):
                found.append(row.device_id)
        return sorted(found)

    return db.read(read)


class ModelRegistry:
    """Model versions over a Database, their blobs and the fleet signer. Synchronous and thread-safe."""

    def __init__(self, db: Database, blobs: BlobStore, signer: FleetSigner) -> None:
        self._db = db
        self.blobs = blobs
        self.signer = signer

    def register(self, manifest: dict[str, Any], expires_at_ms: int) -> ModelVersion:
        """Sign and record a new version. The same manifest again returns the version as it is; another
        manifest under a registered (name, version) is refused (AlreadyExists): versions are immutable."""
        return self.register_new(manifest, expires_at_ms)[0]

    def register_new(self, manifest: dict[str, Any], expires_at_ms: int) -> tuple[ModelVersion, bool]:
        """register, and whether the version was new (False: the same manifest was registered before)."""
        files = check_manifest(manifest)
        name, version = manifest["name"], manifest["version"]
        self._check_expiry(expires_at_ms)
        for file, (sha, size) in files.items():
            stored = self.blobs.size(sha)
            if stored is None:
                raise FailedPrecondition(
                    f"{file} of {name}:{version} (sha256 {sha}) is not uploaded: PUT /v1/blobs/{sha} first "
                    "(fleetctl models push does)"
                )
            if stored != size:
                raise InvalidArgument(f"the manifest gives {file} {size} bytes, but blob {sha} has {stored}")
        body = canonical_json(manifest)

        def write(conn: sa.Connection) -> tuple[ModelVersion, bool]:
            row = conn.execute(_select_one(name, version)).one_or_none()
            if row is not None:
                if canonical_json(row.manifest) == body:
                    return _version(row), False
                raise AlreadyExists(
                    f"model {name}:{version} is registered with another manifest; versions never change: "
                    "push it as a new version"
                )
            serial = _next_serial(conn)
            signed_at = now_ms()
            envelope = self.signer.sign(manifest, serial, expires_at_ms, signed_at)
            warmup = files.get(WARMUP_FILE)
            values = {
                "name": name,
                "version": version,
                "sha256": files[MODEL_FILE][0],
                "size": files[MODEL_FILE][1],
                "warmup_sha256": warmup[0] if warmup else None,
                "warmup_size": warmup[1] if warmup else None,
                "manifest": manifest,
                "envelope": envelope.manifest_json,
                "signature": envelope.signature,
                "key_id": envelope.key_id,
                "serial": serial,
                "signed_at_ms": signed_at,
                "expires_at_ms": expires_at_ms,
                "created_at_ms": signed_at,
            }
            conn.execute(model_versions.insert().values(**values))
            return _from_values(values), True

        found, created = self._write_with_serial(write)
        if created:
            log.info("registry.registered", model=found.ref, serial=found.serial, sha256=found.sha256)
        return found, created

    def assigned(self, name: str, version: int) -> builtins.list[str]:
        """Devices whose current desired state names the version (see assigned_devices)."""
        return assigned_devices(self._db, name, version)

    def get(self, name: str, version: int) -> ModelVersion:
        check_model_ref(name, version)
        row = self._db.read(lambda conn: conn.execute(_select_one(name, version)).one_or_none())
        if row is None:
            raise NotFound(f"no model {name}:{version} in the registry")
        return _version(row)

    def list(self, name: str | None = None) -> list[ModelVersion]:
        query = sa.select(model_versions).order_by(model_versions.c.name, model_versions.c.version)
        if name is not None:
            query = query.where(model_versions.c.name == name)
        return [_version(row) for row in self._db.read(lambda conn: list(conn.execute(query)))]

    def digests(self) -> dict[tuple[str, int], str]:
        """{(name, version): model.onnx's sha256} of every version, in one query (for computing desired states)."""
        query = sa.select(model_versions.c.name, model_versions.c.version, model_versions.c.sha256)
        rows = self._db.read(lambda conn: list(conn.execute(query)))
        return {(r.name, int(r.version)): r.sha256 for r in rows}

    def sign_again(self, name: str, version: int, expires_at_ms: int) -> ModelVersion:
        """A fresh envelope under a new, higher serial (a new expiry); devices that saw it refuse the old one."""
        check_model_ref(name, version)
        self._check_expiry(expires_at_ms)

        def write(conn: sa.Connection) -> tuple[ModelVersion, bool]:
            row = conn.execute(_select_one(name, version).with_for_update()).one_or_none()
            if row is None:
                raise NotFound(f"no model {name}:{version} in the registry")
            serial = _next_serial(conn)
            signed_at = now_ms()
            envelope = self.signer.sign(row.manifest, serial, expires_at_ms, signed_at)
            values = {
                "envelope": envelope.manifest_json,
                "signature": envelope.signature,
                "key_id": envelope.key_id,
                "serial": serial,
                "signed_at_ms": signed_at,
                "expires_at_ms": expires_at_ms,
            }
            conn.execute(model_versions.update().where(_is(name, version)).values(**values))
            return _from_values({**row._asdict(), **values}), True

        found, _ = self._write_with_serial(write)
        log.info("registry.signed_again", model=found.ref, serial=found.serial, expires_at_ms=expires_at_ms)
        return found

    def renew_expiring(self, now: int | None = None, *, left: float = RENEW_WHEN_LEFT) -> builtins.list[ModelVersion]:
        """Sign again, for as long as they were signed before, the versions with less than `left` of their
        validity remaining: the key is online, so a fleet's manifests never expire under it while a device
        still has to install them (an expired one is refused: that is the freeze attack's defence, not a
        switch to turn a version off - deleting it is). Replicas renewing together cost a serial, nothing else.
        """
        now = now_ms() if now is None else now
        renewed = []
        for found in self.list():
            lifetime = found.expires_at_ms - found.signed_at_ms
            if lifetime > 0 and found.expires_at_ms - now < lifetime * left:
                with contextlib.suppress(NotFound):  # deleted meanwhile
                    renewed.append(self.sign_again(found.name, found.version, now + lifetime))
        return renewed

    def delete(self, name: str, version: int, in_use: Callable[[str, int], builtins.list[str]]) -> ModelVersion:
        """Remove a version nothing uses, and the blobs no other version shares; FailedPrecondition names the
        devices (or assignments) still holding it."""
        check_model_ref(name, version)
        users = in_use(name, version)
        if users:
            shown = ", ".join(users[:10]) + (f" and {len(users) - 10} more" if len(users) > 10 else "")
            raise FailedPrecondition(
                f"model {name}:{version} is in use ({shown}): assign those devices another version first"
            )

        def write(conn: sa.Connection) -> ModelVersion:
            row = conn.execute(_select_one(name, version).with_for_update()).one_or_none()
            if row is None:
                raise NotFound(f"no model {name}:{version} in the registry")
            conn.execute(model_versions.delete().where(_is(name, version)))
            return _version(row)

        gone = self._db.write(write)
        self._delete_unused_blobs(sha for sha, _ in gone.files().values())
        log.info("registry.deleted", model=gone.ref)
        return gone

    def _delete_unused_blobs(self, shas: Iterable[str]) -> None:
        wanted = set(shas)
        query = sa.select(model_versions.c.sha256, model_versions.c.warmup_sha256).where(
            model_versions.c.sha256.in_(wanted) | model_versions.c.warmup_sha256.in_(wanted)
        )
        used = {sha for row in self._db.read(lambda conn: list(conn.execute(query))) for sha in row if sha}
        for sha in sorted(wanted - used):
            self.blobs.delete(sha)

    def _check_expiry(self, expires_at_ms: int) -> None:
        if expires_at_ms <= now_ms():
            raise InvalidArgument("the expiry must be in the future")

    def _write_with_serial(
        self, write: Callable[[sa.Connection], tuple[ModelVersion, bool]]
    ) -> tuple[ModelVersion, bool]:
        """Run `write`; two writers (replicas on PostgreSQL) that took the same serial: the loser tries again."""
        for attempt in range(1, _SERIAL_ATTEMPTS + 1):
            try:
                return self._db.write(write)
            except sa_exc.IntegrityError:
                if attempt == _SERIAL_ATTEMPTS:
                    raise
                log.info("registry.serial_taken", attempt=attempt)
        raise AssertionError("unreachable")  # pragma: no cover


def _is(name: str, version: int) -> sa.ColumnElement[bool]:
    return (model_versions.c.name == name) & (model_versions.c.version == version)


def _select_one(name: str, version: int) -> sa.Select[Any]:
    return sa.select(model_versions).where(_is(name, version))


def _next_serial(conn: sa.Connection) -> int:
    """The next registry-wide serial. On PostgreSQL the transaction first takes the registry's advisory lock, so
    replicas signing at once take turns (SQLite's BEGIN IMMEDIATE already made this the only writer); the unique
    serial column stays the backstop (_write_with_serial tries again)."""
    if conn.dialect.name == "postgresql":
        conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_SERIAL_LOCK_KEY)))
    return int(conn.execute(sa.select(sa.func.max(model_versions.c.serial))).scalar_one_or_none() or 0) + 1


def _from_values(values: dict[str, Any]) -> ModelVersion:
    return ModelVersion(
        name=values["name"],
        version=int(values["version"]),
        sha256=values["sha256"],
        size=int(values["size"]),
        manifest=dict(values["manifest"]),
        envelope=SignedManifest(
            manifest_json=bytes(values["envelope"]), signature=bytes(values["signature"]), key_id=values["key_id"]
        ),
        serial=int(values["serial"]),
        expires_at_ms=int(values["expires_at_ms"]),
        created_at_ms=int(values["created_at_ms"]),
        signed_at_ms=int(values["signed_at_ms"]),
    )


def _version(row: Any) -> ModelVersion:
    return _from_values(row._asdict())
