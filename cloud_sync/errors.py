"""The exceptions cloud_sync raises on purpose; each protocol edge maps every one to its own status.

Core modules raise these and import neither grpc nor an HTTP framework. Driver errors are wrapped where they
happen (`raise StoreUnavailable(...) from exc`), so callers never see a SQLAlchemy or psycopg type.
"""

from __future__ import annotations

__all__ = [
    "AlreadyExists",
    "CloudSyncError",
    "DeviceRevoked",
    "FailedPrecondition",
    "InvalidArgument",
    "InvalidBatch",
    "NotFound",
    "NotInstalled",
    "PermissionDenied",
    "SchemaMismatch",
    "StoreUnavailable",
    "TooLarge",
    "Unauthenticated",
]


class CloudSyncError(Exception):
    """Root of every error cloud_sync raises on purpose; the message is safe to show to the caller."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(CloudSyncError):
    """An input from outside (an id, labels, a query parameter) is malformed; nothing was changed."""


class InvalidBatch(InvalidArgument):
    """An uploaded ResultBatch breaks the upload protocol or a limit; the message names the problem.

    Nothing of the batch was stored and the device's watermark did not move.
    """


class TooLarge(InvalidArgument):
    """An upload (a model blob) is past its configured limit; nothing of it was kept."""


class FailedPrecondition(CloudSyncError):
    """The object is in a state that forbids the call (a model version still assigned or running); the message
    names what holds it."""


class Unauthenticated(CloudSyncError):
    """The caller presented no credential, or one that matches no device."""


class PermissionDenied(CloudSyncError):
    """The caller is authenticated but its role may not make this call; the message names the role needed."""


class DeviceRevoked(CloudSyncError):
    """The device's credential is valid but the device was revoked; it must enrol again."""


class NotFound(CloudSyncError):
    """No such device (or other named object)."""


class AlreadyExists(CloudSyncError):
    """An object with that id exists already (a device id is registered once)."""


class StoreUnavailable(CloudSyncError):
    """The database cannot be reached or is busy; the message says what to check.

    The call may be retried: ingest is idempotent on (device_id, seq), so a retry after a commit whose
    answer was lost stores nothing twice.
    """


class NotInstalled(CloudSyncError):
    """This cloud-sync was installed without what the call needs (model compression and sample export need
    numpy, ONNX Runtime and pyarrow: `pip install "edgefleet[cloud,compress]"`); the message names the extra."""


class SchemaMismatch(CloudSyncError):
    """The database holds a schema version this cloud-sync does not know; upgrade (or migrate) first."""
