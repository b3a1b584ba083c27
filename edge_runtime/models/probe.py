"""The decisions of `edge-agent package` as plain functions over plain data: is axis 0 a batch axis, which
inputs still need a representative size. No I/O: models/packaging.py runs the model and calls these.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from edge_runtime.inference.tensors import TensorSpec

__all__ = ["ATOL", "RTOL", "BatchVerdict", "ModelView", "batch_axis_blockers", "missing_sizes", "rows_follow"]

Array = np.ndarray[Any, Any]

# Batch 2 must reproduce the two batch-1 runs row for row, to within what a different kernel choice for
# another batch size changes in float results.
RTOL, ATOL = 1e-4, 1e-5


@dataclass(frozen=True)
class ModelView:
    """The model's inputs and outputs as ONNX Runtime sees them."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]  # tensors of a KServe datatype
    left_out: tuple[tuple[str, str], ...] = ()  # (name, type) of outputs edge-agent cannot serve
    unranked: frozenset[str] = frozenset()  # tensors whose rank the file does not declare


@dataclass(frozen=True)
class BatchVerdict:
    batched: bool
    reason: str


def batch_axis_blockers(view: ModelView) -> list[str]:
    """Why axis 0 cannot be a batch axis, judged from the declared shapes alone ([] when it may be)."""
    blockers: list[str] = []
    for kind, specs in (("input", view.inputs), ("output", view.outputs)):
        for spec in specs:
            if spec.name in view.unranked:
                continue  # judged from the runs
            if not spec.shape:
                blockers.append(f"{kind} {spec.name!r} is a scalar")
            elif spec.shape[0] != -1:
                blockers.append(f"{kind} {spec.name!r} has a fixed axis 0 of {spec.shape[0]}")
    return blockers


def rows_follow(one: Sequence[Mapping[str, Array]], two: Mapping[str, Array], names: Sequence[str]) -> str:
    """Whether a batch-2 run gave, row for row, the outputs of the two batch-1 runs `one`: "" when it did,
    else the first difference in words."""
    for name in names:
        a, b, both = one[0][name], one[1][name], two[name]
        if a.ndim == 0 or both.ndim == 0:
            return f"output {name!r} is a scalar"
        if a.shape[0] != 1 or b.shape[0] != 1 or both.shape[0] != 2:
            return (
                f"output {name!r} has axis 0 of {a.shape[0]} at batch 1 and {both.shape[0]} at batch 2: it does not "
                "follow the batch"
            )
        if both.shape[1:] != a.shape[1:] or both.shape[1:] != b.shape[1:]:
            return f"output {name!r} has rows of {list(both.shape[1:])} at batch 2 and {list(a.shape[1:])} at batch 1"
        for row, alone in ((0, a), (1, b)):
            got = both[row : row + 1]
            if got.dtype.kind in "fc":
                same = bool(np.allclose(got, alone, rtol=RTOL, atol=ATOL, equal_nan=True))
            else:
                same = bool(np.array_equal(got, alone))
            if not same:
                return f"row {row} of output {name!r} at batch 2 differs from the same input run alone"
    return ""


def missing_sizes(view: ModelView, given: set[str], batched: bool) -> list[str]:
    """Inputs whose variable axes (besides a batch axis) have no representative size, in words."""
    missing: list[str] = []
    for spec in view.inputs:
        if spec.name in given:
            continue
        if spec.name in view.unranked:
            missing.append(f"{spec.name!r} (its rank is not declared)")
            continue
        first = 1 if batched else 0
        axes = [first + i for i, d in enumerate(spec.shape[first:]) if d == -1]
        if axes:
            missing.append(f"{spec.name!r} axes {axes} of {list(spec.shape)}")
    return missing
