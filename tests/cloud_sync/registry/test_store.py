"""The model registry on SQLite and PostgreSQL: register (idempotent, immutable), sign again, list, delete."""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from cloud_sync.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from cloud_sync.registry import DirectoryBlobStore, FleetSigner, ModelRegistry
from cloud_sync.store import ControlStore, DeviceRegistry, open_database
from cloud_sync.store.database import now_ms
from edgefleet.proto.edgefleet.v1.state_pb2 import DesiredState, ModelAssignment, ModelRole
from edgefleet.signing import verify_envelope

from .helpers import FAR_FUTURE_MS, manifest_for, package, stored


@pytest.fixture
def registry(store_url: str, tmp_path: Path) -> Iterator[ModelRegistry]:
    db = open_database(store_url)
    yield ModelRegistry(db, DirectoryBlobStore(tmp_path / "blobs"), FleetSigner.open(tmp_path / "fleet.key"))
    db.close()


def _nobody(name: str, version: int) -> list[str]:
    return []


def test_a_registered_version_is_signed_and_read_back(registry: ModelRegistry) -> None:
    manifest, _, _ = package(registry.blobs, "digits", 1, warmup=200)
    version = registry.register(manifest, FAR_FUTURE_MS)
    assert (version.name, version.version, version.sha256, version.size) == (
        "digits",
        1,
        manifest["sha256"],
        manifest["size"],
    )
    envelope = verify_envelope(
        registry.signer.public_key,
        version.envelope.manifest_json,
        version.envelope.signature,
        version.envelope.key_id,
        now_ms=now_ms(),
    )
    assert envelope.manifest == manifest and envelope.serial == version.serial
    assert version.files() == {
        "model.onnx": (manifest["sha256"], manifest["size"]),
        "warmup.npz": (manifest["warmup"]["sha256"], manifest["warmup"]["size"]),
    }
    assert registry.get("digits", 1) == version
    assert registry.digests() == {("digits", 1): manifest["sha256"]}


def test_the_same_manifest_again_is_the_same_version_and_another_is_refused(registry: ModelRegistry) -> None:
    manifest, _, _ = package(registry.blobs, "digits", 1)
    first, created = registry.register_new(manifest, FAR_FUTURE_MS)
    again, created_again = registry.register_new(copy.deepcopy(manifest), FAR_FUTURE_MS - 1000)
    assert created and not created_again and again == first
    other, _, _ = package(registry.blobs, "digits", 1, size=2000)
    with pytest.raises(AlreadyExists, match="versions never change"):
        registry.register(other, FAR_FUTURE_MS)
    assert registry.get("digits", 1) == first


def test_serials_increase_across_the_registry_and_signing_again_takes_a_new_one(registry: ModelRegistry) -> None:
    serials = [
        registry.register(package(registry.blobs, n, v)[0], FAR_FUTURE_MS).serial
        for n, v in [("a", 1), ("b", 1), ("a", 2)]
    ]
    assert serials == sorted(serials) and len(set(serials)) == 3
    renewed = registry.sign_again("a", 1, FAR_FUTURE_MS - 5)
    assert renewed.serial > max(serials) and renewed.expires_at_ms == FAR_FUTURE_MS - 5
    assert registry.get("a", 1) == renewed
    assert [(v.name, v.version) for v in registry.list()] == [("a", 1), ("a", 2), ("b", 1)]
    assert [v.version for v in registry.list("a")] == [1, 2]
    with pytest.raises(NotFound):
        registry.sign_again("zz", 1, FAR_FUTURE_MS)


def test_versions_past_half_their_validity_are_signed_again_for_as_long_as_before(registry: ModelRegistry) -> None:
    day = 86_400_000
    now = now_ms()
    fresh = registry.register(package(registry.blobs, "a", 1)[0], now + 30 * day)
    aging = registry.register(package(registry.blobs, "b", 1)[0], now + 30 * day)
    # Seen 20 days later: both have 10 of their 30 days left, less than half.
    later = now + 20 * day
    renewed = registry.renew_expiring(later)
    assert sorted(v.ref for v in renewed) == ["a:1", "b:1"]
    for version in renewed:
        lifetime = version.expires_at_ms - later
        assert abs(lifetime - 30 * day) < 5_000  # the same 30 days, counted from the renewal
        assert version.serial > max(fresh.serial, aging.serial)  # a device that saw it refuses the old envelope
        # The new envelope is what the registry serves now, and it verifies.
        envelope = registry.get(version.name, version.version).envelope
        verify_envelope(
            registry.signer.public_key, envelope.manifest_json, envelope.signature, envelope.key_id, now_ms=later
        )
    assert registry.renew_expiring(later) == []  # renewed: nothing to do until half of it passes again


def test_blobs_must_be_uploaded_first_with_the_sizes_the_manifest_gives(registry: ModelRegistry) -> None:
    model = os.urandom(500)
    missing = manifest_for("digits", 1, model)
    with pytest.raises(FailedPrecondition, match="not uploaded"):
        registry.register(missing, FAR_FUTURE_MS)
    stored(registry.blobs, model)
    with pytest.raises(InvalidArgument, match="500"):
        registry.register({**missing, "size": 501}, FAR_FUTURE_MS)
    warm = manifest_for("digits", 1, model, os.urandom(10))
    with pytest.raises(FailedPrecondition, match="warmup.npz"):
        registry.register(warm, FAR_FUTURE_MS)
    assert registry.list() == []


