"""Structured logs: one JSON object per line on stdout (journald keeps them), an event name plus fields.

Values of keys that name a secret are redacted before rendering, whatever the caller passed and however deep
in a field it sits. Records of the standard `logging` module (asyncio, grpc) go out as the same JSON lines.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any, TextIO

import structlog
from structlog.typing import Processor

__all__ = ["configure_logging", "redact_secrets"]

_SECRET_MARKERS = (
    "token",
    "password",
    "passwd",
    "passphrase",
    "secret",
    "private_key",
    "api_key",
    "apikey",
    "credential",
    "authorization",
    "cookie",
)
REDACTED = "[redacted]"
_MAX_DEPTH = 8  # deeper than any field we log; bounds the walk over a self-referencing value


# Tracebacks as data, without each frame's local variables: locals hold tokens and request headers, and the
# redaction above only sees the event's own keys (a 500 once logged the admin token this way).
_TRACEBACKS = structlog.processors.ExceptionRenderer(structlog.tracebacks.ExceptionDictTransformer(show_locals=False))


def _is_secret(key: object) -> bool:
    name = str(key).lower()
    return any(marker in name for marker in _SECRET_MARKERS)


def _redact(value: Any, depth: int) -> Any:
    if depth >= _MAX_DEPTH:
        return value
    if isinstance(value, Mapping):
        return {k: REDACTED if _is_secret(k) else _redact(v, depth + 1) for k, v in value.items()}
    if type(value) in (list, tuple):
        return type(value)(_redact(v, depth + 1) for v in value)
    return value


def redact_secrets(_logger: Any, _method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key, value in event.items():
        event[key] = REDACTED if _is_secret(key) else _redact(value, 0)
    return event


class _JsonLinesHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The root handler configure_logging installs (and replaces when called again)."""


def configure_logging(level: str = "info", stream: TextIO | None = None) -> None:
    """Route structlog and stdlib logging to JSON lines on `stream` (stdout by default), dropping records
    below `level`."""
    out = stream or sys.stdout
    threshold = logging.getLevelName(level.upper())
    if not isinstance(threshold, int):
        raise ValueError(f"unknown log level {level!r}")
    stamp: list[Processor] = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        redact_secrets,
    ]
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            *stamp,
            _TRACEBACKS,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(threshold),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )
    handler = _JsonLinesHandler(out)
    handler.setLevel(threshold)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *stamp],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                _TRACEBACKS,
                structlog.processors.JSONRenderer(),
            ],
        )
    )
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _JsonLinesHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    # Libraries' info and debug records are their developers' business; warnings and errors are ours too.
    root.setLevel(max(threshold, logging.WARNING))
