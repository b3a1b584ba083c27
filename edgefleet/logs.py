"""Structured logs: one JSON object per line on stdout (journald keeps them), an event name plus fields.

Values of keys that name a secret are redacted before rendering, whatever the caller passed and however deep
in a field it sits. Field values are rendered as data (paths as strings, exceptions as type and message,
dataclasses as objects), never as Python reprs. Records of the standard `logging` module (asyncio, grpc) go
out as the same JSON lines. When stdout is journald's stream, each line starts with its syslog priority
(`<3>` for errors, sd-daemon(3)), so `journalctl -p err` finds them. Used as a library (the in-process API),
nothing is printed: events go to the `logging` module, whose handlers the application owns.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import logging
import os
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, Processor

__all__ = ["configure_logging", "fields_as_data", "journald_stream", "redact_secrets", "use_library_logging"]

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


_PLAIN = (str, int, float, bool, type(None))
_MAX_ITEMS = 64  # an array or collection past this is summarised, not dumped into a log line


def _as_data(value: Any, depth: int) -> Any:
    """`value` as JSON's types: what a reader (or journald, or Loki) can query, never a Python repr."""
    if isinstance(value, _PLAIN):
        return value
    if depth >= _MAX_DEPTH:
        return str(value)
    if isinstance(value, BaseException):
        return {"type": type(value).__name__, "message": str(value)}
    if isinstance(value, enum.Enum):
        return value.value if isinstance(value.value, _PLAIN) else value.name
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, (bytes, bytearray, memoryview)):
        raw = bytes(value)
        return raw.hex() if len(raw) <= _MAX_ITEMS else f"{len(raw)} bytes"
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): _as_data(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (set, frozenset)):
        return sorted((_as_data(v, depth + 1) for v in value), key=str)
    if isinstance(value, (list, tuple)):
        return [_as_data(v, depth + 1) for v in value]
    if hasattr(value, "dtype") and hasattr(value, "tolist"):  # numpy scalars and small arrays (not imported here)
        size = getattr(value, "size", 1)
        if size <= _MAX_ITEMS:
            return _as_data(value.tolist(), depth + 1)
        return f"array shape={tuple(getattr(value, 'shape', ()))} dtype={value.dtype}"
    return str(value)


def fields_as_data(_logger: Any, _method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Every field as JSON data (a processor; before redact_secrets, so secrets inside dataclasses are found)."""
    for key, value in event.items():
        if key != "exc_info" and not isinstance(value, _PLAIN):
            event[key] = _as_data(value, 0)
    return event


# sd-daemon(3): the priority journald gives a line that starts with it (SD_ERR "<3>", SD_WARNING "<4>"...).
_PRIORITY = {"critical": 2, "exception": 3, "error": 3, "warning": 4, "warn": 4, "info": 6, "debug": 7}


def journald_stream(stream: TextIO) -> bool:
    """True when `stream` is the journal stream systemd gave this service (JOURNAL_STREAM is `dev:inode` of
    it, systemd.exec(5)); a stream redirected elsewhere (a pipe, a file) keeps plain lines."""
    expected = os.environ.get("JOURNAL_STREAM", "")
    try:
        device, inode = (int(part) for part in expected.split(":"))
        st = os.fstat(stream.fileno())
    except (ValueError, OSError, AttributeError):  # unset or malformed, or a stream without a file (StringIO)
        return False
    return (st.st_dev, st.st_ino) == (device, inode)


def _json_default(value: Any) -> Any:
    return _as_data(value, 0)


class _Renderer:
    """JSON, with the syslog priority in front when the line goes to journald."""

    def __init__(self, syslog_prefix: bool) -> None:
        self._json = structlog.processors.JSONRenderer(default=_json_default)
        self._prefix = syslog_prefix

    def __call__(self, logger: Any, method: str, event: EventDict) -> str:
        line = str(self._json(logger, method, event))
        if not self._prefix:
            return line
        return f"<{_PRIORITY.get(str(event.get('level', method)).lower(), 6)}>{line}"


class _JsonLinesHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The root handler configure_logging installs (and replaces when called again)."""


def configure_logging(level: str = "info", stream: TextIO | None = None, *, syslog_prefix: bool | None = None) -> None:
    """Route structlog and stdlib logging to JSON lines on `stream` (stdout by default), dropping records
    below `level`. `syslog_prefix` (default: when `stream` is journald's, see journald_stream) starts each
    line with its sd-daemon(3) priority."""
    out = stream or sys.stdout
    threshold = logging.getLevelName(level.upper())
    if not isinstance(threshold, int):
        raise ValueError(f"unknown log level {level!r}")
    render = _Renderer(journald_stream(out) if syslog_prefix is None else syslog_prefix)
    stamp: list[Processor] = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        fields_as_data,
        redact_secrets,
    ]
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            *stamp,
            _TRACEBACKS,
            render,
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
                render,
            ],
        )
    )
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _JsonLinesHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    # Libraries' info and debug records are their developers' business; warnings and errors are ours too.
    root.setLevel(max(threshold, logging.WARNING))


# The packages whose modules log through structlog.get_logger(__name__).
_LIBRARY_LOGGERS = ("edge_runtime", "cloud_sync", "edgefleet")


def use_library_logging() -> None:
    """Our events go to the standard `logging` module as JSON messages, and nowhere unless the application
    adds a handler (a NullHandler on our package loggers, as the logging HOWTO asks of libraries).

    For code that uses edge_runtime in-process: structlog's own default prints every event to stdout, which
    is the application's. Leaves structlog alone if the application configured it already (its choice
    wins), and configure_logging (the programs) replaces this.
    """
    for name in _LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(h, logging.NullHandler) for h in logger.handlers):
            logger.addHandler(logging.NullHandler())
    if structlog.is_configured():
        return
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,  # nothing is built for a level the app's logging drops
            structlog.contextvars.merge_contextvars,
            fields_as_data,
            redact_secrets,
            _TRACEBACKS,
            structlog.processors.JSONRenderer(default=_json_default),
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
