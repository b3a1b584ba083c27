"""The engine interface every backend implements: load an ONNX file, run batches, describe itself.

Engines know a model file and the tensors it is to serve (`ModelFile`), not the package format: models/
builds a ModelFile from a package, so engines never import models/. Not for batching, validation or
warm-up: an engine runs exactly the arrays it is given (batcher and model repository do the rest).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from edge_runtime.inference.tensors import TensorSpec

__all__ = ["Engine", "EngineInfo", "ModelFile"]


@dataclass(frozen=True)
class ModelFile:
    """What an engine loads: an ONNX file and the tensors it is to serve (from the package's manifest)."""

    path: Path
    ref: str  # "name:version", for messages and logs
    sha256: str  # of the ONNX file: part of the TensorRT engine cache key
    inputs: tuple[TensorSpec, ...]
    # The outputs to run; () runs every tensor output the file has. A file's other outputs (a ZipMap
    # beside a tensor label) are never computed for a caller.
    outputs: tuple[TensorSpec, ...] = ()
    # 0: the model has no batch axis; otherwise axis 0 of every tensor is the batch.
    max_batch_size: int = 0


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
        """The model's inputs as the engine sees them: -1 for a variable dimension; an empty shape is a
        scalar or, for ONNX Runtime, a tensor whose rank the file does not declare (warm-up tells which)."""
        ...

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        """Every tensor output of the model, declared or not (shapes as for `inputs`)."""
        ...

    @property
    def unservable(self) -> Mapping[str, str]:
        """Outputs that are not tensors of a KServe datatype (a ZipMap's sequence of maps): name -> type."""
        ...

    def run(
        self, inputs: Mapping[str, np.ndarray[Any, Any]], *, release_memory: bool = False
    ) -> dict[str, np.ndarray[Any, Any]]:
        """Run one batch; return the outputs the engine was loaded to serve (`ModelFile.outputs`) by name.

        `release_memory` asks the engine to give back scratch memory after the run (used by the batch-size
        profiler, whose large trial batches would otherwise stay resident).
        """
        ...

    def close(self) -> None:
        """Free the engine's resources; no `run` may follow."""
        ...
