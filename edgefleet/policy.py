"""Scaling policies: the config sections the cloud may set live, and the JSON document that sets them.

Shared by the device (which applies a policy: edge_runtime/policy.py, Agent.apply_policy) and the cloud (which
validates a policy before storing it: cloud_sync/policies.py), so both check a document with the same types,
bounds and messages. Pure: parsing, overlaying and comparing; nothing here applies a policy.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from edgefleet.settings import SettingsError, config_from_dict, option

__all__ = [
    "MAX_POLICY_BYTES",
    "POLICY_SECTIONS",
    "UNCERTAINTY_MEASURES",
    "BufferPolicy",
    "EffectivePolicy",
    "InferencePolicy",
    "PolicyChange",
    "SamplesPolicy",
    "TelemetryPolicy",
    "UploadPolicy",
    "overlay_policy",
    "parse_policy",
]


@dataclass(frozen=True)
class InferencePolicy:
    max_batch_size: int = option(
        32, "Largest batch the batcher forms (the model's own limit also applies).", min=1, max=4096
    )
    max_queue_delay_ms: float = option(
        0.0,
        "How long a free engine waits for more requests to fill a batch; 0 runs what is queued at once.",
        min=0,
        max=10_000,
    )
    instances: int = option(1, "Engine workers per model version (requests run in parallel).", min=1, max=64)
    max_queue_depth: int = option(
        256,
        "Requests waiting per model version; beyond it requests get RESOURCE_EXHAUSTED.",
        min=1,
        max=1 << 20,
    )
    latency_slo_ms: float = option(
        0.0,
        "Per-batch latency target; the batcher picks the batch size and delay that hold it. 0: most throughput.",
        min=0,
        max=600_000,
    )
    priority_levels: int = option(2, "Request priorities 1..N (1 is served first).", min=1, max=16)
    default_priority: int = option(2, "Priority of requests that name none (1..priority_levels).", min=1, max=16)
    default_timeout_ms: float = option(
        0.0, "Queue timeout for requests that set none; 0: no timeout.", min=0, max=3_600_000
    )
    adaptive: bool = option(True, "Profile batch sizes when a model becomes READY and batch only where it pays.")
    run_on_loop: bool = option(
        True,
        "A model with fixed non-batch shapes whose planned batch runs in under 0.2 ms runs on the inference "
        "server's event loop, not an engine thread (no thread hop per batch); false: engine threads only.",
    )

    def __post_init__(self) -> None:
        if self.default_priority > self.priority_levels:
            raise SettingsError(
                f"inference.default_priority ({self.default_priority}) must be within "
                f"1..inference.priority_levels ({self.priority_levels})"
            )


@dataclass(frozen=True)
class UploadPolicy:
    sample_rate: float = option(
        0.0, "Share of requests not marked edgefleet.keep whose input and result are kept anyway (0..1).", min=0, max=1
    )
    batch_max_records: int = option(1000, "Records per upload batch.", min=1, max=100_000)
    interval_s: float = option(
        1.0, "How often the uploader looks for new records when the outbox was drained.", min=0.01, max=3600
    )
    max_bytes_per_s: int = option(0, "Upload bandwidth cap (bytes/s of records); 0: no cap.", min=0, max=2**40)


@dataclass(frozen=True)
class BufferPolicy:
    max_bytes: int = option(
        256 * 1024 * 1024,
        "Outbox bound; past it records are evicted, lowest priority first, then oldest (and counted).",
        min=64 * 1024,
        max=2**44,
    )
    max_age_s: float = option(
        7 * 24 * 3600.0,
        "Records older than this are evicted (and counted); 0: no age limit.",
        min=0,
        max=10 * 365 * 86400,
    )


@dataclass(frozen=True)
class TelemetryPolicy:
    interval_s: float = option(10.0, "How often the agent publishes telemetry.", min=0.1, max=86_400)


# How a classifier's uncertainty is measured on its class probabilities (edge_runtime/inference/hard.py): the
# top-1 probability and the margin p1 - p2 mark a row uncertain below the threshold, the entropy normalised to
# 0..1 above it.
UNCERTAINTY_MEASURES = ("margin", "top1", "entropy")


@dataclass(frozen=True)
class SamplesPolicy:
    """Hard examples: inputs the model was unsure of, or where a shadow candidate disagreed, kept for retraining."""

    hard_bytes_per_window: int = option(
        0,
        "Bytes of hard examples the device may keep per hard_window_s (the records' declared sizes); past it "
        "they are left out and counted as over budget. 0: no hard examples (field inputs leave the device only "
        "when the operator asks).",
        min=0,
        max=2**40,
    )
    hard_window_s: float = option(
        3600.0, "The window the hard-example byte budget is counted over.", min=1, max=7 * 86_400
    )
    measure: str = option(
        "",
        'Uncertainty measure: "margin", "top1" or "entropy"; "" = the one the model declares in its manifest '
        "(extra.uncertainty), else margin.",
    )
    threshold: float = option(
        0.0,
        "A row is uncertain when its top1 or margin is below this, or its entropy (0..1) above it; 0 = the "
        "model's declared threshold, else the measure's default (margin 0.2, top1 0.5, entropy 0.5). Needs "
        "measure: a threshold means something only for one measure.",
        min=0,
        max=1,
    )
    keep_disagreements: bool = option(
        True, "Keep the inputs a shadow candidate answered differently from the active version (within the budget)."
    )

    def __post_init__(self) -> None:
        if self.measure not in ("", *UNCERTAINTY_MEASURES):
            raise SettingsError(
                f'samples.measure must be one of {", ".join(UNCERTAINTY_MEASURES)} or "" (the model\'s own), '
                f"not {self.measure!r}"
            )
        if self.threshold != 0.0 and not self.measure:
            raise SettingsError(
                "samples.threshold needs samples.measure: a threshold means something only for one measure "
                "(models may declare different ones)"
            )


# A full policy document is about 700 bytes; anything far larger is not a policy.
MAX_POLICY_BYTES = 64 * 1024
# The config sections a policy may set: what the agent can change live. engine, server, cloud and mqtt need a
# restart (a new listener, a rebuilt engine), so a policy naming them is refused rather than half-applied.
POLICY_SECTIONS = ("inference", "upload", "buffer", "telemetry", "samples")


class _HasPolicySections(Protocol):
    """What EffectivePolicy.from_config reads of a config: edgefleet does not import edge_runtime."""

    @property
    def inference(self) -> InferencePolicy: ...
    @property
    def upload(self) -> UploadPolicy: ...
    @property
    def buffer(self) -> BufferPolicy: ...
    @property
    def telemetry(self) -> TelemetryPolicy: ...
    @property
    def samples(self) -> SamplesPolicy: ...


@dataclass(frozen=True)
class EffectivePolicy:
    """The policy sections the agent runs with: its config file's, overlaid by the cloud's document."""

    inference: InferencePolicy = field(default_factory=InferencePolicy)
    upload: UploadPolicy = field(default_factory=UploadPolicy)
    buffer: BufferPolicy = field(default_factory=BufferPolicy)
    telemetry: TelemetryPolicy = field(default_factory=TelemetryPolicy)
    samples: SamplesPolicy = field(default_factory=SamplesPolicy)

    @classmethod
    def from_config(cls, config: _HasPolicySections) -> EffectivePolicy:
        """The policy sections of a config (edge_runtime's AgentConfig): what runs before any cloud policy."""
        return cls(config.inference, config.upload, config.buffer, config.telemetry, config.samples)

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
    samples: bool

    @classmethod
    def between(cls, old: EffectivePolicy, new: EffectivePolicy) -> PolicyChange:
        return cls(*(getattr(old, name) != getattr(new, name) for name in POLICY_SECTIONS))

    @property
    def sections(self) -> list[str]:
        return [name for name in POLICY_SECTIONS if getattr(self, name)]


def parse_policy(
    document: str | bytes, base: EffectivePolicy, error: type[Exception] = SettingsError
) -> EffectivePolicy:
    """The effective policy a document (DesiredState.policy_json) asks for, over `base` (the config file's).

    The document is a JSON object of policy sections, each an object of that section's keys, e.g.
    `{"inference": {"max_batch_size": 8}, "telemetry": {"interval_s": 5}}`. A key it leaves out keeps the
    base's value; an empty document means the base itself. Each section is checked by the same loader as the
    TOML config (types, bounds, cross-field rules), so an `error` names the key (`inference.max_batch_sze`).
    """
    if isinstance(document, bytes):
        if len(document) > MAX_POLICY_BYTES:
            raise error(f"policy document of {len(document)} bytes is past the {MAX_POLICY_BYTES}-byte limit")
        try:
            document = document.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise error(f"policy document is not UTF-8: {exc}") from None
    if len(document.encode("utf-8", "surrogatepass")) > MAX_POLICY_BYTES:
        raise error(f"policy document is past the {MAX_POLICY_BYTES}-byte limit")
    if not document.strip():
        return base
    return overlay_policy(_loads(document, error), base, error)


def overlay_policy(data: Any, base: EffectivePolicy, error: type[Exception] = SettingsError) -> EffectivePolicy:
    """`base` overlaid by a decoded policy document (a mapping of sections); checked as parse_policy checks."""
    if not isinstance(data, Mapping):
        raise error(f"policy document must be a JSON object of sections, not {_json_type(data)}")
    unknown = sorted(set(data) - set(POLICY_SECTIONS))
    if unknown:
        raise error(
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
            raise error(f"{name} must be an object of keys, not {_json_type(overlay)}")
        merged = {**dataclasses.asdict(current), **overlay}
        sections[name] = config_from_dict(type(current), merged, name, error)
    return EffectivePolicy(**sections)


def _loads(document: str, error: type[Exception]) -> Any:
    """json.loads without NaN/Infinity (bounds checks pass NaN: every comparison with it is false) and
    without duplicate keys (which one wins is the parser's choice, not the sender's)."""

    def no_constants(name: str) -> Any:
        raise error(f"policy document holds {name}: numbers must be finite")

    def unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                raise error(f"policy document names key '{key}' twice")
            out[key] = value
        return out

    try:
        return json.loads(document, parse_constant=no_constants, object_pairs_hook=unique)
    except json.JSONDecodeError as exc:
        raise error(f"policy document is not valid JSON: {exc}") from None
    except RecursionError:
        raise error("policy document is nested too deeply") from None


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")
