"""Fleet-wide scaling policies: validating a policy document, and the effective policy of a device.

Pure functions over plain data (no store, no I/O): the store keeps policies (store/policies.py), the desired
state carries a device's effective policy (desired.py), the agent applies it. A document is checked with the
device's own types (edgefleet/policy.py), so what the cloud accepts is what the agent can apply.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cloud_sync.errors import InvalidArgument
from cloud_sync.selectors import Selector, matches
from edgefleet.policy import MAX_POLICY_BYTES, POLICY_SECTIONS, EffectivePolicy, overlay_policy
from edgefleet.settings import SettingsError, _convert

__all__ = [
    "MAX_PRIORITY",
    "Policy",
    "PolicyInvalid",
    "check_document",
    "check_policy_name",
    "check_priority",
    "effective_policy",
    "matching_policies",
    "policy_hash",
    "policy_json",
]

# Same alphabet as model names (edge_runtime/models/package.py): policy names appear in URLs and CLI output.
_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
MAX_PRIORITY = 1_000_000


class PolicyInvalid(InvalidArgument):
    """A policy document (or its name, selector, priority) is refused; `field` names where, as a dotted path."""

    def __init__(self, field: str, message: str = "") -> None:
        super().__init__(f"{field}: {message}" if message else field)
        self.field = field


@dataclass(frozen=True)
class Policy:
    """A stored policy: a document of policy sections for the devices its selector matches."""

    name: str
    version: int
    selector: Selector
    priority: int
    document: dict[str, dict[str, Any]]
    updated_at_ms: int


def check_policy_name(name: Any) -> str:
    """`name` if it is a valid policy name; PolicyInvalid saying what is allowed otherwise."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise PolicyInvalid(
            "name", f"{name!r} is not a policy name: 1-63 characters of a-z 0-9 . _ -, starting with a letter or digit"
        )
    return name


def check_priority(priority: Any) -> int:
    if isinstance(priority, bool) or not isinstance(priority, int) or not 0 <= priority <= MAX_PRIORITY:
        raise PolicyInvalid("priority", f"must be an integer in 0..{MAX_PRIORITY}, not {priority!r}")
    return priority


def check_document(doc: Any, field: str = "document") -> dict[str, dict[str, Any]]:
    """The document in canonical form (numbers as the device reads them, no empty sections) if the agent's own
    loader accepts it over the default config; PolicyInvalid naming the first bad key otherwise.

    Each key is checked alone first (unknown key, type, range: the field is then exact), then each section as a
    whole for the rules that span keys (inference.default_priority within priority_levels). Cross-key rules are
    checked over the defaults: a document that relies on a device's config file for them is refused here, so
    set both keys in the document.
    """
    if not isinstance(doc, Mapping):
        raise PolicyInvalid(field, f"must be an object of policy sections ({', '.join(POLICY_SECTIONS)})")
    canonical: dict[str, dict[str, Any]] = {}
    for section, keys in doc.items():
        where = f"{field}.{section}"
        if section not in POLICY_SECTIONS:
            raise PolicyInvalid(where, f"unknown policy section (policy sections: {', '.join(POLICY_SECTIONS)})")
        if not isinstance(keys, Mapping):
            raise PolicyInvalid(where, "must be an object of that section's keys")
        checked = {key: _check_key(section, key, value, f"{where}.{key}") for key, value in keys.items()}
        try:
            overlay_policy({section: checked}, EffectivePolicy())
        except SettingsError as exc:
            raise PolicyInvalid(where, str(exc)) from None
        if checked:
            canonical[section] = checked
    if len(policy_json(canonical).encode()) > MAX_POLICY_BYTES:
        raise PolicyInvalid(field, f"is past the {MAX_POLICY_BYTES}-byte limit of a policy document")
    return canonical


def _check_key(section: str, key: Any, value: Any, where: str) -> Any:
    """One key of a section, as the device's loader converts it (types, bounds); the rules spanning keys are
    the section's (checked once the whole document is read)."""
    cls = type(getattr(EffectivePolicy(), section))
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if key not in fields:
        raise PolicyInvalid(where, f"unknown key (known: {', '.join(sorted(fields))})")
    if isinstance(value, float) and not math.isfinite(value):
        raise PolicyInvalid(where, f"must be a finite number, not {value!r}")
    try:
        return _convert(typing.get_type_hints(cls)[key], value, f"{section}.{key}", fields[key].metadata)
    except SettingsError as exc:
        raise PolicyInvalid(where, _detail(str(exc), f"{section}.{key}")) from None


def _detail(message: str, key: str) -> str:
    """The loader's message without the key it starts with (PolicyInvalid puts the key in front)."""
    if message.startswith(key):
        return message[len(key) :].lstrip(" =")
    return message


def matching_policies(labels: Mapping[str, str], policies: Iterable[Policy]) -> list[Policy]:
    """The policies whose selector matches `labels`, in the order they are applied: ascending priority, ties
    by name (so the higher priority, then the later name, wins a key both set)."""
    return sorted((p for p in policies if matches(p.selector, labels)), key=lambda p: (p.priority, p.name))


def effective_policy(labels: Mapping[str, str], policies: Sequence[Policy] | Iterable[Policy]) -> dict[str, Any]:
    """The policy document a device with `labels` runs: {} (its own config file) overlaid key by key by every
    matching policy in applied order (matching_policies)."""
    effective: dict[str, dict[str, Any]] = {}
    for policy in matching_policies(labels, policies):
        for section, keys in policy.document.items():
            effective.setdefault(section, {}).update(keys)
    return effective


def policy_json(doc: Mapping[str, Any]) -> str:
    """The canonical JSON text of a policy document (sorted keys, no spaces): what DesiredState.policy_json
    carries, and what policy_hash hashes."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def policy_hash(doc: Mapping[str, Any]) -> str:
    """The first 16 hex digits of the sha256 of the document's canonical JSON: equal documents, equal hashes."""
    return hashlib.sha256(policy_json(doc).encode()).hexdigest()[:16]
