"""Scaling policies from the cloud: a JSON document of the config's policy sections, parsed into an effective policy.

Pure: parsing, overlaying and comparing policies. Applying one to a running agent is `Agent.apply_policy`'s job.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from edge_runtime.config import (
    AgentConfig,
    BufferPolicy,
    InferencePolicy,
    TelemetryPolicy,
    UploadPolicy,
    config_from_dict,
)
from edge_runtime.errors import ConfigError

__all__ = ["MAX_POLICY_BYTES", "POLICY_SECTIONS", "EffectivePolicy", "PolicyChange", "parse_policy"]

# A full policy document is about 700 bytes; anything far larger is not a policy.
MAX_POLICY_BYTES = 64 * 1024
# The config sections a policy may set: what the agent can change live. engine, server, cloud and mqtt need a
# restart (a new listener, a rebuilt engine), so a policy naming them is refused rather than half-applied.
POLICY_SECTIONS = ("inference", "upload", "buffer", "telemetry")


@dataclass(frozen=True)
class EffectivePolicy:
    """The policy sections the agent runs with: its config file's, overlaid by the cloud's document."""

    inference: InferencePolicy = field(default_factory=InferencePolicy)
    upload: UploadPolicy = field(default_factory=UploadPolicy)
    buffer: BufferPolicy = field(default_factory=BufferPolicy)
    telemetry: TelemetryPolicy = field(default_factory=TelemetryPolicy)

    @classmethod
    def from_config(cls, config: AgentConfig) -> EffectivePolicy:
        return cls(config.inference, config.upload, config.buffer, config.telemetry)

    def as_dict(self) -> dict[str, dict[str, Any]]:
        """The policy as the JSON document that would produce it (every key of every section)."""
        return {name: dataclasses.asdict(getattr(self, name)) for name in POLICY_SECTIONS}


@dataclass(frozen=True)
class PolicyChange:
    """Which sections differ between two policies: the agent touches only those."""

    inference: bool
    upload: bool
    buffer: bool
    telemetry: bool

    @classmethod
    def between(cls, old: EffectivePolicy, new: EffectivePolicy) -> PolicyChange:
        return cls(*(getattr(old, name) != getattr(new, name) for name in POLICY_SECTIONS))

    @property
    def sections(self) -> list[str]:
        return [name for name in POLICY_SECTIONS if getattr(self, name)]


def parse_policy(document: str | bytes, base: EffectivePolicy) -> EffectivePolicy:
    """The effective policy a document (DesiredState.policy_json) asks for, over `base` (the config file's).

    The document is a JSON object of policy sections, each an object of that section's keys, e.g.
    `{"inference": {"max_batch_size": 8}, "telemetry": {"interval_s": 5}}`. A key it leaves out keeps the
    base's value; an empty document means the base itself. Each section is checked by the same loader as the
    TOML config (types, bounds, cross-field rules), so a ConfigError names the key (`inference.max_batch_sze`).
    """
    if isinstance(document, bytes):
        if len(document) > MAX_POLICY_BYTES:
            raise ConfigError(f"policy document of {len(document)} bytes is past the {MAX_POLICY_BYTES}-byte limit")
        try:
            document = document.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(f"policy document is not UTF-8: {exc}") from None
    if len(document.encode("utf-8", "surrogatepass")) > MAX_POLICY_BYTES:
        raise ConfigError(f"policy document is past the {MAX_POLICY_BYTES}-byte limit")
    if not document.strip():
        return base
    data = _loads(document)
    if not isinstance(data, Mapping):
        raise ConfigError(f"policy document must be a JSON object of sections, not {_json_type(data)}")
    unknown = sorted(set(data) - set(POLICY_SECTIONS))
    if unknown:
        raise ConfigError(
            f"unknown key '{unknown[0]}' in the policy document (policy sections: {', '.join(POLICY_SECTIONS)})"
        )
    sections: dict[str, Any] = {}
    for name in POLICY_SECTIONS:
        current = getattr(base, name)
        overlay = data.get(name)
        if overlay is None and name not in data:
            sections[name] = current
            continue
        if not isinstance(overlay, Mapping):
            raise ConfigError(f"{name} must be an object of keys, not {_json_type(overlay)}")
        merged = {**dataclasses.asdict(current), **overlay}
        sections[name] = config_from_dict(type(current), merged, name)
    return EffectivePolicy(**sections)


def _loads(document: str) -> Any:
    """json.loads without NaN/Infinity (bounds checks pass NaN: every comparison with it is false) and
    without duplicate keys (which one wins is the parser's choice, not the sender's)."""

    def no_constants(name: str) -> Any:
        raise ConfigError(f"policy document holds {name}: numbers must be finite")

    def unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                raise ConfigError(f"policy document names key '{key}' twice")
            out[key] = value
        return out

    try:
        return json.loads(document, parse_constant=no_constants, object_pairs_hook=unique)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"policy document is not valid JSON: {exc}") from None
    except RecursionError:
        raise ConfigError("policy document is nested too deeply") from None


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")
