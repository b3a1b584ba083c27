"""The device's model store: verified atomic installs, the active pointer and rollback target."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from edge_runtime.errors import ModelNotFound, PackageError, VerificationFailed
from edge_runtime.models.package import MODEL_FILE
from edge_runtime.models.store import ModelStore


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    return ModelStore(tmp_path / "models")


def test_install_copies_a_verified_package(store: ModelStore, model_packages: dict[str, Path]) -> None:
    package = store.install(model_packages["digits:1"])
    assert package.directory == store.root / "digits" / "1"
    assert (package.directory / MODEL_FILE).read_bytes() == (model_packages["digits:1"] / MODEL_FILE).read_bytes()
    assert store.versions("digits") == [1]
    assert store.active("digits") is None  # installing is not activating


def test_a_corrupted_package_is_refused_and_nothing_lands(
    store: ModelStore, model_packages: dict[str, Path], tmp_path: Path
) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(model_packages["digits:2"], bad)
    data = bytearray((bad / MODEL_FILE).read_bytes())
    data[len(data) // 2] ^= 0x01
    (bad / MODEL_FILE).write_bytes(bytes(data))
    with pytest.raises(VerificationFailed, match="sha256"):
        store.install(bad)
    assert store.versions("digits") == []
    assert not (store.root / "digits").exists()


def test_reinstalling_is_idempotent_but_a_different_model_under_the_same_version_is_refused(
    store: ModelStore, model_packages: dict[str, Path], tmp_path: Path
) -> None:
    store.install(model_packages["digits:1"])
    store.install(model_packages["digits:1"])
    assert store.versions("digits") == [1]
    impostor = tmp_path / "impostor"
    shutil.copytree(model_packages["digits:2"], impostor)
    manifest = (impostor / "manifest.json").read_text().replace('"version": 2', '"version": 1')
    (impostor / "manifest.json").write_text(manifest)
    with pytest.raises(PackageError, match="already installed with a different model"):
        store.install(impostor)


def test_the_active_pointer_remembers_the_previous_version_across_restarts(
    store: ModelStore, model_packages: dict[str, Path]
) -> None:
    store.install(model_packages["digits:1"])
    store.install(model_packages["digits:2"])
    store.set_active("digits", 1)
    store.set_active("digits", 2)
    reopened = ModelStore(store.root)
    pointer = reopened.active("digits")
    assert pointer is not None and (pointer.version, pointer.previous) == (2, 1)
    # re-activating the same version keeps the rollback target
    assert reopened.set_active("digits", 2).previous == 1


def test_activating_a_version_that_is_not_installed_is_refused(store: ModelStore) -> None:
    with pytest.raises(ModelNotFound, match="not installed"):
        store.set_active("digits", 9)


def test_the_active_and_rollback_versions_cannot_be_removed(store: ModelStore, model_packages: dict[str, Path]) -> None:
    store.install(model_packages["digits:1"])
    store.install(model_packages["digits:2"])
    store.set_active("digits", 1)
    store.set_active("digits", 2)
    for version in (1, 2):
        with pytest.raises(PackageError, match="active or the rollback target"):
            store.remove("digits", version)
    assert store.versions("digits") == [1, 2]


def test_pruning_keeps_the_active_version_its_rollback_target_and_what_is_asked(
    store: ModelStore, model_packages: dict[str, Path], tmp_path: Path
) -> None:
    assert store.prune("digits", set()) == []  # nothing installed, nothing active: nothing to judge by
    for version in (1, 2, 3, 4):
        package = tmp_path / f"digits-{version}"
        shutil.copytree(model_packages["digits:1"], package)
        manifest = (package / "manifest.json").read_text().replace('"version": 1', f'"version": {version}')
        (package / "manifest.json").write_text(manifest)
        store.install(package)
    store.set_active("digits", 2)
    store.set_active("digits", 3)  # active 3, rollback target 2
    assert store.prune("digits", {4}) == [1]
    assert store.versions("digits") == [2, 3, 4]
    assert store.prune("digits", set()) == [4]
    assert store.versions("digits") == [2, 3] and store.active("digits") is not None


def test_a_half_finished_install_is_invisible(store: ModelStore, model_packages: dict[str, Path]) -> None:
    store.install(model_packages["digits:1"])
    (store.root / "digits" / ".2.abcd").mkdir()  # what a kill -9 during install leaves behind
    assert store.versions("digits") == [1]
    assert store.names() == ["digits"]


def test_a_damaged_pointer_is_reported_not_guessed(store: ModelStore, model_packages: dict[str, Path]) -> None:
    store.install(model_packages["digits:1"])
    (store.root / "digits" / "active.json").write_text("{not json")
    with pytest.raises(PackageError, match="damaged"):
        store.active("digits")
