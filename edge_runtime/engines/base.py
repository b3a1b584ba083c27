"""The engine interface every backend implements: load a model package, run batches, describe itself.

Not for batching, validation or warm-up: an engine runs exactly the arrays it is given (batcher and
model repository do the rest).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from edge_runtime.inference.tensors import TensorSpec

__all__ = ["Engine", "EngineInfo"]


@dataclass(frozen=True)
class EngineInfo:
    """What serves a model, for logs, the reported state and ModelMetadata."""

    backend: str  # "onnxruntime" | "tensorrt"
    detail: str  # e.g. "CPUExecutionProvider" or "TensorRT 10.3.0 on Orin sm_87"
    # KServe/Triton platform name for ModelMetadata.
    platform: str
    # Why this is not the backend that was asked for ("" when it is).
    fallback_reason: str = ""

    @property
    def description(self) -> str:
        return f"{self.backend}/{self.detail}"


class Engine(Protocol):
    """A loaded model that runs batches; `run` is safe to call from several threads at once."""

    @property
    def info(self) -> EngineInfo: ...

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        """The model's inputs as the engine sees them (-1 for dynamic dimensions)."""
        ...

    @property
    def outputs(self) -> tuple[TensorSpec, ...]: ...

    def run(
        self, inputs: Mapping[str, np.ndarray[Any, Any]], *, release_memory: bool = False
    ) -> dict[str, np.ndarray[Any, Any]]:
        """Run one batch and return every output by name.

        `release_memory` asks the engine to give back scratch memory after the run (used by the batch-size
        profiler, whose large trial batches would otherwise stay resident).
        """
        ...

    def close(self) -> None:
        """Free the engine's resources; no `run` may follow."""
        ...


def output_names(specs: Sequence[TensorSpec]) -> list[str]:
    return [s.name for s in specs]
