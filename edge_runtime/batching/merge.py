"""Merging requests into one batch and splitting the batch's outputs back, as pure functions over arrays.

Only for models whose axis 0 is a batch axis (the manifest's max_batch_size > 0): a model whose axis 0 is
time is never merged, because the batcher's plan for it is one request per batch. Not for deciding which
requests share a batch: see batcher.py (same group = same non-batch dimensions).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from edge_runtime.errors import EngineError

__all__ = ["check_rows", "merge_inputs", "split_outputs"]

Array = np.ndarray[Any, Any]


def merge_inputs(requests: Sequence[Mapping[str, Array]], names: Sequence[str]) -> dict[str, Array]:
    """Each input of every request, concatenated on axis 0 in request order."""
    if len(requests) == 1:
        return {n: requests[0][n] for n in names}
    return {n: np.concatenate([r[n] for r in requests]) for n in names}


def check_rows(outputs: Mapping[str, Array], total: int, names: Sequence[str]) -> None:
    """Every output in `names` holds exactly `total` rows on axis 0; EngineError says which does not.

    An output whose axis 0 does not follow the batch means the model's axis 0 is not a batch axis, and
    slicing it would hand one caller another caller's rows.
    """
    for name in names:
        array = outputs.get(name)
        if array is None:
            raise EngineError(f"the engine returned no output {name!r}")
        if array.ndim == 0 or array.shape[0] != total:
            raise EngineError(
                f"output {name!r} has shape {list(array.shape)} for a batch of {total} rows: its axis 0 does not "
                "follow the batch, so this model must be packaged with max_batch_size 0"
            )


def split_outputs(outputs: Mapping[str, Array], rows: Sequence[int], names: Sequence[str]) -> list[dict[str, Array]]:
    """Outputs `names` cut back into one dict per request, `rows[i]` rows each, in request order
    (EngineError as check_rows)."""
    check_rows(outputs, sum(rows), names)
    if len(rows) == 1:
        return [{n: outputs[n] for n in names}]
    split: list[dict[str, Array]] = []
    start = 0
    for count in rows:
        end = start + count
        split.append({n: outputs[n][start:end] for n in names})
        start = end
    return split
