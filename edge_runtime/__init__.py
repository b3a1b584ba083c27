"""edge_runtime: the device side of Edgefleet — inference serving, model store, outbox and sync.

The in-process inference API is `ModelRepository`; the agent process is `edge_runtime.agent`. Names are
imported on first use, so `edge-agent --help` does not pay for numpy and ONNX Runtime.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "AgentConfig": "edge_runtime.config",
    "load_config": "edge_runtime.config",
    "EdgeRuntimeError": "edge_runtime.errors",
    "InvalidInput": "edge_runtime.errors",
    "ModelNotFound": "edge_runtime.errors",
    "ModelNotReady": "edge_runtime.errors",
    "Overloaded": "edge_runtime.errors",
    "RequestTimeout": "edge_runtime.errors",
    "RequestTooLarge": "edge_runtime.errors",
    "ShuttingDown": "edge_runtime.errors",
    "InferRequest": "edge_runtime.inference.types",
    "InferResponse": "edge_runtime.inference.types",
    "ModelRepository": "edge_runtime.models.repository",
}

__all__ = [
    "AgentConfig",
    "EdgeRuntimeError",
    "InferRequest",
    "InferResponse",
    "InvalidInput",
    "ModelNotFound",
    "ModelNotReady",
    "ModelRepository",
    "Overloaded",
    "RequestTimeout",
    "RequestTooLarge",
    "ShuttingDown",
    "__version__",
    "load_config",
]

if TYPE_CHECKING:
    from edge_runtime.config import AgentConfig, load_config
    from edge_runtime.errors import (
        EdgeRuntimeError,
        InvalidInput,
        ModelNotFound,
        ModelNotReady,
        Overloaded,
        RequestTimeout,
        RequestTooLarge,
        ShuttingDown,
    )
    from edge_runtime.inference.types import InferRequest, InferResponse
    from edge_runtime.models.repository import ModelRepository


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'edge_runtime' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
