"""Generated inputs for warm-up and batch-size profiling (as Triton's model warmup uses random data).

Generated data is the fallback: a package that carries representative inputs or shapes is warmed up and
profiled on those (models/warmup.py decides which).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from edge_runtime.inference.tensors import TensorSpec

__all__ = ["example_inputs", "example_shape"]


def example_shape(spec: TensorSpec, batch: int, batched: bool, shape: Sequence[int] | None = None) -> tuple[int, ...]:
    """The shape to generate for `spec`: `shape` (a representative one) or the spec with variable axes at 1;
    a batched model's axis 0 set to `batch`."""
    dims = list(shape) if shape is not None else [max(d, 1) for d in spec.shape]
    if batched and dims:
        dims[0] = batch
    return tuple(dims)


def example_inputs(
    specs: Sequence[TensorSpec],
    batch: int,
    seed: int = 0,
    *,
    shapes: Mapping[str, Sequence[int]] | None = None,
    batched: bool = True,
) -> dict[str, np.ndarray[Any, Any]]:
    """Random inputs of the right dtypes: axis 0 at `batch` (batched models), other variable dimensions at
    their `shapes` entry, or 1 where there is none. Integers are 0 or 1 (valid ids, masks and flags)."""
    rng = np.random.default_rng(seed)
    given = shapes or {}
    out: dict[str, np.ndarray[Any, Any]] = {}
    for spec in specs:
        batch_axis = batched and bool(spec.shape) and spec.shape[0] == -1
        shape = example_shape(spec, batch, batch_axis, given.get(spec.name))
        if spec.dtype.kind == "f":
            out[spec.name] = np.asarray(rng.standard_normal(shape), dtype=spec.dtype)
        elif spec.dtype.kind == "b":
            out[spec.name] = np.zeros(shape, dtype=spec.dtype)
        else:
            out[spec.name] = np.asarray(rng.integers(0, 2, size=shape), dtype=spec.dtype)
    return out