def _bad(change: dict[str, Any]) -> dict[str, Any]:
    base = manifest_for("digits", 1, b"m" * 10)
    for key, value in change.items():
        if value is None:
            base.pop(key)
        else:
            base[key] = value
    return base


@pytest.mark.parametrize(
    ("manifest", "named"),
    [
        ([1, 2], "JSON object"),
        (_bad({"name": "Digits"}), "model name"),
        (_bad({"name": None}), "model name"),
        (_bad({"version": 0}), "model version"),
        (_bad({"version": True}), "model version"),
        (_bad({"sha256": "abc"}), "manifest.sha256"),
        (_bad({"size": -1}), "manifest.size"),
        (_bad({"platform": "tflite"}), "manifest.platform"),
        (_bad({"inputs": []}), "manifest.inputs"),
        (_bad({"warmup": {"file": "../x", "sha256": "0" * 64, "size": 1}}), "manifest.warmup.file"),
        (_bad({"warmup": {"file": "warmup.npz", "sha256": "0" * 64}}), "manifest.warmup.size"),
        (_bad({"extra": {"x": float("nan")}}), "plain JSON"),
        (_bad({"description": "x" * (1 << 20)}), "at most"),
    ],
)
def test_a_manifest_missing_what_the_registry_relies_on_is_refused_by_field(
    registry: ModelRegistry, manifest: Any, named: str
) -> None:
    with pytest.raises(InvalidArgument, match=named):
        registry.register(manifest, FAR_FUTURE_MS)
    assert registry.list() == []


def test_an_expiry_in_the_past_is_refused(registry: ModelRegistry) -> None:
    manifest, _, _ = package(registry.blobs, "digits", 1)
    with pytest.raises(InvalidArgument, match="future"):
        registry.register(manifest, now_ms() - 1)


def test_a_version_in_use_is_not_deleted_and_the_refusal_names_the_holders(registry: ModelRegistry) -> None:
    manifest, _, _ = package(registry.blobs, "digits", 1)
    registry.register(manifest, FAR_FUTURE_MS)
    with pytest.raises(FailedPrecondition, match="cam-1, cam-2"):
        registry.delete("digits", 1, lambda name, version: ["cam-1", "cam-2"])
    assert registry.get("digits", 1).version == 1
    assert registry.blobs.size(manifest["sha256"]) == manifest["size"]


def test_delete_removes_the_version_and_only_the_blobs_no_other_version_uses(registry: ModelRegistry) -> None:
    one, model, _ = package(registry.blobs, "digits", 1, warmup=100)
    registry.register(one, FAR_FUTURE_MS)
    # Version 2 shares model.onnx with version 1, and has a warmup.npz of its own.
    two_warm = os.urandom(50)
    stored(registry.blobs, two_warm)
    two = manifest_for("digits", 2, model, two_warm)
    registry.register(two, FAR_FUTURE_MS)
    registry.delete("digits", 1, _nobody)
    assert registry.blobs.size(one["sha256"]) == len(model)  # version 2 still uses it
    assert registry.blobs.size(one["warmup"]["sha256"]) is None
    with pytest.raises(NotFound):
        registry.get("digits", 1)
    with pytest.raises(NotFound):
        registry.delete("digits", 1, _nobody)
    registry.delete("digits", 2, _nobody)
    assert registry.blobs.size(one["sha256"]) is None and registry.blobs.size(two["warmup"]["sha256"]) is None


def test_the_default_in_use_check_finds_devices_whose_desired_state_names_the_version(
    registry: ModelRegistry, store_url: str
) -> None:
    manifest, _, _ = package(registry.blobs, "digits", 1)
    registry.register(manifest, FAR_FUTURE_MS)
    db = open_database(store_url)
    try:
        DeviceRegistry(db).add_device("cam-1")
        DeviceRegistry(db).add_device("cam-2")
        model = ModelAssignment(name="digits", version=1, role=ModelRole.MODEL_ROLE_ACTIVE)
        ControlStore(db).set_desired("cam-2", DesiredState(models=[model]))
        ControlStore(db).set_desired("cam-1", DesiredState())
    finally:
        db.close()
    assert registry.assigned("digits", 1) == ["cam-2"]
    assert registry.assigned("digits", 2) == []


def test_registries_racing_on_one_database_never_share_a_serial(store_url: str, tmp_path: Path) -> None:
    blobs = DirectoryBlobStore(tmp_path / "blobs")
    signer = FleetSigner.open(tmp_path / "fleet.key")
    dbs = [open_database(store_url) for _ in range(3)]
    try:
        registries = [ModelRegistry(db, blobs, signer) for db in dbs]
        manifests = [package(blobs, f"m{i}", 1)[0] for i in range(24)]
        with ThreadPoolExecutor(6) as pool:
            versions = list(pool.map(lambda i: registries[i % 3].register(manifests[i], FAR_FUTURE_MS), range(24)))
        assert len({v.serial for v in versions}) == 24
        assert len(registries[0].list()) == 24
    finally:
        for db in dbs:
            db.close()
