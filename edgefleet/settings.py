"""Settings as frozen dataclasses: fields with their documentation and bounds, and the loader that checks them.

The device's config file (edge_runtime/config.py) and the cloud's policy validation (cloud_sync/policies.py)
load through this one loader, so both refuse the same unknown keys, wrong types and out-of-range values with
the same message (`inference.max_batch_sze`). Not a TOML reader: callers parse their own format first.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import field
from typing import Any, Literal, TypeVar

__all__ = ["SettingsError", "config_from_dict", "field_docs", "option"]

T = TypeVar("T")


class SettingsError(ValueError):
    """A settings document is invalid; the message names the key (`inference.max_batch_size`)."""


def option(default: Any, doc: str, *, min: float | None = None, max: float | None = None) -> Any:
    """A config field with its documentation and bounds (checked by the loader)."""
    return field(default=default, metadata={"doc": doc, "min": min, "max": max})


def config_from_dict(
    cls: type[T], data: Mapping[str, Any], prefix: str = "", error: type[Exception] = SettingsError
) -> T:
    """Build the frozen dataclass `cls` from plain data, checking keys, types and bounds.

    Every problem raises `error` (a SettingsError subclass, or SettingsError itself) with a message naming the
    key; the device passes its own ConfigError so its callers keep catching what they always caught.
    """
    if not isinstance(data, Mapping):
        raise error(f"{prefix or 'config'} must be a table, not {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise error(f"unknown key '{where}' (known: {', '.join(sorted(fields))})")
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        values[name] = _convert(hints[name], value, key, fields[name].metadata, error)
    try:
        return cls(**values)
    except SettingsError as exc:
        # A cross-field rule in __post_init__: its message names the keys already.
        raise error(str(exc)) from None
    except (TypeError, ValueError) as exc:
        raise error(f"{prefix or 'config'}: {exc}") from exc


def _convert(hint: Any, value: Any, key: str, meta: Mapping[str, Any], error: type[Exception] = SettingsError) -> Any:
    if dataclasses.is_dataclass(hint):
        return config_from_dict(typing.cast(type, hint), value, key, error)
    origin = typing.get_origin(hint)
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise error(f"{key} must be one of {', '.join(map(repr, choices))}, not {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        raise error(f"{key}: union types are not supported in config")  # pragma: no cover
    expected: tuple[type, ...] = (int, float) if hint is float else (hint,)
    # bool is an int subclass in Python, but `max_batch_size = true` is a typo, not a number.
    if (isinstance(value, bool) and hint is not bool) or not isinstance(value, expected):
        raise error(f"{key} must be {hint.__name__}, not {type(value).__name__} ({value!r})")
    if hint is float:
        value = float(typing.cast(float, value))
    low, high = meta.get("min"), meta.get("max")
    if (low is not None and value < low) or (high is not None and value > high):
        raise error(f"{key} = {value!r} is out of range [{low}, {high}]")
    return value


def field_docs(cls: type, prefix: str = "") -> dict[str, tuple[Any, str]]:
    """Every leaf key of the settings class `cls` as 'section.key' -> (default, documentation)."""
    docs: dict[str, tuple[Any, str]] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        if dataclasses.is_dataclass(hints[f.name]):
            docs.update(field_docs(hints[f.name], key))
        else:
            docs[key] = (f.default, f.metadata.get("doc", ""))
    return docs
