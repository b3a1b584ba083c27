"""edge_runtime: the device side of Edgefleet — inference serving, model store, and (later) sync.

The in-process inference API is `ModelRepository`; the agent process is `edge_runtime.agent`.
"""

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

__version__ = "0.1.0"

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
