"""Model blobs (model.onnx, warmup.npz) stored by content: `{root}/sha256/{ab}/{sha256}`.

A blob is written to a temporary file while its sha256 is computed, checked against the digest the caller
named, fsynced, and renamed into place: a reader never sees a partial blob, and a blob's name is its proof.
Replicas share one store: a shared directory (NFS/EFS) behind `DirectoryBlobStore`, or an S3-compatible store
behind the same `BlobStore` protocol. Not for which blobs a model version uses (registry/store.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

import structlog

from cloud_sync.errors import InvalidArgument, NotFound, TooLarge
from edgefleet.durable import fsync_dir

__all__ = ["BlobInfo", "BlobStore", "DirectoryBlobStore", "check_sha256"]

log = structlog.get_logger(__name__)

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def check_sha256(value: object, what: str = "sha256") -> str:
    """`value` if it is a sha256 in 64 lower-case hex digits; InvalidArgument otherwise."""
    if not isinstance(value, str) or not _SHA256.match(value):
        raise InvalidArgument(f"{what} must be 64 lower-case hex digits (a sha256)")
    return value


@dataclass(frozen=True)
class BlobInfo:
    sha256: str
    size: int


class BlobStore(Protocol):
    """Where model files live, addressed by their sha256. Synchronous: call it off the event loop."""

    def put(self, chunks: Iterable[bytes], *, expected_sha256: str, max_bytes: int) -> BlobInfo:
        """Store the bytes of `chunks` as blob `expected_sha256`; InvalidArgument if their digest differs,
        TooLarge past `max_bytes` (nothing is kept in either case). Storing a blob that exists is harmless."""
        ...

    def open(self, sha256: str) -> BinaryIO:
        """The blob for reading; NotFound if absent."""
        ...

    def size(self, sha256: str) -> int | None:
        """The blob's size, or None if absent."""
        ...

    def delete(self, sha256: str) -> None:
        """Remove the blob (absent already: nothing to do)."""
        ...


class DirectoryBlobStore:
    """Blobs in a directory tree; temporary files in `{root}/tmp` (same filesystem, so the rename is atomic)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, sha256: str) -> Path:
        check_sha256(sha256)
        return self.root / "sha256" / sha256[:2] / sha256

    def put(self, chunks: Iterable[bytes], *, expected_sha256: str, max_bytes: int) -> BlobInfo:
        final = self.path(expected_sha256)
        tmp_dir = self.root / "tmp"
        tmp_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{expected_sha256[:16]}.", suffix=".part", dir=tmp_dir)
        try:
            digest, size = hashlib.sha256(), 0
            with os.fdopen(fd, "wb") as f:
                for chunk in chunks:
                    size += len(chunk)
                    if size > max_bytes:
                        raise TooLarge(
                            f"the blob is larger than {max_bytes} bytes (cloud-sync's registry.max_blob_bytes)"
                        )
                    digest.update(chunk)
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
            found = digest.hexdigest()
            if found != expected_sha256:
                raise InvalidArgument(
                    f"the uploaded bytes have sha256 {found}, not the {expected_sha256} they were sent as: "
                    "the upload was damaged or the wrong file was sent; nothing was stored"
                )
            if size == 0:
                raise InvalidArgument("an empty blob is no model file; nothing was stored")
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, final)  # the same content whoever wins: content-addressed
            fsync_dir(final.parent)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        log.info("registry.blob_stored", sha256=expected_sha256, size=size)
        return BlobInfo(expected_sha256, size)

    def open(self, sha256: str) -> BinaryIO:
        try:
            return self.path(sha256).open("rb")
        except FileNotFoundError:
            raise NotFound(f"no blob {sha256} in the registry: upload it first (PUT /v1/blobs/{sha256})") from None

    def size(self, sha256: str) -> int | None:
        try:
            return self.path(sha256).stat().st_size
        except FileNotFoundError:
            return None

    def delete(self, sha256: str) -> None:
        path = self.path(sha256)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            fsync_dir(path.parent)
            log.info("registry.blob_deleted", sha256=sha256)
