"""What a rollout is: its stages, gates, device order and record, as plain data with their text forms.

Pure (no store, no I/O): `parse_stages` / `parse_gates` check what an operator wrote, `stage_devices` says which
devices a stage holds, `rollout_targets` what a rollout asks of each device. Not the store (store.py), the
transitions (service.py) nor the gate verdicts (gates.py).
"""

from __future__ import annotations

import hashlib
import itertools
import math
import re
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

from cloud_sync.errors import InvalidArgument
from cloud_sync.selectors import format_selector, matches

__all__ = [
    "ACTIVE_STATES",
    "EVENT_KINDS",
    "STATES",
    "Gates",
    "Rollout",
    "RolloutEvent",
    "RolloutTarget",
    "Stage",
    "Variant",
    "check_variant_plan",
    "format_gates",
    "format_stages",
    "new_rollout_id",
    "parse_gates",
    "parse_stages",
    "rank",
    "rollout_targets",
    "stage_devices",
    "variant_assignment_refusal",
    "variant_of",
]

Mode = Literal["shadow", "active"]
State = Literal["running", "paused", "completed", "aborted"]
STATES: tuple[State, ...] = ("running", "paused", "completed", "aborted")
# The states in which a rollout shapes desired states (and blocks another rollout of the model on its devices).
ACTIVE_STATES: tuple[State, ...] = ("running", "paused")
EVENT_KINDS = ("created", "advanced", "paused", "resumed", "aborted", "completed", "promoted", "gate_failed")
ACTORS = ("gate", "operator", "controller")

MAX_STAGES = 20
MAX_BAKE_S = 7 * 24 * 3600.0
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}
_BAKE = re.compile(r"(\d+(?:\.\d+)?)([smh]?)")
_PERCENT = re.compile(r"(\d+(?:\.\d+)?)%?")
_ID = re.compile(r"ro-[0-9a-f]{10}")
MAX_REASON_CHARS = 1000


@dataclass(frozen=True)
class RolloutTarget:
    """What a running rollout asks of one device (rollout_targets below; compute_desired applies it): run `model` at
    `version` ACTIVE in place of its assignment, or SHADOW beside it on `shadow_sample_rate` of its requests."""

    model: str
    version: int
    role: Literal["active", "shadow"]
    rollout_id: str
    shadow_sample_rate: float = 0.0


@dataclass(frozen=True)
class Stage:
    """Run the candidate as `mode` on the first `percent` % of the devices (by rank) for at least `bake_s`."""

    mode: Mode
    percent: float
    bake_s: float = 0.0

    def text(self) -> str:
        bake = f":{_number(self.bake_s)}s" if self.bake_s else ""
        return f"{self.mode}:{_number(self.percent)}%{bake}"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _stage_term(term: str) -> Stage:
    parts = [part.strip() for part in term.split(":")]
    if len(parts) not in (2, 3) or parts[0] not in ("shadow", "active"):
        raise InvalidArgument(
            f"stage {term!r}: write MODE:PERCENT%[:BAKE] with MODE shadow or active (e.g. shadow:10%:60s)"
        )
    found = _PERCENT.fullmatch(parts[1])
    percent = float(found.group(1)) if found else math.nan
    if not 0 < percent <= 100:
        raise InvalidArgument(f"stage {term!r}: the percent must be a number within (0, 100]")
    bake = 0.0
    if len(parts) == 3:
        found = _BAKE.fullmatch(parts[2])
        if found is None:
            raise InvalidArgument(f"stage {term!r}: the bake time is a number with unit s, m or h (e.g. 60s, 5m)")
        bake = float(found.group(1)) * _UNITS[found.group(2) or "s"]
        if bake > MAX_BAKE_S:
            raise InvalidArgument(f"stage {term!r}: a bake time of at most {int(MAX_BAKE_S)} s (7 days)")
    mode: Mode = "shadow" if parts[0] == "shadow" else "active"
    return Stage(mode, percent, bake)


def _stage_object(item: object) -> Stage:
    if isinstance(item, str):
        return _stage_term(item)
    if not isinstance(item, Mapping) or set(item) - {"mode", "percent", "bake_s"}:
        raise InvalidArgument(f"stage {item!r}: an object of mode, percent and bake_s, or text such as shadow:10%:60s")
    mode, percent, bake = item.get("mode"), item.get("percent"), item.get("bake_s", 0)
    for value in (percent, bake):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InvalidArgument(f"stage {dict(item)!r}: percent and bake_s must be numbers")
    return _stage_term(f"{mode}:{percent}%:{bake}s")


def parse_stages(value: str | Sequence[object]) -> list[Stage]:
    """Stages from `shadow:10%:60s,active:10%:60s,active:100%` (or a list of such terms or objects).

    Raises InvalidArgument naming the bad term: at least one stage and at most MAX_STAGES, shadow stages before
    active ones, percents non-decreasing within each mode, the last stage active:100%.
    """
    if isinstance(value, str):
        terms: list[object] = [term for term in value.split(",") if term.strip()]
    elif isinstance(value, Sequence):
        terms = list(value)
    else:
        raise InvalidArgument("stages: text such as shadow:10%:60s,active:100%, or a list of stages")
    if not terms or len(terms) > MAX_STAGES:
        raise InvalidArgument(f"stages: 1 to {MAX_STAGES} stages, ending with active:100%")
    stages = [_stage_object(term) for term in terms]
    for before, after in itertools.pairwise(stages):
        if before.mode == "active" and after.mode == "shadow":
            raise InvalidArgument(f"stage {after.text()!r} comes after an active stage: shadow stages come first")
        if before.mode == after.mode and after.percent < before.percent:
            raise InvalidArgument(f"stage {after.text()!r}: percents may not decrease ({before.text()} before it)")
    if stages[-1].mode != "active" or stages[-1].percent != 100:
        raise InvalidArgument(f"the last stage is {stages[-1].text()!r}: it must be active:100%")
    return stages


def format_stages(stages: Iterable[Stage]) -> str:
    return ",".join(stage.text() for stage in stages)


@dataclass(frozen=True)
class Gates:
    """What B must show on a stage's devices to move on; None: that gate is off."""

    max_error_rate: float | None = None
    max_p99_ratio: float | None = None
    min_shadow_agreement: float | None = None
    min_devices: int = 1
    max_apply_failures: int = 0
    max_fallback_rate: float | None = None
    min_requests: int = 1

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


_RATES = ("max_error_rate", "min_shadow_agreement", "max_fallback_rate")
_COUNTS = {"min_devices": 1, "max_apply_failures": 0, "min_requests": 1}
_GATE_NAMES = tuple(f.name for f in fields(Gates))


def _gate_value(name: str, raw: object) -> float | int | None:
    where = f"gate {name}={raw!r}"
    if raw is None or (isinstance(raw, str) and raw.strip().lower() in ("", "none", "off")):
        if name in _COUNTS:
            raise InvalidArgument(f"{where}: {name} cannot be turned off (an integer >= {_COUNTS[name]})")
        return None
    if isinstance(raw, bool):
        raise InvalidArgument(f"{where}: a number")
    try:
        number = float(raw) if isinstance(raw, (str, int, float)) else math.nan
    except ValueError:
        number = math.nan
    if name in _COUNTS:
        if not (math.isfinite(number) and number.is_integer()):
            raise InvalidArgument(f"{where}: an integer >= {_COUNTS[name]}")
        if not _COUNTS[name] <= number <= 1_000_000:
            raise InvalidArgument(f"{where}: an integer within {_COUNTS[name]}..1000000")
        return int(number)
    if name in _RATES and not 0 <= number <= 1:
        raise InvalidArgument(f"{where}: a rate within 0..1 (e.g. 0.01)")
    if name == "max_p99_ratio" and not 0 < number <= 1000:
        raise InvalidArgument(f"{where}: a ratio above 0 (e.g. 1.5: B's p99 at most 1.5 x A's)")
    return number


