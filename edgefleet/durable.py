"""File writes that survive power loss: write a temp file, fsync it, rename over the target, fsync the dir.

For the small files whose loss or tearing would break a restart (active-version pointers, caches). The
outbox and desired state live in SQLite, which has its own journal. Also: the lock files that keep a second
process off a resource for this process's life.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from pathlib import Path

__all__ = ["create_once", "fsync_dir", "hold_lock", "write_atomic"]


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace `path` with `data` so a reader sees the old bytes or the new, never a torn file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def create_once(path: Path, data: bytes) -> None:
    """Write `data` to `path` (mode 0600) unless a file is there already, durably. Linked into place, never
    renamed over it: of several processes making it at once, the first one's stands (a secret every one of them
    must then read back, not the one it made)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)  # mode 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)
    finally:
        os.unlink(tmp)
    fsync_dir(path.parent)


def hold_lock(lock_path: Path, mode: int = 0o600) -> int | None:
    """Take an exclusive flock on `lock_path` (created if absent) and return its fd, to keep open for the
    holder's life; None when another process holds it. The kernel drops the lock when the process exits,
    kill -9 included, so a stale lock file never blocks a restart."""
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, mode)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd
