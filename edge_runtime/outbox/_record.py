"""The outbox's checks of a record before it is kept: plain functions, no I/O.

A record cloud-sync could never accept (edgefleet/records.py holds the shared limits and the checksum) is
refused at the door, so the device never keeps what can never upload.
"""

from __future__ import annotations

from edgefleet.records import (
    CHECKSUM_HEADER,
    JOIN_BELOW,
    KNOWN_KINDS,
    MAX_MODEL_CHARS,
    MAX_PAYLOAD_TYPE_CHARS,
    MAX_RECORD_PAYLOAD_BYTES,
    MAX_REQUEST_ID_CHARS,
    record_checksum,
)

__all__ = [
    "CHECKSUM_HEADER",
    "JOIN_BELOW",
    "MAX_RECORD_PAYLOAD_BYTES",
    "convertible_problem",
    "fields_ok",
    "record_checksum",
    "record_problem",
    "strings_problem",
]

_U32 = 2**32
_I64 = 2**63


def fields_ok(created_at_ms: object, version: object, priority: object, kind: object, request_id: object) -> bool:
    """The writer's per-record check of the fields that change from record to record, one expression for
    speed (model and payload_type repeat: strings_problem checks them when they change)."""
    return (
        type(created_at_ms) is int
        and type(version) is int
        and type(priority) is int
        and type(request_id) is str
        and -_I64 <= created_at_ms < _I64
        and 0 <= version < _U32
        and 0 <= priority < _U32
        and kind in KNOWN_KINDS
        and len(request_id) <= MAX_REQUEST_ID_CHARS
        and "\0" not in request_id
    )


def strings_problem(model: object, payload_type: object) -> str | None:
    """Why model or payload_type cannot be kept, or None."""
    for name, text, limit in (
        ("model", model, MAX_MODEL_CHARS),
        ("payload_type", payload_type, MAX_PAYLOAD_TYPE_CHARS),
    ):
        problem = _text_problem(name, text, limit)
        if problem:
            return problem
    return None


def convertible_problem(
    created_at_ms: object,
    model: object,
    version: object,
    priority: object,
    kind: object,
    payload_type: object,
    request_id: object,
) -> str | None:
    """Why these fields cannot become a ResultRecord (types, ranges, UTF-8), or None."""
    if type(created_at_ms) is not int or not -_I64 <= created_at_ms < _I64:
        return f"created_at_ms must be an int64 of milliseconds, got {created_at_ms!r}"
    for name, text in (("model", model), ("payload_type", payload_type), ("request_id", request_id)):
        if not isinstance(text, str):
            return f"{name} must be a str, got {type(text).__name__}"
        if not _utf8(text):
            return f"{name} is not valid Unicode text (it holds a lone surrogate)"
    for name, number in (("version", version), ("priority", priority)):
        if not isinstance(number, int) or not 0 <= number < _U32:
            return f"{name} must be an int in 0..2**32-1, got {number!r}"
    if not isinstance(kind, int) or not 0 <= kind < 2**31:
        return f"kind must be a RecordKind value, got {kind!r}"
    return None


def record_problem(
    created_at_ms: object,
    model: object,
    version: object,
    priority: object,
    kind: object,
    payload_type: object,
    request_id: object,
) -> str | None:
    """Why these fields cannot be kept (they could not be uploaded, or the cloud would reject them), or None."""
    problem = convertible_problem(created_at_ms, model, version, priority, kind, payload_type, request_id)
    if problem:
        return problem
    if kind not in KNOWN_KINDS:
        return f"kind {kind} is not a known RecordKind ({', '.join(map(str, sorted(KNOWN_KINDS)))})"
    return strings_problem(model, payload_type) or _text_problem("request_id", request_id, MAX_REQUEST_ID_CHARS)


def _text_problem(name: str, text: object, limit: int) -> str | None:
    if not isinstance(text, str):
        return f"{name} must be a str, got {type(text).__name__}"
    if len(text) > limit:
        return f"{name} is {len(text)} characters: cloud-sync accepts at most {limit}"
    if "\0" in text:
        return f"{name} contains a NUL character (cloud-sync cannot store one)"
    if not _utf8(text):
        return f"{name} is not valid Unicode text (it holds a lone surrogate)"
    return None


def _utf8(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True