def parse_gates(value: str | Mapping[str, object] | None) -> Gates:
    """Gates from `max_error_rate=0.01,max_p99_ratio=1.5,min_devices=1` (or an object); InvalidArgument names the
    bad or unknown key. Keys left out keep their defaults (rate and ratio gates off)."""
    if value is None:
        return Gates()
    items: list[tuple[str, object]]
    if isinstance(value, str):
        items = []
        for term in (t.strip() for t in value.split(",")):
            if not term:
                continue
            key, sep, raw = term.partition("=")
            if not sep:
                raise InvalidArgument(f"gate {term!r} is not key=value (e.g. max_error_rate=0.01)")
            items.append((key.strip(), raw.strip()))
    elif isinstance(value, Mapping):
        items = [(str(key), raw) for key, raw in value.items()]
    else:
        raise InvalidArgument("gates: text such as max_error_rate=0.01,min_devices=1, or an object")
    found: dict[str, Any] = {}
    for name, given in items:
        if name not in _GATE_NAMES:
            raise InvalidArgument(f"unknown gate {name!r} (gates: {', '.join(_GATE_NAMES)})")
        if name in found:
            raise InvalidArgument(f"gate {name!r} is given twice")
        found[name] = _gate_value(name, given)
    return Gates(**found)


def format_gates(gates: Gates) -> str:
    return ",".join(f"{k}={_number(v)}" for k, v in asdict(gates).items() if v is not None)


def rank(rollout_id: str, device_id: str) -> int:
    """A device's place in a rollout's order: stable, and unrelated between rollouts."""
    return int.from_bytes(hashlib.sha256(f"{rollout_id}/{device_id}".encode()).digest()[:8], "big")


def stage_devices(rollout_id: str, device_ids: Iterable[str], percent: float) -> list[str]:
    """The first ceil(percent/100 x N) of `device_ids` by rank: each stage holds the previous one's devices."""
    ordered = sorted(set(device_ids), key=lambda d: (rank(rollout_id, d), d))
    # round() first: 10% of 30 is 3.0000000000000004 in floats, which ceil would make 4.
    count = math.ceil(round(percent / 100 * len(ordered), 9))
    return ordered[:count]


def new_rollout_id() -> str:
    return f"ro-{secrets.token_hex(5)}"


def check_rollout_id(rollout_id: object) -> str:
    if not isinstance(rollout_id, str) or not _ID.fullmatch(rollout_id):
        raise InvalidArgument(f"invalid rollout id {str(rollout_id)[:64]!r}: ro- and 10 hex digits")
    return rollout_id


@dataclass(frozen=True)
class Rollout:
    """One rollout of `model` from `from_version` (A) to `to_version` (B) on the devices `selector` picks."""

    id: str
    model: str
    from_version: int
    to_version: int
    selector: dict[str, str]
    stages: list[Stage]
    gates: Gates
    shadow_sample_rate: float
    state: State
    stage_index: int
    stage_started_at_ms: int
    created_at_ms: int
    updated_at_ms: int
    reason: str = ""
    last_evaluation: dict[str, Any] | None = None

    @property
    def stage(self) -> Stage:
        return self.stages[self.stage_index]

    @property
    def last_stage(self) -> bool:
        return self.stage_index == len(self.stages) - 1

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "model": self.model,
            "from_version": self.from_version,
            "to_version": self.to_version,
            "selector": dict(self.selector),
            "selector_text": format_selector(self.selector),
            "stages": [asdict(stage) for stage in self.stages],
            "stages_text": format_stages(self.stages),
            "gates": self.gates.to_json(),
            "gates_text": format_gates(self.gates),
            "shadow_sample_rate": self.shadow_sample_rate,
            "state": self.state,
            "stage_index": self.stage_index,
            "stage_started_at_ms": self.stage_started_at_ms,
            "created_at_ms": self.created_at_ms,
            "updated_at_ms": self.updated_at_ms,
            "reason": self.reason,
            "last_evaluation": self.last_evaluation,
        }


