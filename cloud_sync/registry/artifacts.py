"""The device-facing Artifacts service: a model package's signed manifest, then its file, resumable by offset.

A device downloads only what its current desired state assigns it (a credential cannot read the registry).
The first message of a call is the signed manifest with the file's total size; then `data` chunks from the
requested offset, each with its offset, read off the loop. A cut call is resumed by asking again from the
bytes the device holds. Not for checking what arrives (the device does, against the fleet key).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor
from typing import Any, BinaryIO, NoReturn, TypeVar

import grpc
import structlog
from prometheus_client import CollectorRegistry, Counter

from cloud_sync.errors import CloudSyncError, InvalidArgument
from cloud_sync.registry.store import MODEL_FILE, WARMUP_FILE, ModelRegistry, ModelVersion, check_model_ref
from cloud_sync.status import INTERNAL_MESSAGE, grpc_code, unexpected_error_fields
from cloud_sync.store.control import ControlStore
from cloud_sync.uplink import DeviceAuthenticator, bearer_token
from edgefleet.proto.edgefleet.v1.services_pb2 import DownloadChunk, DownloadRequest

__all__ = ["CHUNK_BYTES", "ArtifactsServicer"]

T = TypeVar("T")
log = structlog.get_logger(__name__)

# Per data message: large enough that the per-message cost is small, well under gRPC's 4 MiB default limit.
CHUNK_BYTES = 256 * 1024
FILES = ("", MODEL_FILE, WARMUP_FILE)


class _Refused(Exception):
    """A refusal with its own gRPC status (one that no CloudSyncError maps to)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class ArtifactsMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.downloads = Counter("cloud_sync_artifact_downloads", "Download calls accepted", registry=registry)
        self.bytes = Counter("cloud_sync_artifact_bytes", "Model file bytes sent to devices", registry=registry)
        self.refused = Counter("cloud_sync_artifact_refused", "Download calls refused", ["code"], registry=registry)
        # The refusals an operator alerts on at 0 before the first one.
        for code in ("UNAUTHENTICATED", "PERMISSION_DENIED", "NOT_FOUND", "INTERNAL"):
            self.refused.labels(code)


class ArtifactsServicer:
    """edgefleet.v1.Artifacts over the registry; store calls and file reads run on `executor`."""

    def __init__(
        self,
        auth: DeviceAuthenticator,
        registry: ModelRegistry,
        control: ControlStore,
        executor: Executor,
        metrics: CollectorRegistry | None = None,
    ) -> None:
        self._auth = auth
        self._registry = registry
        self._control = control
        self._executor = executor
        self._metrics = ArtifactsMetrics(metrics or CollectorRegistry())

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _authorize(self, token: str, request: DownloadRequest) -> tuple[str, ModelVersion, str, str, int]:
        """(device, version, file, sha256, size) for a download the device may make (on the executor)."""
        device_id = self._auth.device_for(token)
        name, version = check_model_ref(request.model.name, request.model.version)
        if request.file not in FILES:
            raise InvalidArgument(f"file {request.file[:80]!r} is not one of {MODEL_FILE!r}, {WARMUP_FILE!r}")
        file = request.file or MODEL_FILE
        desired = self._control.desired(device_id)
        if desired is None or not any(m.name == name and m.version == version for m in desired.models):
            raise _Refused(grpc.StatusCode.PERMISSION_DENIED, f"model {name}:{version} is not assigned to this device")
        found = self._registry.get(name, version)
        files = found.files()
        if file not in files:
            raise InvalidArgument(f"model {name}:{version} has no {file}")
        sha256, size = files[file]
        if request.offset > size:
            raise _Refused(
                grpc.StatusCode.OUT_OF_RANGE, f"offset {request.offset} is past the end of {file} ({size} bytes)"
            )
        return device_id, found, file, sha256, size

    async def Download(
        self, request: DownloadRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[DownloadChunk]:
        device_id = "?"
        try:
            token = bearer_token(context.invocation_metadata())
            device_id, found, file, sha256, size = await self._run(self._authorize, token, request)
            blob = await self._run(self._registry.blobs.open, sha256)
        except Exception as exc:
            await self._refuse(context, device_id, exc)
        self._metrics.downloads.inc()
        log.info("artifacts.download", device=device_id, model=found.ref, file=file, offset=request.offset)
        try:
            yield DownloadChunk(manifest=found.envelope, offset=request.offset, total_size=size)
            position = request.offset
            await self._run(blob.seek, position)
            while position < size:
                data = await self._run(_read, blob, min(CHUNK_BYTES, size - position))
                if not data:
                    log.error("artifacts.blob_short", model=found.ref, file=file, sha256=sha256, at=position)
                    await context.abort(grpc.StatusCode.DATA_LOSS, f"the registry's copy of {file} is damaged")
                yield DownloadChunk(data=data, offset=position, total_size=size)
                self._metrics.bytes.inc(len(data))
                position += len(data)
        finally:
            await self._run(blob.close)

    async def _refuse(self, context: grpc.aio.ServicerContext, device_id: str, exc: Exception) -> NoReturn:
        if isinstance(exc, grpc.aio.AbortError):
            raise exc
        if isinstance(exc, _Refused):
            code, message = exc.code, exc.message
        elif isinstance(exc, CloudSyncError):
            code, message = grpc_code(exc), exc.message
        else:
            code, message = grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE
            log.error("artifacts.internal_error", device=device_id, **unexpected_error_fields(exc))
        if code != grpc.StatusCode.INTERNAL:
            log.warning("artifacts.refused", device=device_id, code=code.name, reason=message)
        self._metrics.refused.labels(code.name).inc()
        await context.abort(code, message)
        raise AssertionError("context.abort returned")  # pragma: no cover


def _read(blob: BinaryIO, size: int) -> bytes:
    return blob.read(size)
