"""The Open Inference Protocol (KServe v2) over gRPC: codec, status mapping, servicer, server and client.

Clients written for Triton or KServe talk to edge-agent unchanged. Importing this package loads the
`inference` protobuf descriptors; an app that also imports tritonclient in the same process gets duplicate
descriptor errors, so apps use either this client or tritonclient (or the in-process API), not both.
`KServeClient` and `InferenceServer` are imported on first use (the codec alone needs no grpc).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = ["InferenceServer", "KServeClient"]

if TYPE_CHECKING:
    from edge_runtime.kserve.client import KServeClient
    from edge_runtime.kserve.server import InferenceServer

_EXPORTS = {"KServeClient": "edge_runtime.kserve.client", "InferenceServer": "edge_runtime.kserve.server"}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'edge_runtime.kserve' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