@dataclass(frozen=True)
class RolloutEvent:
    """A transition of a rollout: who (`actor`) did what (`kind`), why, and the figures that decided it."""

    id: int
    rollout_id: str
    at_ms: int
    kind: str
    actor: str
    reason: str
    values: dict[str, Any] = field(default_factory=dict)
    stage_index: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def rollout_targets(rollout: Rollout, fleet: Mapping[str, Mapping[str, str]]) -> dict[str, RolloutTarget]:
    """What a running or paused rollout asks of each device of `fleet` (device id -> labels) in its current stage.

    Devices the selector matches but the stage does not hold get nothing (they keep what the assignment says);
    a finished rollout asks nothing of anyone.
    """
    if rollout.state not in ACTIVE_STATES:
        return {}
    matched = [device_id for device_id, labels in fleet.items() if matches(rollout.selector, labels)]
    stage = rollout.stage
    target = RolloutTarget(
        model=rollout.model,
        version=rollout.to_version,
        role=stage.mode,
        rollout_id=rollout.id,
        shadow_sample_rate=rollout.shadow_sample_rate if stage.mode == "shadow" else 0.0,
    )
    return {device_id: target for device_id in stage_devices(rollout.id, matched, stage.percent)}


# A plan offered in a refusal's message: the variant shadows beside what runs before it answers anyone.
VARIANT_PLAN_EXAMPLE = "shadow:100%:10m,active:10%:10m,active:100%"


@dataclass(frozen=True)
class Variant:
    """A registered version's manifest `lineage`: made from `parent_version` of the same model by `method`."""

    parent_version: int | None
    method: str
    precision: str

    def describe(self, model: str) -> str:
        """e.g. "int8 of digits:2", or "int8-static of an unknown parent"."""
        made = self.precision or self.method or "compressed"
        parent = f"{model}:{self.parent_version}" if self.parent_version is not None else "an unknown parent"
        return f"{made} of {parent}"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def variant_of(manifest: Mapping[str, Any]) -> Variant | None:
    """The lineage of a registered manifest, or None when it is no variant.

    Read leniently: the registry checks only the fields it relies on, so a lineage it holds may be malformed
    (the device refuses such a package); any `lineage` still makes the version a variant to prove first.
    """
    lineage = manifest.get("lineage")
    if lineage is None:
        return None
    if not isinstance(lineage, Mapping):
        return Variant(None, "", "")
    parent = lineage.get("parent")
    version = parent.get("version") if isinstance(parent, Mapping) else None
    method, precision = lineage.get("method"), lineage.get("precision")
    return Variant(
        version if isinstance(version, int) and not isinstance(version, bool) else None,
        method if isinstance(method, str) else "",
        precision if isinstance(precision, str) else "",
    )


def check_variant_plan(model: str, version: int, variant: Variant, stages: Sequence[Stage], gates: Gates) -> None:
    """InvalidArgument unless a rollout to the variant `model:version` is proven before it answers anyone: its
    first stage a shadow one (agreement with what the devices run, on their live inputs) with the shadow
    agreement gate on (a shadow stage without it proves nothing)."""
    what = f"{model}:{version} is a compressed variant ({variant.describe(model)})"
    if not stages or stages[0].mode != "shadow":
        raise InvalidArgument(f"{what}: its plan needs a shadow stage first, e.g. {VARIANT_PLAN_EXAMPLE!r} (stages)")
    if gates.min_shadow_agreement is None:
        raise InvalidArgument(
            f"{what}: its shadow stage must be judged by the agreement gate, e.g. min_shadow_agreement=0.95 (gates)"
        )


def variant_assignment_refusal(model: str, version: int, variant: Variant) -> str:
    """Why assigning the variant `model:version` by hand is refused (unless forced)."""
    return (
        f"{model}:{version} is a compressed variant ({variant.describe(model)}): roll it out through a shadow stage "
        f"(fleetctl rollouts create --model {model} --to {version} --stages {VARIANT_PLAN_EXAMPLE} "
        "--gates min_shadow_agreement=0.95,...), or assign it with force (fleetctl models assign --force) "
        "to skip that proof"
    )
