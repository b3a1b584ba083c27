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

from edge_runtime.engines.base import EngineInfo, ModelFile
from edge_runtime.errors import EngineError, PackageError
from edge_runtime.inference.tensors import TensorSpec

__all__ = ["ORT_TYPES", "OnnxRuntimeEngine", "open_session", "pick_providers", "tensor_spec"]

log = structlog.get_logger(__name__)

# Preference order; the first ones present win.
PREFERRED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")

# ONNX Runtime's type names of the tensors edge-agent serves -> KServe datatypes.
ORT_TYPES = {
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


def tensor_spec(arg: Any) -> TensorSpec | None:
    """ONNX Runtime's view of one input or output as a TensorSpec (-1 for symbolic or unknown dimensions);
    None when it is not a tensor of a KServe datatype (a sequence, a map, a string tensor)."""
    datatype = ORT_TYPES.get(arg.type)
    if datatype is None:
        return None
    shape = tuple(d if isinstance(d, int) and d > 0 else -1 for d in (arg.shape or ()))
    return TensorSpec(name=arg.name, datatype=datatype, shape=shape)


def open_session(
    source: Path | bytes,
    *,
    intra_op_threads: int = 0,
    providers: list[str | tuple[str, dict[str, Any]]] | None = None,
) -> ort.InferenceSession:
    """An InferenceSession with the options every edge-agent session uses; EngineError when it cannot load."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = 1
    # One request at a time per Run: parallel operator execution only adds scheduling overhead for
    # the chain-shaped networks served at the edge; parallelism comes from intra-op threads and instances.
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Fatal only: a failed Run is raised to us as an exception, and ONNX Runtime would also print it.
    options.log_severity_level = 4
    try:
        return ort.InferenceSession(
            source if isinstance(source, bytes) else str(source),
            sess_options=options,
            providers=providers or ["CPUExecutionProvider"],
        )
    except Exception as exc:  # onnxruntime raises its own unexported exception types
        raise EngineError(f"onnxruntime cannot load the model: {exc}") from exc


class OnnxRuntimeEngine:
    """One ONNX Runtime session; `run` is thread-safe (ONNX Runtime allows concurrent Run calls)."""

    def __init__(self, session: ort.InferenceSession, info: EngineInfo, outputs: tuple[TensorSpec, ...] = ()) -> None:
        self._session = session
        self._info = info
        inputs = session.get_inputs()
        strange = [f"{a.name!r} ({a.type})" for a in inputs if tensor_spec(a) is None]
        if strange:
            raise PackageError(
                f"input {', '.join(strange)} is not a tensor of a datatype edge-agent serves "
                f"({', '.join(sorted(ORT_TYPES))})"
            )
        self._inputs = tuple(s for s in map(tensor_spec, inputs) if s is not None)
        specs = [(a, tensor_spec(a)) for a in session.get_outputs()]
        self._outputs = tuple(s for _, s in specs if s is not None)
        self._unservable = {a.name: str(a.type) for a, s in specs if s is None}
        # Only the declared outputs are fetched: ONNX Runtime then returns nothing else (a ZipMap's
        # sequence of maps beside a tensor label would not convert to a tensor).
        self._output_names = [o.name for o in outputs] or [o.name for o in self._outputs]
        self._release = ort.RunOptions()
        # Large profiling batches grow the CPU arena; shrinking after such a run gives that memory back.
        self._release.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")

    @classmethod
    def load(
        cls,
        model: ModelFile,
        *,
        intra_op_threads: int = 0,
        cache_dir: Path | None = None,
        providers: list[str] | None = None,
        fallback_reason: str = "",
    ) -> OnnxRuntimeEngine:
        requested = pick_providers(providers or ort.get_available_providers(), cache_dir)
        try:
            session = open_session(model.path, intra_op_threads=intra_op_threads, providers=requested)
        except EngineError as exc:
            raise EngineError(f"{model.ref}: {exc}") from exc.__cause__
        active = session.get_providers()[0]
        info = EngineInfo(
            backend="onnxruntime", detail=active, platform="onnxruntime_onnx", fallback_reason=fallback_reason
        )
        log.info("engine.loaded", model=model.ref, backend=info.description, threads=intra_op_threads)
        try:
            return cls(session, info, model.outputs)
        except PackageError as exc:
            raise PackageError(f"{model.ref}: {exc}") from None

    @property
    def info(self) -> EngineInfo:
        return self._info

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return self._inputs

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return self._outputs

    @property
    def unservable(self) -> Mapping[str, str]:
        return self._unservable

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
