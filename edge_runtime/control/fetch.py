"""Fetch one model version from cloud-sync into a complete, verified package directory that ModelStore.install takes.

`{downloads_dir}/{name}/{version}/` holds `{file}.part` while a file downloads (kept across failures and
restarts, so the next attempt resumes), then `model.onnx`, `warmup.npz` and `manifest.json` once each file
matched the signed manifest. Not for retrying, deadlines between attempts or installing (the converger).
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import structlog

from edge_runtime.control.download import IDLE_TIMEOUT_S, DownloadFailed, download_file
from edge_runtime.control.trust import ArtifactRefused, TrustStore, verified_manifest
from edge_runtime.models.package import MANIFEST_FILE, MODEL_FILE, WARMUP_FILE, ModelManifest, check_ref, sha256_file
from edgefleet.durable import fsync_dir, write_atomic
from edgefleet.proto.edgefleet.v1 import services_pb2_grpc
from edgefleet.proto.edgefleet.v1.models_pb2 import SignedManifest
from edgefleet.proto.edgefleet.v1.state_pb2 import MODEL_STATE_DOWNLOADING, MODEL_STATE_VERIFYING
from edgefleet.signing import Envelope

__all__ = ["MAX_PACKAGE_BYTES", "download_dir", "fetch_package", "remove_download"]

log = structlog.get_logger(__name__)

# The registry's default max_blob_bytes: a manifest declaring more is refused before a byte is fetched.
MAX_PACKAGE_BYTES = 4 * 1024**3
# Room left on the disk after a download (logs, the outbox, the engine cache need it too).
DISK_RESERVE_BYTES = 64 * 1024 * 1024


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def download_dir(downloads_dir: Path, name: str, version: int) -> Path:
    """Where name:version downloads (PackageError for a name or version that is not a model's)."""
    check_ref(name, version)  # the name becomes a path: "../x" must never get here
    return Path(downloads_dir) / name / str(version)


def remove_download(downloads_dir: Path, name: str, version: int) -> None:
    """Forget name:version's download, partial or complete (blocks: call off the loop)."""
    shutil.rmtree(download_dir(downloads_dir, name, version), ignore_errors=True)


async def fetch_package(
    channel: services_pb2_grpc.ArtifactsStub | grpc.aio.Channel,
    token: str,
    trust: TrustStore,
    name: str,
    version: int,
    sha256: str | None,
    downloads_dir: Path,
    on_progress: Callable[[float], None] | None = None,
    on_phase: Callable[[int], None] | None = None,
    *,
    executor: Executor | None = None,
    idle_timeout_s: float = IDLE_TIMEOUT_S,
    max_bytes: int = MAX_PACKAGE_BYTES,
    now_ms: Callable[[], int] = _now_ms,
) -> Path:
    """Download, verify and return name:version's package directory.

    Every download call's signed manifest is checked (trust.check, `sha256` pinned by the assignment) before
    its body is written. `on_phase` gets MODEL_STATE_DOWNLOADING then MODEL_STATE_VERIFYING; `on_progress`
    the share of the package's bytes on disk, 0..1. Raises DownloadFailed (resume on the next call),
    ArtifactRefused (reason word; a file that did not match is deleted, so the next call starts it over) or
    PackageError (a name or version that is not a model's).
    """
    directory = download_dir(downloads_dir, name, version)
    own = executor is None
    disk = executor or ThreadPoolExecutor(1, thread_name_prefix=f"fetch-{name}")
    try:
        return await _Fetch(
            channel,
            token,
            trust,
            name,
            version,
            sha256,
            directory,
            on_progress,
            disk,
            idle_timeout_s,
            max_bytes,
            now_ms,
        ).run(on_phase)
    finally:
        if own:
            disk.shutdown(wait=False)


class _Fetch:
    """One fetch_package call's state: the verified envelope and how many bytes of each file are on disk."""

    def __init__(
        self,
        channel: Any,
        token: str,
        trust: TrustStore,
        name: str,
        version: int,
        sha256: str | None,
        directory: Path,
        on_progress: Callable[[float], None] | None,
        disk: Executor,
        idle_timeout_s: float,
        max_bytes: int,
        now_ms: Callable[[], int],
    ) -> None:
        self.channel, self.token, self.trust = channel, token, trust
        self.name, self.version, self.sha256 = name, version, sha256 or None
        self.directory = directory
        self.on_progress = on_progress
        self.disk = disk
        self.idle_timeout_s = idle_timeout_s
        self.max_bytes = max_bytes
        self.now_ms = now_ms
        self.envelope: Envelope | None = None
        self.manifest: ModelManifest | None = None
        self.done: dict[str, int] = {}

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"

    async def _off_loop(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.disk, fn, *args)

    async def run(self, on_phase: Callable[[int], None] | None) -> Path:
        if on_phase is not None:
            on_phase(MODEL_STATE_DOWNLOADING)
        await self._off_loop(_reopen, self.directory)
        await self._download(MODEL_FILE)
        manifest = self.manifest
        assert manifest is not None and self.envelope is not None  # set by the first call's check
        files = {MODEL_FILE: (manifest.size, manifest.sha256)}
        if manifest.warmup is not None and manifest.warmup.file:
            await self._download(WARMUP_FILE)
            files[WARMUP_FILE] = (manifest.warmup.size, manifest.warmup.sha256)
        if on_phase is not None:
            on_phase(MODEL_STATE_VERIFYING)
        await self._off_loop(_finish, self.directory, self.ref, files, self.envelope.manifest_json())
        await self._off_loop(self.trust.remember, self.envelope)
        log.info(
            "model.fetched", model=self.name, version=self.version, sha256=manifest.sha256, serial=self.envelope.serial
        )
        if self.on_progress is not None:
            self.on_progress(1.0)
        return self.directory

    async def _download(self, file: str) -> None:
        await download_file(
            self.channel,
            self.token,
            self.name,
            self.version,
            file,
            self.directory / f"{file}.part",
            lambda signed, total: self._size_for(file, signed),
            lambda done, total: self._progress(file, done),
            executor=self.disk,
            idle_timeout_s=self.idle_timeout_s,
        )

    def _size_for(self, file: str, signed: SignedManifest) -> int:
        """Check the call's signed manifest (on the loop, before any body byte) and return `file`'s size."""
        envelope = self.trust.check(signed, self.name, self.version, self.sha256, self.now_ms())
        manifest = verified_manifest(envelope)
        if self.manifest is None:
            self.manifest = manifest
            total = manifest.size + (manifest.warmup.size if manifest.warmup is not None else 0)
            if total > self.max_bytes:
                raise ArtifactRefused(
                    "too-large",
                    f"{self.ref}: the package is {total} bytes, more than this device takes ({self.max_bytes})",
                )
        elif manifest.to_dict() != self.manifest.to_dict():
            raise ArtifactRefused("mismatch", f"{self.ref}: the signed manifest changed between two files' downloads")
        if self.envelope is None or envelope.serial > self.envelope.serial:
            self.envelope = envelope
        if file == MODEL_FILE:
            return manifest.size
        if manifest.warmup is None or not manifest.warmup.file:
            raise ArtifactRefused("mismatch", f"{self.ref}: the signed manifest names no {WARMUP_FILE}")
        return manifest.warmup.size

    def _progress(self, file: str, done: int) -> None:
        self.done[file] = done
        manifest = self.manifest
        if self.on_progress is None or manifest is None:
            return
        total = manifest.size + (manifest.warmup.size if manifest.warmup is not None else 0)
        self.on_progress(min(1.0, sum(self.done.values()) / total) if total else 1.0)


def _reopen(directory: Path) -> None:
    """Turn a finished download back into partial files: the next call resumes at their end, which costs one
    manifest message and a verify, never a second download. Also checks the disk has room."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / MANIFEST_FILE).unlink(missing_ok=True)
    for file in (MODEL_FILE, WARMUP_FILE):
        done, part = directory / file, directory / f"{file}.part"
        if done.exists():
            done.replace(part)
    free = shutil.disk_usage(directory).free
    if free < DISK_RESERVE_BYTES:
        raise DownloadFailed(f"only {free} bytes free on the disk of {directory}: make room", True)


def _finish(directory: Path, ref: str, files: dict[str, tuple[int, str]], manifest_json: bytes) -> None:
    """Check each partial file against the signed manifest, then land it under its package name."""
    for file, (size, sha256) in files.items():
        part = directory / f"{file}.part"
        actual_size = part.stat().st_size
        if actual_size != size:
            raise DownloadFailed(f"{ref}: {file} is {actual_size} bytes on disk, the manifest says {size}", True)
        actual = sha256_file(part)
        if actual != sha256:
            part.unlink()
            raise ArtifactRefused(
                "mismatch",
                f"{ref}: the downloaded {file} has sha256 {actual[:12]}…, the signed manifest says {sha256[:12]}…; "
                "deleted it, the next attempt downloads it again",
            )
    for file in files:
        (directory / f"{file}.part").replace(directory / file)
    write_atomic(directory / MANIFEST_FILE, manifest_json)  # also fsyncs the directory: the renames too
    fsync_dir(directory.parent)
