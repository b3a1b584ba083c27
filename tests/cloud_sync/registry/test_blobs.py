"""The content-addressed blob store: checked digests, atomic landing, limits, and nothing left by a refusal."""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from cloud_sync.errors import InvalidArgument, NotFound, TooLarge
from cloud_sync.registry.blobs import DirectoryBlobStore, check_sha256


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _leftovers(root: Path) -> list[Path]:
    return [p for p in (root / "tmp").iterdir()] if (root / "tmp").exists() else []


def test_a_blob_is_stored_under_its_digest_and_read_back(tmp_path: Path) -> None:
    blobs = DirectoryBlobStore(tmp_path / "blobs")
    data = os.urandom(300_000)
    info = blobs.put([data[:1000], data[1000:], b""], expected_sha256=_sha(data), max_bytes=1 << 20)
    assert (info.sha256, info.size) == (_sha(data), len(data))
    path = tmp_path / "blobs" / "sha256" / _sha(data)[:2] / _sha(data)
    assert path.is_file() and stat.S_IMODE(path.stat().st_mode) & 0o077 == 0
    assert blobs.size(_sha(data)) == len(data)
    with blobs.open(_sha(data)) as f:
        assert f.read() == data
    assert _leftovers(tmp_path / "blobs") == []


def test_bytes_that_do_not_match_the_digest_are_refused_and_leave_nothing(tmp_path: Path) -> None:
    blobs = DirectoryBlobStore(tmp_path / "blobs")
    claimed = _sha(b"what was promised")
    with pytest.raises(InvalidArgument, match="sha256"):
        blobs.put([b"something else"], expected_sha256=claimed, max_bytes=1 << 20)
    assert blobs.size(claimed) is None
    assert _leftovers(tmp_path / "blobs") == []


def test_a_blob_past_the_limit_is_refused_without_reading_on(tmp_path: Path) -> None:
    blobs = DirectoryBlobStore(tmp_path / "blobs")
    read = []

    def chunks() -> Iterator[bytes]:
        for i in range(100):
            read.append(i)
            yield b"x" * 1000

    with pytest.raises(TooLarge, match="2500 bytes"):
        blobs.put(chunks(), expected_sha256=_sha(b"x" * 100_000), max_bytes=2500)
    assert len(read) == 3
    assert _leftovers(tmp_path / "blobs") == []


def test_an_empty_blob_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="empty"):
        DirectoryBlobStore(tmp_path).put([], expected_sha256=_sha(b""), max_bytes=10)


@pytest.mark.parametrize("bad", ["", "ABCDEF" + "0" * 58, "0" * 63, "../" + "0" * 61, "g" * 64])
def test_a_name_that_is_no_sha256_is_refused(tmp_path: Path, bad: str) -> None:
    blobs = DirectoryBlobStore(tmp_path)
    with pytest.raises(InvalidArgument, match="64 lower-case hex"):
        blobs.size(bad)
    with pytest.raises(InvalidArgument):
        check_sha256(bad)


def test_storing_one_blob_from_many_threads_at_once_keeps_one_whole_copy(tmp_path: Path) -> None:
    blobs = DirectoryBlobStore(tmp_path / "blobs")
    data = os.urandom(2_000_000)
    with ThreadPoolExecutor(8) as pool:
        infos = list(pool.map(lambda _: blobs.put([data], expected_sha256=_sha(data), max_bytes=1 << 30), range(8)))
    assert {i.size for i in infos} == {len(data)}
    with blobs.open(_sha(data)) as f:
        assert _sha(f.read()) == _sha(data)
    assert _leftovers(tmp_path / "blobs") == []


def test_delete_removes_the_blob_and_a_missing_one_is_not_found(tmp_path: Path) -> None:
    blobs = DirectoryBlobStore(tmp_path)
    sha = _sha(b"abc")
    blobs.put([b"abc"], expected_sha256=sha, max_bytes=10)
    blobs.delete(sha)
    blobs.delete(sha)  # again: nothing to do
    assert blobs.size(sha) is None
    with pytest.raises(NotFound, match="upload it first"):
        blobs.open(sha)
