"""The one mapping from edge_runtime errors to gRPC status codes, used by every servicer."""

from __future__ import annotations

import grpc

from edge_runtime.errors import (
    ArtifactRefused,
    ConfigError,
    DownloadFailed,
    EdgeRuntimeError,
    EngineError,
    InvalidInput,
    ModelNotFound,
    ModelNotReady,
    OutboxUnusable,
    Overloaded,
    PackageError,
    RegionExists,
    RegionNotFound,
    RequestTimeout,
    RequestTooLarge,
    ShuttingDown,
    StepTimeout,
    VerificationFailed,
)

__all__ = ["STATUS_CODES", "status_for"]

STATUS_CODES: dict[type[EdgeRuntimeError], grpc.StatusCode] = {
    InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    # Triton's codes for the shared-memory registry (kserve/shm.py).
    RegionNotFound: grpc.StatusCode.NOT_FOUND,
    RegionExists: grpc.StatusCode.ALREADY_EXISTS,
    ConfigError: grpc.StatusCode.INVALID_ARGUMENT,
    RequestTooLarge: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ModelNotFound: grpc.StatusCode.NOT_FOUND,
    ModelNotReady: grpc.StatusCode.UNAVAILABLE,
    ShuttingDown: grpc.StatusCode.UNAVAILABLE,
    RequestTimeout: grpc.StatusCode.DEADLINE_EXCEEDED,
    PackageError: grpc.StatusCode.FAILED_PRECONDITION,
    VerificationFailed: grpc.StatusCode.FAILED_PRECONDITION,
    # The control plane's own: they reach no app's call, but each has its status should one ever surface.
    ArtifactRefused: grpc.StatusCode.FAILED_PRECONDITION,
    DownloadFailed: grpc.StatusCode.UNAVAILABLE,
    StepTimeout: grpc.StatusCode.DEADLINE_EXCEEDED,
    OutboxUnusable: grpc.StatusCode.FAILED_PRECONDITION,
    EngineError: grpc.StatusCode.INTERNAL,
    EdgeRuntimeError: grpc.StatusCode.INTERNAL,
}


def status_for(exc: EdgeRuntimeError) -> grpc.StatusCode:
    """The status of the most specific mapped class of `exc`."""
    for cls in type(exc).__mro__:
        code = STATUS_CODES.get(cls)
        if code is not None:
            return code
    return grpc.StatusCode.INTERNAL  # pragma: no cover - EdgeRuntimeError is always in the MRO
