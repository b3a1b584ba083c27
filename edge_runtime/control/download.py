"""One resumable Artifacts.Download call: appends a package file's bytes to a partial file on disk.

The first message of the stream is the signed manifest (handed to the caller's check before a byte of the
body is written), then chunks from the partial file's end. Not for deciding whether to trust the manifest
(control/trust.py), nor for verifying the finished file or retrying (control/fetch.py and the converger).
"""

from __future__ import annotations

import asyncio
import collections
import os
from collections.abc import Callable
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import grpc
import structlog

from edge_runtime.errors import ArtifactRefused, DownloadFailed
from edgefleet.proto.edgefleet.v1 import models_pb2, services_pb2, services_pb2_grpc

__all__ = [
    "FSYNC_EVERY_BYTES",
    "IDLE_TIMEOUT_S",
    "DownloadFailed",
    "ProgressHandler",
    "SizeFor",
    "download_file",
]

log = structlog.get_logger(__name__)

T = TypeVar("T")

# A power cut loses at most this much of a download (what was not fsynced is re-fetched on resume).
FSYNC_EVERY_BYTES = 4 * 1024 * 1024
# No message for this long: the call is stuck (a dead link, a cloud that stalls); the caller retries.
IDLE_TIMEOUT_S = 60.0
# Bytes read from the stream and not yet written that a download holds in memory before it waits for the disk.
MAX_BUFFERED_BYTES = 8 * 1024 * 1024
# Refusals a person must fix (a revoked device, a model not assigned, a cloud without the service).
_PERMANENT = {
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.UNIMPLEMENTED,
}

ProgressHandler = Callable[[int, int], None]
"""on_progress(bytes in the partial file, the file's size), called on the loop after each chunk."""

SizeFor = Callable[[models_pb2.SignedManifest, int], int]
"""size_for(signed manifest, total_size the cloud announced) -> the size the file must have; raises to refuse."""


async def download_file(
    stub_or_channel: services_pb2_grpc.ArtifactsStub | grpc.aio.Channel,
    token: str,
    name: str,
    version: int,
    file: str,
    partial: Path,
    expected_size: int | SizeFor,
    on_progress: ProgressHandler | None = None,
    *,
    executor: Executor | None = None,
    idle_timeout_s: float = IDLE_TIMEOUT_S,
) -> models_pb2.SignedManifest:
    """Fetch `file` of name:version into `partial`, resuming from its size; returns the stream's signed manifest.

    `expected_size` is the size the file must have, or a SizeFor that checks the signed manifest (raising
    ArtifactRefused to refuse it) before any data is written and returns that size. On return the partial
    file holds exactly that many bytes, fsynced; they are not verified here. `executor` runs the file writes
    and must run its tasks in order (one thread); by default the call makes its own thread.
    """
    stub = _stub(stub_or_channel)
    own = executor is None
    disk = _Disk(executor or ThreadPoolExecutor(1, thread_name_prefix=f"download-{name}"))
    try:
        return await _download(
            stub, token, name, version, file, partial, expected_size, on_progress, disk, idle_timeout_s
        )
    finally:
        if own:
            disk.executor.shutdown(wait=False)


def _stub(stub_or_channel: Any) -> services_pb2_grpc.ArtifactsStub:
    if hasattr(stub_or_channel, "Download"):
        return stub_or_channel  # type: ignore[no-any-return]
    return services_pb2_grpc.ArtifactsStub(stub_or_channel)


async def _download(
    stub: services_pb2_grpc.ArtifactsStub,
    token: str,
    name: str,
    version: int,
    file: str,
    partial: Path,
    expected_size: int | SizeFor,
    on_progress: ProgressHandler | None,
    disk: _Disk,
    idle_timeout_s: float,
) -> models_pb2.SignedManifest:
    ref = f"{name}:{version} {file or 'model.onnx'}"
    known = expected_size if isinstance(expected_size, int) else None
    writer = await disk.run(_PartialFile.open, partial, known)
    request = services_pb2.DownloadRequest(
        model=models_pb2.ModelRef(name=name, version=version), offset=writer.size, file=file
    )
    call = stub.Download(request, metadata=(("authorization", f"Bearer {token}"),))
    writes = _Writes()
    try:
        first = await _next(call, ref, idle_timeout_s)
        if first is None or first.WhichOneof("body") != "manifest":
            raise DownloadFailed(f"{ref}: the cloud's stream did not start with the signed manifest", True)
        size = expected_size if isinstance(expected_size, int) else expected_size(first.manifest, first.total_size)
        _check_total(ref, first.total_size, size)
        if writer.size > size:
            # Longer than the file can be (a manifest that changed under a kept partial): keep what can fit.
            await disk.run(writer.truncate, size)
        if on_progress is not None:
            on_progress(writer.size, size)
        # Reading never waits for the disk (up to MAX_BUFFERED_BYTES): bytes gRPC received but we had not read
        # are lost when the connection is cut, and a reader held up by each write left gRPC's whole receive
        # window (over a MiB on a fast link) unread at every cut. What was read is written even after a cut.
        at = writer.size
        while at < size:
            chunk = await _next(call, ref, idle_timeout_s)
            if chunk is None:
                raise DownloadFailed(f"{ref}: the cloud ended the stream at byte {at} of {size}", True)
            _check_chunk(ref, chunk, at, size)
            await writes.add(disk.submit(writer.append, chunk.data), len(chunk.data))
            at += len(chunk.data)
            if on_progress is not None:
                on_progress(at, size)
        await writes.drain()
        # Complete: whatever the cloud would send after this is not read (a blob longer than its manifest
        # shows up as a chunk past the size, refused above, or not at all).
        return first.manifest
    finally:
        call.cancel()
        # Queued after every write on the one thread: closes (and fsyncs) what landed, a cut's last bytes too.
        await writes.settle()
        await disk.run(writer.close)


