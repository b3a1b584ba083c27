"""ONNX Runtime backend: the best execution provider present (TensorRT EP, CUDA EP, CPU), tuned for latency.

The CPU path is the one every test here runs. Not for engine selection or fallback: see engines/__init__.py.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import structlog

from edge_runtime.engines.base import EngineInfo
from edge_runtime.errors import EngineError, PackageError
from edge_runtime.inference.tensors import TensorSpec
from edge_runtime.models.package import ModelPackage

__all__ = ["OnnxRuntimeEngine", "pick_providers"]

log = structlog.get_logger(__name__)

# Preference order; the first ones present win.
PREFERRED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")

_ORT_TYPES = {
    "tensor(float)": "FP32",
    "tensor(float16)": "FP16",
    "tensor(double)": "FP64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(bool)": "BOOL",
}


def pick_providers(available: list[str], cache_dir: Path | None) -> list[str | tuple[str, dict[str, Any]]]:
    """The providers to ask for, best first; the TensorRT EP gets an engine cache beside ours."""
    chosen: list[str | tuple[str, dict[str, Any]]] = []
    for name in PREFERRED_PROVIDERS:
        if name not in available:
            continue
        if name == "TensorrtExecutionProvider" and cache_dir is not None:
            chosen.append(
                (
                    name,
                    {
                        "trt_engine_cache_enable": True,
                        "trt_engine_cache_path": str(cache_dir),
                        "trt_timing_cache_enable": True,
                    },
                )
            )
        else:
            chosen.append(name)
    return chosen or ["CPUExecutionProvider"]


def _spec(arg: Any) -> TensorSpec:
    try:
        datatype = _ORT_TYPES[arg.type]
    except KeyError:
        raise PackageError(f"tensor {arg.name!r} has type {arg.type}, which edge-agent does not serve") from None
    shape = tuple(d if isinstance(d, int) and d > 0 else -1 for d in arg.shape)
    return TensorSpec(name=arg.name, datatype=datatype, shape=shape)


class OnnxRuntimeEngine:
    """One ONNX Runtime session; `run` is thread-safe (ONNX Runtime allows concurrent Run calls)."""

    def __init__(self, session: ort.InferenceSession, info: EngineInfo) -> None:
        self._session = session
        self._info = info
        self._inputs = tuple(_spec(a) for a in session.get_inputs())
        self._outputs = tuple(_spec(a) for a in session.get_outputs())
        self._output_names = [o.name for o in self._outputs]
        self._release = ort.RunOptions()
        # Large profiling batches grow the CPU arena; shrinking after such a run gives that memory back.
        self._release.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")

    @classmethod
    def load(
        cls,
        package: ModelPackage,
        *,
        intra_op_threads: int = 0,
        cache_dir: Path | None = None,
        providers: list[str] | None = None,
        fallback_reason: str = "",
    ) -> OnnxRuntimeEngine:
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
        # One request at a time per Run: parallel operator execution only adds scheduling overhead for
        # the chain-shaped networks served at the edge; parallelism comes from intra-op threads and instances.
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        requested = pick_providers(providers or ort.get_available_providers(), cache_dir)
        try:
            session = ort.InferenceSession(str(package.model_path), sess_options=options, providers=requested)
        except Exception as exc:  # onnxruntime raises its own unexported exception types
            raise EngineError(f"{package.manifest.ref}: onnxruntime cannot load the model: {exc}") from exc
        active = session.get_providers()[0]
        info = EngineInfo(
            backend="onnxruntime", detail=active, platform="onnxruntime_onnx", fallback_reason=fallback_reason
        )
        log.info(
            "engine.loaded",
            model=package.manifest.name,
            version=package.manifest.version,
            backend=info.description,
            threads=intra_op_threads,
        )
        return cls(session, info)

    @property
    def info(self) -> EngineInfo:
        return self._info

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return self._inputs

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return self._outputs

    def run(
        self, inputs: Mapping[str, np.ndarray[Any, Any]], *, release_memory: bool = False
    ) -> dict[str, np.ndarray[Any, Any]]:
        try:
            results = self._session.run(self._output_names, inputs, self._release if release_memory else None)
        except Exception as exc:
            raise EngineError(f"onnxruntime failed to run the model: {exc}") from exc
        return dict(zip(self._output_names, results, strict=True))

    def close(self) -> None:
        # Dropping the last reference frees the session; keep the object usable for `info` afterwards.
        self._session = None
