"""The outbox's decisions as plain functions over plain data: sizes, eviction goals, record checks, errors.

No I/O here; the writer and reader apply these (and the property tests model the writer with them).
"""

from __future__ import annotations

from edge_runtime.errors import Overloaded

__all__ = [
    "BYTES_SQL",
    "ROW_OVERHEAD_BYTES",
    "eviction_goal",
    "eviction_target",
    "record_bytes",
    "record_fields_ok",
    "record_problem",
    "storage_failure",
]

# What a row costs beyond its payload and strings: seq, five integers, SQLite's row header and the entries
# in two indexes. About right for 200-byte payloads (file size / records); the point is that tiny records
# still count, so a flood of them cannot grow the file without bound.
ROW_OVERHEAD_BYTES = 64

# record_bytes() in SQL, over a row of `records`. length() of TEXT counts characters, as len(str) does.
BYTES_SQL = f"size + length(model) + length(payload_type) + length(request_id) + {ROW_OVERHEAD_BYTES}"

_U32 = 2**32
_I64 = 2**63
_KIND_LIMIT = 2**31


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


def record_fields_ok(
    created_at_ms: object,
    model: object,
    version: object,
    priority: object,
    kind: object,
    payload_type: object,
    request_id: object,
) -> bool:
    """The writer's per-record check, one expression for speed; record_problem says why when it fails."""
    return (
        type(created_at_ms) is int
        and type(version) is int
        and type(priority) is int
        and type(kind) is int
        and type(model) is str
        and type(payload_type) is str
        and type(request_id) is str
        and -_I64 <= created_at_ms < _I64
        and 0 <= version < _U32
        and 0 <= priority < _U32
        and 0 <= kind < _KIND_LIMIT
    )


def record_problem(
    created_at_ms: object,
    model: object,
    version: object,
    priority: object,
    kind: object,
    payload_type: object,
    request_id: object,
) -> str | None:
    """Why these fields cannot be stored (they must convert to a ResultRecord at upload), or None.

    A record that cannot convert would block the upload queue forever, so it is refused at the door.
    """
    if type(created_at_ms) is not int or not -_I64 <= created_at_ms < _I64:
        return f"created_at_ms must be an int64 of milliseconds, got {created_at_ms!r}"
    for name, text in (("model", model), ("payload_type", payload_type), ("request_id", request_id)):
        if not isinstance(text, str):
            return f"{name} must be a str, got {type(text).__name__}"
    for name, number in (("version", version), ("priority", priority)):
        if not isinstance(number, int) or not 0 <= number < _U32:
            return f"{name} must be an int in 0..2**32-1, got {number!r}"
    if not isinstance(kind, int) or not 0 <= kind < _KIND_LIMIT:
        return f"kind must be a RecordKind value, got {kind!r}"
    return None


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
