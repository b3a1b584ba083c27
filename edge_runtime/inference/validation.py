"""Full validation of a request against a model's signature, before it may join a batch.

A bad request gets its own InvalidInput naming the tensor and what is wrong, and never fails the good
requests it would have been batched with (the MLServer adaptive-batching fault DESIGN.md cites).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np

from edge_runtime.errors import InvalidInput, RequestTooLarge
from edge_runtime.inference.tensors import TensorSpec

__all__ = ["Signature", "check_shape"]

MAX_RANK = 16


def check_shape(name: str, shape: Sequence[int], spec: TensorSpec, batched: bool, max_batch: int) -> None:
    """Check one input's shape against its spec; InvalidInput says which dimension is wrong."""
    if len(shape) != len(spec.shape):
        raise InvalidInput(
            f"input {name!r} has shape {list(shape)}, the model expects rank {len(spec.shape)}: {_show(spec)}"
        )
    for axis, (got, want) in enumerate(zip(shape, spec.shape, strict=True)):
        if want == -1:
            if got < 1:
                raise InvalidInput(f"input {name!r} has size {got} on axis {axis}; sizes must be at least 1")
        elif got != want:
            raise InvalidInput(f"input {name!r} has shape {list(shape)}, the model expects {_show(spec)} (axis {axis})")
    if batched and shape[0] > max_batch:
        raise InvalidInput(
            f"input {name!r} carries a batch of {shape[0]}; this model takes at most {max_batch} per request"
        )


def _show(spec: TensorSpec) -> str:
    return "[" + ", ".join("N" if d == -1 else str(d) for d in spec.shape) + "]"


class Signature:
    """A model version's inputs and outputs, and the checks every request passes."""

    def __init__(
        self, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec], max_batch_size: int, max_bytes: int
    ) -> None:
        self.inputs = tuple(inputs)
        self.outputs = tuple(outputs)
        self.max_batch_size = max_batch_size
        self.max_bytes = max_bytes
        self._by_name = {s.name: s for s in self.inputs}
        self._names = frozenset(self._by_name)
        self._output_names = frozenset(s.name for s in self.outputs)
        # Per input, the exact non-batch dimensions when none is variable: the common case is then one
        # tuple comparison (the full check only runs to explain a mismatch).
        self._fixed_inner = {
            s.name: s.shape[1:] if max_batch_size > 0 and -1 not in s.shape[1:] else None for s in self.inputs
        }
        # Requests may share a batch only if their non-batch dimensions match; with none dynamic they always do.
        self._dynamic_inner = any(-1 in s.shape[1:] for s in self.inputs) or max_batch_size == 0

    @property
    def batched(self) -> bool:
        return self.max_batch_size > 0

    @property
    def fixed_inner(self) -> bool:
        """Every input's non-batch dimensions are fixed (so a batch's cost follows its size alone)."""
        return not self._dynamic_inner

    def validate(
        self, inputs: Mapping[str, Any], outputs: Sequence[str] | None
    ) -> tuple[dict[str, np.ndarray[Any, Any]], int, Hashable]:
        """The inputs as C-contiguous arrays, the request's rows, and its batching group."""
        if not isinstance(inputs, Mapping):
            raise InvalidInput("inputs must map input names to arrays")
        if inputs.keys() != self._names:
            unknown = [n for n in inputs if n not in self._by_name]
            if unknown:
                raise InvalidInput(f"unknown input {unknown[0]!r}; the model's inputs are {sorted(self._by_name)}")
            missing = [n for n in self._by_name if n not in inputs]
            raise InvalidInput(f"missing input {missing[0]!r}; the model's inputs are {sorted(self._by_name)}")
        arrays: dict[str, np.ndarray[Any, Any]] = {}
        total = 0
        rows = -1
        for spec in self.inputs:
            value = inputs[spec.name]
            if not isinstance(value, np.ndarray):
                raise InvalidInput(f"input {spec.name!r} must be a numpy array, not {type(value).__name__}")
            if value.dtype != spec.dtype:
                raise InvalidInput(
                    f"input {spec.name!r} is {value.dtype}, the model takes {spec.datatype} "
                    f"({spec.dtype}): convert it with .astype(numpy.{spec.dtype})"
                )
            total += value.nbytes
            if total > self.max_bytes:
                raise RequestTooLarge(
                    f"request is larger than the limit of {self.max_bytes} bytes (server.max_request_bytes)"
                )
            shape = value.shape
            inner = self._fixed_inner[spec.name]
            if (
                inner is None
                or len(shape) != len(spec.shape)
                or shape[1:] != inner
                or not 0 < shape[0] <= self.max_batch_size
            ):
                check_shape(spec.name, shape, spec, self.batched, self.max_batch_size)
            if self.batched:
                if rows not in (-1, value.shape[0]):
                    raise InvalidInput(f"input {spec.name!r} has batch size {value.shape[0]}, other inputs have {rows}")
                rows = value.shape[0]
            arrays[spec.name] = value if value.flags.c_contiguous else np.ascontiguousarray(value)
        if outputs is not None:
            for name in outputs:
                if name not in self._output_names:
                    raise InvalidInput(f"unknown output {name!r}; the model's outputs are {sorted(self._output_names)}")
        group: Hashable = tuple(a.shape[1:] for a in arrays.values()) if self._dynamic_inner else None
        return arrays, max(rows, 1), group


def element_count(shape: Sequence[int]) -> int:
    return math.prod(shape)
