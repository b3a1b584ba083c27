"""The one mapping from cloud_sync errors to gRPC status codes and HTTP status codes."""

from __future__ import annotations

import traceback
from typing import Any

import grpc

from cloud_sync.certificates import CertificateProblem
from cloud_sync.config import ConfigProblem
from cloud_sync.errors import (
    AlreadyExists,
    CloudSyncError,
    DeviceRevoked,
    FailedPrecondition,
    InvalidArgument,
    InvalidBatch,
    NotFound,
    NotInstalled,
    PermissionDenied,
    SchemaMismatch,
    StoreUnavailable,
    TooLarge,
    Unauthenticated,
)
from cloud_sync.policies import PolicyInvalid
from cloud_sync.store.control import StaleReport
from cloud_sync.store.enrollment import EnrollmentRefused

__all__ = ["GRPC_CODES", "HTTP_CODES", "INTERNAL_MESSAGE", "grpc_code", "http_code", "unexpected_error_fields"]

# What a caller hears about an error no CloudSyncError describes (a bug); the log line has the rest.
INTERNAL_MESSAGE = "internal error in cloud-sync; its log has the details"

GRPC_CODES: dict[type[CloudSyncError], grpc.StatusCode] = {
    CloudSyncError: grpc.StatusCode.INTERNAL,
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    InvalidBatch: grpc.StatusCode.INVALID_ARGUMENT,
    TooLarge: grpc.StatusCode.INVALID_ARGUMENT,
    PolicyInvalid: grpc.StatusCode.INVALID_ARGUMENT,
    # A CSR that cannot be signed (junk, a bad signature, a weak key): the caller's input.
    CertificateProblem: grpc.StatusCode.INVALID_ARGUMENT,
    # A report that arrived after a newer one: refused with its reason, as any report that cannot be stored.
    StaleReport: grpc.StatusCode.INVALID_ARGUMENT,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    EnrollmentRefused: grpc.StatusCode.UNAUTHENTICATED,
    DeviceRevoked: grpc.StatusCode.PERMISSION_DENIED,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    NotFound: grpc.StatusCode.NOT_FOUND,
    AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    # The call needs an extra this installation lacks (edgefleet[compress]): not the caller's fault, not transient.
    NotInstalled: grpc.StatusCode.UNIMPLEMENTED,
    StoreUnavailable: grpc.StatusCode.UNAVAILABLE,
    SchemaMismatch: grpc.StatusCode.FAILED_PRECONDITION,
    # The server's own config (it is bad input on the command line, exit 2): never the caller's fault.
    ConfigProblem: grpc.StatusCode.FAILED_PRECONDITION,
}

HTTP_CODES: dict[type[CloudSyncError], int] = {
    CloudSyncError: 500,
    InvalidArgument: 422,
    InvalidBatch: 422,
    TooLarge: 413,
    PolicyInvalid: 422,
    CertificateProblem: 422,
    StaleReport: 422,
    FailedPrecondition: 409,
    Unauthenticated: 401,
    EnrollmentRefused: 401,
    DeviceRevoked: 403,
    PermissionDenied: 403,
    NotFound: 404,
    AlreadyExists: 409,
    NotInstalled: 501,
    StoreUnavailable: 503,
    SchemaMismatch: 500,
    ConfigProblem: 500,
}


def grpc_code(exc: CloudSyncError) -> grpc.StatusCode:
    """The status of the most specific mapped class of `exc`."""
    return next(GRPC_CODES[cls] for cls in type(exc).__mro__ if cls in GRPC_CODES)


def http_code(exc: CloudSyncError) -> int:
    return next(HTTP_CODES[cls] for cls in type(exc).__mro__ if cls in HTTP_CODES)


def unexpected_error_fields(exc: BaseException) -> dict[str, Any]:
    """The log fields of an unexpected error: its type, message and where it was raised.

    Not its traceback's local variables, which structlog's dict tracebacks would log: they hold the caller's
    token (a request's headers, the servicer's `token`).
    """
    frames = traceback.extract_tb(exc.__traceback__)
    where = f"{frames[-1].filename}:{frames[-1].lineno} in {frames[-1].name}" if frames else "?"
    return {"error": type(exc).__name__, "detail": str(exc)[:500], "where": where}
