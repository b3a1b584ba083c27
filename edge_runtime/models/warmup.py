"""Warm-up inputs: a package's sample inputs or representative shapes, and inputs at any batch size from them.

Warm-up and batch profiling run on what the package carries (warmup.npz, or shapes in the manifest). A model
with variable non-batch axes and neither is warmed up with those axes at 1 and is not profiled, and its
status says so (`WarmupInputs.guessed`): a guess must never plan batching. Not for checking outputs: see
models/checks.py.
"""

from __future__ import annotations

import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.errors import PackageError
from edge_runtime.inference.synthetic import example_inputs
from edge_runtime.inference.tensors import TensorSpec
from edge_runtime.models.package import WARMUP_FILE, ModelManifest, ModelPackage, shape_fits

__all__ = ["MAX_WARMUP_BYTES", "WarmupInputs", "check_samples", "load_npz", "read_samples"]

Array = np.ndarray[Any, Any]

# Warm-up data is one request: it may be as large as a request, and no larger than this (checked on the
# archive's directory before anything is decompressed, so a zip bomb is refused unread).
MAX_WARMUP_BYTES = 256 << 20


def check_samples(
    specs: tuple[TensorSpec, ...], arrays: Mapping[str, Array], *, batched: bool, where: str = WARMUP_FILE
) -> None:
    """The arrays are one valid request for these inputs: names, dtypes, shapes and (batched) equal rows."""
    names = {s.name for s in specs}
    unknown = sorted(set(arrays) - names)
    if unknown:
        raise PackageError(f"{where}: {unknown[0]!r} is not an input of the model (inputs: {sorted(names)})")
    missing = sorted(names - set(arrays))
    if missing:
        raise PackageError(f"{where}: input {missing[0]!r} is missing (inputs: {sorted(names)})")
    rows: set[int] = set()
    for spec in specs:
        array = arrays[spec.name]
        if array.dtype != spec.dtype:
            raise PackageError(
                f"{where}: {spec.name!r} is {array.dtype}, the model takes {spec.datatype} ({spec.dtype}); "
                f"convert it with .astype(numpy.{spec.dtype})"
            )
        if not shape_fits(tuple(array.shape), spec):
            raise PackageError(
                f"{where}: {spec.name!r} has shape {list(array.shape)}, which does not fit the model's "
                f"{list(spec.shape)} (-1: any size)"
            )
        if batched:
            rows.add(int(array.shape[0]))
    if len(rows) > 1:
        raise PackageError(f"{where}: the arrays disagree on the batch size (axis 0: {sorted(rows)})")


def load_npz(path: Path, where: str = "") -> dict[str, Array]:
    """The arrays of an .npz file, refusing pickles and archives that unpack past MAX_WARMUP_BYTES."""
    where = where or str(path)
    try:
        with zipfile.ZipFile(path) as archive:
            total = sum(info.file_size for info in archive.infolist())
    except (OSError, zipfile.BadZipFile) as exc:
        raise PackageError(f"{where} is not a readable .npz archive ({exc})") from exc
    if total > MAX_WARMUP_BYTES:
        raise PackageError(f"{where} unpacks to {total} bytes; warm-up inputs may take at most {MAX_WARMUP_BYTES}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {name: npz[name] for name in npz.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:  # ValueError: object arrays (pickles)
        raise PackageError(f"cannot read {where}: {exc}") from exc


def read_samples(path: Path, manifest: ModelManifest) -> dict[str, Array]:
    """Read warmup.npz and check it against the manifest; PackageError says what is wrong."""
    arrays = load_npz(path, f"{manifest.ref}: {path.name}")
    check_samples(manifest.inputs, arrays, batched=manifest.batched, where=f"{manifest.ref}: {path.name}")
    shapes = manifest.warmup.shapes if manifest.warmup is not None else {}
    for name, array in arrays.items():
        if tuple(array.shape) != shapes.get(name):
            raise PackageError(
                f"{manifest.ref}: {path.name}: {name!r} has shape {list(array.shape)}, the manifest records "
                f"{list(shapes.get(name, ()))}"
            )
    return {name: np.require(array, requirements="C") for name, array in arrays.items()}  # keeps 0-d as 0-d


class WarmupInputs:
    """Inputs for warm-up and profiling: the package's samples, its representative shapes, or a guess."""

    def __init__(self, manifest: ModelManifest, samples: Mapping[str, Array] | None = None) -> None:
        self._inputs = manifest.inputs
        self._batched = manifest.batched
        self._samples = dict(samples) if samples is not None else None
        self._shapes = dict(manifest.warmup.shapes) if manifest.warmup is not None else {}
        first = 1 if self._batched else 0
        # Inputs whose variable non-batch axes have no representative size: warm-up sets them to 1.
        self.guessed: tuple[str, ...] = ()
        if self._samples is None:
            self.guessed = tuple(
                f"{s.name!r} axes {[first + i for i, d in enumerate(s.shape[first:]) if d == -1]}"
                for s in self._inputs
                if s.name not in self._shapes and -1 in s.shape[first:]
            )

    @classmethod
    def of(cls, package: ModelPackage) -> WarmupInputs:
        path = package.warmup_path
        samples = read_samples(path, package.manifest) if path is not None else None
        return cls(package.manifest, samples)

    @property
    def source(self) -> str:
        """Where the inputs come from, for logs and status."""
        if self._samples is not None:
            return WARMUP_FILE
        if self.guessed:
            return "generated, variable axes at 1 (no warm-up data in the package)"
        return "generated at the package's shapes" if self._shapes else "generated"

    @property
    def representative(self) -> bool:
        """Whether profiling may trust these inputs: nothing about their sizes was guessed."""
        return not self.guessed

    def at(self, batch: int, seed: int = 0) -> dict[str, Array]:
        """One request's inputs: `batch` rows for a batched model (sample rows repeated as needed)."""
        if self._samples is None:
            return example_inputs(self._inputs, batch, seed, shapes=self._shapes, batched=self._batched)
        if not self._batched:
            return dict(self._samples)
        return {name: _rows(array, batch) for name, array in self._samples.items()}


def _rows(array: Array, batch: int) -> Array:
    if array.shape[0] == batch:
        return array
    return np.ascontiguousarray(np.take(array, np.arange(batch) % array.shape[0], axis=0))
