"""The one mapping from edge_runtime errors to gRPC status codes, used by every servicer, and the guard that
ends a KServe call with it (`guarded`, `abort_with`)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc
import structlog

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

__all__ = ["MAX_MESSAGE_BYTES", "STATUS_CODES", "abort_with", "guarded", "status_for", "status_message"]

log = structlog.get_logger(__name__)
T = TypeVar("T")

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


# A status message travels in the grpc-message header, percent-encoded: a client refuses metadata past 16 KiB
# (and may past 8 KiB), and then sees "received metadata size exceeds hard limit" instead of the reason.
# Messages quote names and values the client sent, so they are cut to this many UTF-8 bytes.
MAX_MESSAGE_BYTES = 1024


def status_message(message: str) -> str:
    """`message`, or its head and tail when it is longer than MAX_MESSAGE_BYTES."""
    data = message.encode()
    if len(data) <= MAX_MESSAGE_BYTES:
        return message
    head = data[: MAX_MESSAGE_BYTES * 2 // 3].decode(errors="ignore")
    tail = data[-(MAX_MESSAGE_BYTES // 4) :].decode(errors="ignore")
    return f"{head} [... {len(data) - len(head.encode()) - len(tail.encode())} bytes cut ...] {tail}"


async def guarded(context: grpc.aio.ServicerContext, call: Callable[[], Awaitable[T]]) -> T:
    """Run `call`, turning our errors into their status and anything else into INTERNAL (logged)."""
    try:
        return await call()
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        await abort_with(context, exc)
    raise AssertionError("unreachable: abort raises")  # pragma: no cover


async def abort_with(context: grpc.aio.ServicerContext, exc: Exception) -> None:
    """End the call with our error's status and message, or INTERNAL (logged) for anything unexpected."""
    if isinstance(exc, EdgeRuntimeError):
        code, message = status_for(exc), str(exc)
    else:
        log.error("kserve.internal_error", error=repr(exc), exc_info=exc)
        code, message = grpc.StatusCode.INTERNAL, "internal error in edge-agent; see its log"
    await context.abort(code, status_message(message))
