"""The device's model store: installed packages under {data_dir}/models/{name}/{version}/ and which is active.

Installation verifies the package (sha256 and size of its files against its manifest) before anything lands, and lands
atomically (copy to a temp dir, fsync, rename). The active-version pointer is a small JSON file replaced
atomically, so a restart serves exactly what was active. Not for loading or serving: see repository.py.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import structlog

from edge_runtime.errors import ModelNotFound, PackageError
from edge_runtime.models.package import ModelPackage, read_package
from edgefleet.durable import fsync_dir, write_atomic

__all__ = ["ActivePointer", "ModelStore"]

log = structlog.get_logger(__name__)

POINTER_FILE = "active.json"


@dataclass(frozen=True)
class ActivePointer:
    version: int
    previous: int | None = None


class ModelStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def install(self, source: Path) -> ModelPackage:
        """Verify the package in `source` and copy it into the store; idempotent for identical packages."""
        package = read_package(source, verify=True)
        m = package.manifest
        target = self.root / m.name / str(m.version)
        if target.exists():
            existing = read_package(target, verify=False).manifest
            if existing.sha256 != m.sha256:
                raise PackageError(
                    f"{m.ref} is already installed with a different model (sha256 {existing.sha256[:12]}…); "
                    "publish a new version number instead of replacing one"
                )
            return read_package(target, verify=True)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{m.version}.", dir=target.parent))
        try:
            for name in package.files():
                shutil.copyfile(source / name, staging / name)
                with open(staging / name, "rb") as f:
                    os.fsync(f.fileno())
            fsync_dir(staging)
            installed = read_package(staging, verify=True)  # what landed, not just what we read
            os.replace(staging, target)
            fsync_dir(target.parent)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        log.info("model.installed", model=m.name, version=m.version, sha256=m.sha256, bytes=m.size)
        return ModelPackage(directory=target, manifest=installed.manifest)

    def names(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))

    def versions(self, name: str) -> list[int]:
        directory = self.root / name
        if not directory.is_dir():
            return []
        return sorted(int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit())

    def package(self, name: str, version: int, *, verify: bool = False) -> ModelPackage:
        directory = self.root / name / str(version)
        if not directory.is_dir():
            raise ModelNotFound(f"model {name} version {version} is not installed")
        return read_package(directory, verify=verify)

    def active(self, name: str) -> ActivePointer | None:
        try:
            data = json.loads((self.root / name / POINTER_FILE).read_text())
            return ActivePointer(int(data["version"]), None if data.get("previous") is None else int(data["previous"]))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            # Written atomically, so this is outside damage; say so rather than guess a version.
            raise PackageError(f"{self.root / name / POINTER_FILE} is damaged ({exc}); reinstall the model") from exc

    def set_active(self, name: str, version: int) -> ActivePointer:
        """Point `name` at `version`, remembering the version it replaces for rollback."""
        if version not in self.versions(name):
            raise ModelNotFound(f"model {name} version {version} is not installed")
        current = self.active(name)
        if current is None:
            previous = None
        elif current.version == version:
            previous = current.previous  # re-activation keeps the rollback target
        else:
            previous = current.version
        pointer = ActivePointer(version, previous)
        write_atomic(
            self.root / name / POINTER_FILE,
            json.dumps({"version": pointer.version, "previous": pointer.previous}).encode(),
        )
        return pointer

    def prune(self, name: str, keep: set[int]) -> list[int]:
        """Delete every installed version of `name` but `keep`, the active one and the rollback target; the
        versions deleted. A device that takes a new version every week must not fill its disk with old ones."""
        pointer = self.active(name)
        if pointer is None:
            return []  # nothing is active: nothing tells which versions are old
        kept = keep | {pointer.version} | ({pointer.previous} if pointer.previous is not None else set())
        removed = [v for v in self.versions(name) if v not in kept]
        for version in removed:
            shutil.rmtree(self.root / name / str(version), ignore_errors=True)
        if removed:
            fsync_dir(self.root / name)
            log.info("model.pruned", model=name, versions=removed, kept=sorted(kept))
        return removed

    def remove(self, name: str, version: int) -> None:
        """Delete an installed version; refused for the active one and the one a rollback would return to."""
        pointer = self.active(name)
        if pointer and version in (pointer.version, pointer.previous):
            raise PackageError(f"{name} version {version} is active or the rollback target; not removing it")
        shutil.rmtree(self.root / name / str(version), ignore_errors=False)
