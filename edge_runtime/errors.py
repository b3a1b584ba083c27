"""The exceptions edge_runtime raises; every protocol edge maps each one to its own status.

Core modules raise these and import neither grpc nor an HTTP framework; edge_runtime/kserve/status.py maps
them to gRPC status codes.
"""

from __future__ import annotations

from edgefleet.settings import SettingsError

__all__ = [
    "ArtifactRefused",
    "ConfigError",
    "DownloadFailed",
    "EdgeRuntimeError",
    "EngineError",
    "InvalidInput",
    "ModelNotFound",
    "ModelNotReady",
    "OutboxUnusable",
    "Overloaded",
    "PackageError",
    "RegionExists",
    "RegionNotFound",
    "RequestTimeout",
    "RequestTooLarge",
    "ShuttingDown",
    "StepTimeout",
    "VerificationFailed",
]


class EdgeRuntimeError(Exception):
    """Root of every error edge_runtime raises on purpose."""


class ConfigError(EdgeRuntimeError, SettingsError):
    """A config file or policy document is invalid; the message names the key.

    Also a SettingsError (a ValueError): the loader and the policy types shared with the cloud live in edgefleet.
    """


class PackageError(EdgeRuntimeError):
    """A model package (manifest or ONNX file) is malformed or does not match its manifest."""


class VerificationFailed(PackageError):
    """A package's checksum or signature does not verify; nothing was installed."""


class ModelNotFound(EdgeRuntimeError):
    """No such model, or no such version of it."""


class ModelNotReady(EdgeRuntimeError):
    """The model exists but cannot serve yet (loading, warming up, failed)."""


class InvalidInput(EdgeRuntimeError):
    """A request does not match the model's signature (names, dtypes, shapes, byte sizes)."""


class RegionNotFound(InvalidInput):
    """No shared-memory region of that name is registered."""


class RegionExists(InvalidInput):
    """A shared-memory region of that name is already registered."""


class RequestTooLarge(EdgeRuntimeError):
    """A request is past the configured size limit; the message gives the limit."""


class Overloaded(EdgeRuntimeError):
    """The model's queue is full; the caller should back off and retry."""


class RequestTimeout(EdgeRuntimeError):
    """The request waited past its timeout before an engine could run it."""


class ShuttingDown(EdgeRuntimeError):
    """The agent or this model version is draining and takes no new requests."""


class EngineError(EdgeRuntimeError):
    """An engine failed to load, build or run a model."""


class OutboxUnusable(EdgeRuntimeError):
    """The outbox file cannot be used as it is (in use, newer schema, damaged past salvage); says what to do."""


class ArtifactRefused(VerificationFailed):
    """A downloaded manifest or file the device must not use. `reason` is one word an operator searches for
    (wrong-key, bad-signature, malformed, expired, rollback, mismatch, too-large); the message says what to do.
    Given one argument, it is the message and the reason is "refused"."""

    def __init__(self, reason: str, message: str = "") -> None:
        super().__init__(message or reason)
        self.reason = reason if message else "refused"


class DownloadFailed(EdgeRuntimeError):
    """A download call that did not finish its file. `reason` says why in words an operator reads in the
    reported state; `retryable` is False for refusals a person must fix (revoked, not assigned), which the
    caller still retries, at its slowest backoff."""

    def __init__(self, reason: str, retryable: bool = True) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retryable = retryable


class StepTimeout(EdgeRuntimeError):
    """A step of converging to a desired state ran past its deadline; it is retried like any failure. `step` names
    it (download, verification, build, switch)."""

    def __init__(self, message: str, step: str = "") -> None:
        super().__init__(message)
        self.step = step
