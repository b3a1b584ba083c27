"""Engines: one interface (base.Engine), two backends (TensorRT, ONNX Runtime), and the choice between them.

`load_engine` tries the backend the config asks for and falls back to ONNX Runtime when TensorRT is absent
or fails, recording why in `EngineInfo.fallback_reason` so the model's reported state says so.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import structlog

from edge_runtime.config import EngineSection
from edge_runtime.engines.base import Engine, EngineInfo, ModelFile
from edge_runtime.errors import EngineError

__all__ = ["Engine", "EngineInfo", "ModelFile", "backend_plan", "load_engine"]

log = structlog.get_logger(__name__)


def backend_plan(requested: str, tensorrt_ok: bool, tensorrt_why: str) -> tuple[list[str], str]:
    """Backends to try in order, and the reason TensorRT is skipped when it was asked for by name."""
    if requested == "onnxruntime":
        return ["onnxruntime"], ""
    if tensorrt_ok:
        return ["tensorrt", "onnxruntime"], ""
    return ["onnxruntime"], (f"tensorrt unavailable ({tensorrt_why})" if requested == "tensorrt" else "")


def load_engine(
    model: ModelFile,
    config: EngineSection,
    cache_dir: Path,
    *,
    max_batch_size: int,
    instances: int,
    progress: Callable[[str, float], None] | None = None,
) -> Engine:
    """Load `model` on the best backend the config allows; EngineError only when none can load it."""
    ok, why = False, "not requested"
    if config.backend != "onnxruntime":
        from edge_runtime.engines import tensorrt

        ok, why = tensorrt.tensorrt_available()
    plan, fallback_reason = backend_plan(config.backend, ok, why)
    if plan[0] == "tensorrt":
        try:
            return tensorrt.TensorRTEngine.load(
                model,
                config,
                cache_dir / "tensorrt",
                max_batch_size=max_batch_size,
                instances=instances,
                progress=progress,
            )
        except EngineError as exc:
            fallback_reason = f"tensorrt failed: {exc}"
            log.warning("engine.fallback", model=model.ref, reason=fallback_reason, to="onnxruntime")
    from edge_runtime.engines.onnxruntime import OnnxRuntimeEngine

    return OnnxRuntimeEngine.load(
        model,
        intra_op_threads=config.intra_op_threads,
        cache_dir=cache_dir / "onnxruntime-trt",
        fallback_reason=fallback_reason,
    )
