"""Generated inputs for warm-up and batch-size profiling (as Triton's model warmup uses random data)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from edge_runtime.inference.tensors import TensorSpec

__all__ = ["example_inputs"]


def example_inputs(specs: Sequence[TensorSpec], batch: int, seed: int = 0) -> dict[str, np.ndarray[Any, Any]]:
    """Inputs of the right dtypes: the batch axis set to `batch`, other variable dimensions to 1."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray[Any, Any]] = {}
    for spec in specs:
        shape = [batch if axis == 0 and dim == -1 else max(dim, 1) for axis, dim in enumerate(spec.shape)]
        if spec.dtype.kind == "f":
            out[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
        elif spec.dtype.kind == "b":
            out[spec.name] = np.zeros(shape, dtype=spec.dtype)
        else:
            out[spec.name] = rng.integers(0, 2, size=shape).astype(spec.dtype)
    return out
