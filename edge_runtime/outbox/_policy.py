"""The outbox's decisions as plain functions over plain data: sizes, eviction goals, storage errors.

No I/O here; the writer and reader apply these (and the property tests model the writer with them). What a
record must be, and its checksum, are in _record.py.
"""

from __future__ import annotations

from edge_runtime.errors import Overloaded

__all__ = [
    "BYTES_SQL",
    "ROW_OVERHEAD_BYTES",
    "eviction_goal",
    "eviction_target",
    "record_bytes",
    "storage_failure",
]

# What a row costs beyond its payload and strings: seq, five integers, SQLite's row header and the entries
# in two indexes. About right for 200-byte payloads (file size / records); the point is that tiny records
# still count, so a flood of them cannot grow the file without bound.
ROW_OVERHEAD_BYTES = 64

# record_bytes() in SQL, over a row of `records`. length() of TEXT counts characters, as len(str) does.
BYTES_SQL = f"size + length(model) + length(payload_type) + length(request_id) + {ROW_OVERHEAD_BYTES}"


def record_bytes(size: int, model: str, payload_type: str, request_id: str) -> int:
    """The bytes a record counts against buffer.max_bytes."""
    return size + len(model) + len(payload_type) + len(request_id) + ROW_OVERHEAD_BYTES


def eviction_target(max_bytes: int) -> int:
    """Where eviction brings the outbox down to once it is past max_bytes.

    A little below the bound (1/64 of it), so a full outbox evicts (one transaction, one log line) every
    few hundred commits rather than after each; over time the same records go either way.
    """
    return max_bytes - max_bytes // 64


def eviction_goal(held_bytes: int, max_bytes: int) -> int:
    """Bytes to evict now: none while within the bound, else down to eviction_target()."""
    if held_bytes <= max_bytes:
        return 0
    return held_bytes - eviction_target(max_bytes)


def storage_failure(exc: Exception, path: str, records: int) -> Overloaded:
    """The error each append of a group gets when its commit failed, naming the storage problem."""
    text = str(exc)
    if "full" in text:
        problem = f"storage is full ({text})"
        advice = f"free disk space under {path!r} or lower buffer.max_bytes"
    elif "I/O" in text or "disk" in text:
        problem = f"storage failed ({text})"
        advice = f"check the disk holding {path!r}"
    else:
        problem = f"write failed ({text})"
        advice = "retry later"
    return Overloaded(f"outbox {problem}: {records} record(s) not stored; {advice}")
