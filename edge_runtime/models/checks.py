"""What a model version must pass before it may serve: its engine matches the manifest, and warm-up runs.

The same checks gate every path to ACTIVE: `edge-agent install` (on ONNX Runtime, before anything lands
in the store), the repository's activation and its fallback at start, and `edge-agent package` on what it
just wrote. Not for loading engines (engines/) or choosing warm-up inputs (warmup.py).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import structlog

from edge_runtime.engines.base import Engine
from edge_runtime.engines.onnxruntime import OnnxRuntimeEngine
from edge_runtime.errors import EngineError, PackageError
from edge_runtime.inference.tensors import TensorSpec
from edge_runtime.models.package import ModelManifest, ModelPackage
from edge_runtime.models.warmup import WarmupInputs

__all__ = ["CheckReport", "check_engine_matches", "check_outputs", "check_package", "warm_up"]

log = structlog.get_logger(__name__)


def _fits_engine(declared: TensorSpec, seen: TensorSpec) -> bool:
    # An empty shape from ONNX Runtime is a scalar or an undeclared rank: warm-up settles which.
    if not seen.shape:
        return True
    return len(seen.shape) == len(declared.shape) and all(
        r == -1 or r == s for r, s in zip(seen.shape, declared.shape, strict=True)
    )


def check_engine_matches(manifest: ModelManifest, engine: Engine) -> None:
    """The ONNX file has the inputs and the outputs its manifest promises; PackageError says how not.

    Inputs must be exactly the model's. Outputs may be a subset: only the declared ones are run, so a
    non-tensor output beside them (a ZipMap) is fine as long as the manifest leaves it out.
    """
    have = {t.name: t for t in engine.inputs}
    if set(have) != {t.name for t in manifest.inputs}:
        raise PackageError(
            f"{manifest.ref}: manifest inputs {sorted(t.name for t in manifest.inputs)} do not "
            f"match the model's {sorted(have)}"
        )
    outputs = {t.name: t for t in engine.outputs}
    for kind, promised, actual in (("input", manifest.inputs, have), ("output", manifest.outputs, outputs)):
        for spec in promised:
            real = actual.get(spec.name)
            if real is None:
                other = engine.unservable.get(spec.name)
                if other is not None:
                    raise PackageError(
                        f"{manifest.ref}: output {spec.name!r} is {other} in the model, not a tensor; "
                        "edge-agent serves tensors only: leave it out of the manifest"
                    )
                raise PackageError(
                    f"{manifest.ref}: manifest output {spec.name!r} is not an output of the model "
                    f"(its outputs: {sorted([*outputs, *engine.unservable])})"
                )
            if real.datatype != spec.datatype or not _fits_engine(spec, real):
                raise PackageError(
                    f"{manifest.ref}: {kind} {spec.name!r} is {real.datatype}{list(real.shape)} "
                    f"in the model, {spec.datatype}{list(spec.shape)} in the manifest"
                )


def check_outputs(
    manifest: ModelManifest, outputs: Mapping[str, np.ndarray[Any, Any]], rows: int, what: str = "warm-up"
) -> None:
    """A run's outputs are what the manifest declares: dtype, rank, fixed sizes and (batched) `rows` first."""
    for spec in manifest.outputs:
        out = outputs.get(spec.name)
        if out is None or out.dtype != spec.dtype:
            got = "nothing" if out is None else str(out.dtype)
            raise EngineError(f"{manifest.ref}: {what} produced {got} for {spec.datatype} output {spec.name!r}")
        shape = tuple(int(d) for d in out.shape)
        fits = len(shape) == len(spec.shape) and all(w == -1 or w == d for d, w in zip(shape, spec.shape, strict=True))
        if not fits:
            raise EngineError(
                f"{manifest.ref}: {what} output {spec.name!r} has shape {list(shape)}, "
                f"the manifest declares {list(spec.shape)}"
            )
        if manifest.batched and shape[0] != rows:
            raise EngineError(
                f"{manifest.ref}: {what} output {spec.name!r} has shape {list(shape)} for a batch of {rows}: "
                "its axis 0 does not follow the batch (package it with max_batch_size 0)"
            )


def warm_up(manifest: ModelManifest, engine: Engine, inputs: WarmupInputs, runs: int) -> None:
    """Run `runs` warm-up inferences and check their outputs; EngineError says which failed and why."""
    for i in range(runs):
        feed = inputs.at(1, seed=i)
        try:
            outputs = engine.run(feed)
        except EngineError as exc:
            shapes = {name: list(a.shape) for name, a in feed.items()}
            hint = ""
            if inputs.guessed:
                hint = (
                    f"; the sizes of {', '.join(inputs.guessed)} were guessed (1) because the package has "
                    "no warm-up data: package the model with --warmup-inputs or --shape"
                )
            raise EngineError(
                f"{manifest.ref}: warm-up failed on inputs {shapes} ({inputs.source}): {exc}{hint}"
            ) from exc
        check_outputs(manifest, outputs, rows=1)


@dataclass(frozen=True)
class CheckReport:
    """What a passed check saw."""

    ref: str
    warmup_source: str
    guessed: tuple[str, ...]
    seconds: float


def check_package(package: ModelPackage, *, runs: int, intra_op_threads: int = 0) -> CheckReport:
    """Load the package on ONNX Runtime (CPU), match it against its manifest and warm it up; then unload.

    Raises PackageError (the package is wrong: nothing of it may serve) or EngineError (the model does not
    run) with the reason.
    """
    started = time.monotonic()
    m = package.manifest
    inputs = WarmupInputs.of(package)
    engine = OnnxRuntimeEngine.load(
        package.model_file(), intra_op_threads=intra_op_threads, providers=["CPUExecutionProvider"]
    )
    try:
        check_engine_matches(m, engine)
        warm_up(m, engine, inputs, runs)
    finally:
        engine.close()
    return CheckReport(m.ref, inputs.source, inputs.guessed, time.monotonic() - started)