def _check_total(ref: str, total: int, size: int) -> None:
    if total > size:
        raise ArtifactRefused(
            "too-large", f"{ref}: the cloud offers {total} bytes, the signed manifest says {size}; refusing it"
        )
    if total < size:
        raise ArtifactRefused("mismatch", f"{ref}: the cloud has {total} bytes, the signed manifest says {size}")


def _check_chunk(ref: str, chunk: services_pb2.DownloadChunk, at: int, size: int) -> None:
    if chunk.WhichOneof("body") != "data":
        raise DownloadFailed(f"{ref}: a second manifest in the stream, at byte {at}", True)
    if chunk.offset != at:
        raise DownloadFailed(f"{ref}: the cloud sent bytes for offset {chunk.offset}, the file ends at {at}", True)
    if at + len(chunk.data) > size:
        raise ArtifactRefused(
            "too-large", f"{ref}: the cloud sent data past the {size} bytes the signed manifest says; refusing it"
        )


async def _next(call: Any, ref: str, idle_timeout_s: float) -> services_pb2.DownloadChunk | None:
    """The stream's next message, None at its end; DownloadFailed when the cloud refuses or goes silent."""
    try:
        message = await asyncio.wait_for(call.read(), idle_timeout_s)
    except asyncio.TimeoutError:
        raise DownloadFailed(f"{ref}: no data from the cloud for {idle_timeout_s:g} s", True) from None
    except grpc.aio.AioRpcError as exc:
        raise _failed(ref, exc) from exc
    if message is grpc.aio.EOF:
        return None
    return message  # type: ignore[no-any-return]


def _failed(ref: str, exc: grpc.aio.AioRpcError) -> DownloadFailed:
    code = exc.code()
    detail = exc.details() or code.name
    if code == grpc.StatusCode.OUT_OF_RANGE:
        return DownloadFailed(f"{ref}: the cloud's file is shorter than the partial download ({detail})", True)
    return DownloadFailed(f"{ref}: {code.name}: {detail}", code not in _PERMANENT)


class _Disk:
    """The thread the file work runs on; a call's result comes back to the loop."""

    def __init__(self, executor: Executor) -> None:
        self.executor = executor

    def submit(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        future: Future[T] = self.executor.submit(fn, *args)
        return asyncio.wrap_future(future)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        return await self.submit(fn, *args)


class _Writes:
    """Writes queued on the download's thread and not yet done, at most MAX_BUFFERED_BYTES of them."""

    def __init__(self) -> None:
        self._pending: collections.deque[tuple[asyncio.Future[None], int]] = collections.deque()
        self._bytes = 0

    async def add(self, write: asyncio.Future[None], size: int) -> None:
        """Queue `write`; wait for the disk while more than MAX_BUFFERED_BYTES are queued. Raises what a
        finished write raised (a full disk)."""
        self._pending.append((write, size))
        self._bytes += size
        while self._pending and (self._bytes > MAX_BUFFERED_BYTES or self._pending[0][0].done()):
            done, n = self._pending.popleft()
            self._bytes -= n
            await done

    async def drain(self) -> None:
        """Wait for every queued write; raises the first failure."""
        while self._pending:
            done, n = self._pending.popleft()
            self._bytes -= n
            await done

    async def settle(self) -> None:
        """Wait for every queued write, whatever happens to them (on the way out of a failed call)."""
        pending = [f for f, _ in self._pending]
        self._pending.clear()
        self._bytes = 0
        await asyncio.gather(*pending, return_exceptions=True)


class _PartialFile:
    """The partial file, open for appending; every method blocks (runs on the download's thread)."""

    def __init__(self, path: Path, f: BinaryIO) -> None:
        self.path = path
        self._f = f
        self.size = f.tell()
        self._unsynced = 0

    @classmethod
    def open(cls, path: Path, limit: int | None) -> _PartialFile:
        path.parent.mkdir(parents=True, exist_ok=True)
        f = open(path, "ab")  # noqa: SIM115 - closed by close(), which the download always calls
        writer = cls(path, f)
        if limit is not None and writer.size > limit:
            writer.truncate(limit)
        return writer

    def append(self, data: bytes) -> None:
        self._f.write(data)
        self.size += len(data)
        self._unsynced += len(data)
        if self._unsynced >= FSYNC_EVERY_BYTES:
            self._sync()

    def truncate(self, size: int) -> None:
        self._f.flush()
        self._f.truncate(size)
        self._f.seek(size)
        self.size = size
        self._sync()

    def _sync(self) -> None:
        self._f.flush()
        os.fsync(self._f.fileno())
        self._unsynced = 0

    def close(self) -> None:
        if self._f.closed:
            return
        try:
            self._sync()
        finally:
            self._f.close()
