"""Rollouts as operators and the controller drive them: create, pause, resume, abort, promote, advance.

Every transition is one checked transaction (store.py) that writes its event; then the reconciler recomputes
desired states. What the API and fleetctl call (cloud_sync/api_rollouts.py). Not the gate loop (controller.py).
"""

from __future__ import annotations

import builtins
import math
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import structlog

from cloud_sync.desired import winning_assignments
from cloud_sync.errors import FailedPrecondition, InvalidArgument
from cloud_sync.rollouts.plan import (
    ACTORS,
    MAX_REASON_CHARS,
    STATES,
    Gates,
    Rollout,
    RolloutEvent,
    Stage,
    State,
    Variant,
    check_variant_plan,
    new_rollout_id,
    parse_gates,
    parse_stages,
    stage_devices,
    variant_of,
)
from cloud_sync.rollouts.store import EventDraft, RolloutStore, completion_assignment
from cloud_sync.selectors import check_selector, format_selector, matches
from cloud_sync.store.assignments import AssignmentStore, check_model_name
from cloud_sync.store.audit import AuditDraft
from cloud_sync.store.database import Database, now_ms
from cloud_sync.store.devices import DeviceRegistry

__all__ = ["RolloutService"]

log = structlog.get_logger(__name__)


class Changes(Protocol):
    """What the service needs of the reconciler: recompute every device after a transition."""

    def on_change(self) -> None: ...


class VersionCatalog(Protocol):
    """What the service needs of the registry (ModelRegistry): the versions it holds."""

    def digests(self) -> dict[tuple[str, int], str]: ...


class RegisteredVersion(Protocol):
    @property
    def manifest(self) -> dict[str, Any]: ...


@runtime_checkable
class ManifestCatalog(Protocol):
    """A catalog that also gives a version's registered manifest (ModelRegistry): what tells a variant."""

    def digests(self) -> dict[tuple[str, int], str]: ...

    def get(self, name: str, version: int) -> RegisteredVersion: ...


def _check_reason(reason: object) -> str:
    if not isinstance(reason, str) or len(reason) > MAX_REASON_CHARS:
        raise InvalidArgument(f"reason: text of at most {MAX_REASON_CHARS} characters")
    return reason


def _check_actor(actor: str) -> str:
    if actor not in ACTORS:
        raise InvalidArgument(f"actor {actor!r}: one of {', '.join(ACTORS)}")
    return actor


def _check_rate(rate: object) -> float:
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 < rate <= 1 or math.isnan(rate):
        raise InvalidArgument(f"shadow_sample_rate {rate!r}: a share of requests within (0, 1], e.g. 0.1")
    return float(rate)


class RolloutService:
    """The rollouts of one cloud store. Thread-safe; synchronous (call it off the event loop)."""

    def __init__(
        self,
        db: Database,
        reconciler: Changes,
        assignments: AssignmentStore,
        registry: VersionCatalog,
        devices: DeviceRegistry,
    ) -> None:
        self.store = RolloutStore(db)
        self._reconciler = reconciler
        self._assignments = assignments
        self._registry = registry
        self._devices = devices

    @property
    def db(self) -> Database:
        return self.store.db

    # -- reading ------------------------------------------------------------------------------------------

    def get(self, rollout_id: str) -> Rollout:
        return self.store.get(rollout_id)

    def list(self, state: str | None = None) -> builtins.list[Rollout]:
        for known in STATES:
            if state == known:
                return self.store.list(known)
        if state is not None:
            raise InvalidArgument(f"state {state!r}: one of {', '.join(STATES)}")
        return self.store.list()

    def in_progress(self) -> builtins.list[Rollout]:
        return self.store.in_progress()

    def events(self, rollout_id: str, after_id: int = 0) -> builtins.list[RolloutEvent]:
        if isinstance(after_id, bool) or not isinstance(after_id, int) or after_id < 0:
            raise InvalidArgument(f"after_id {after_id!r}: an event id >= 0")
        return self.store.events(rollout_id, after_id)

    def matched_devices(self, rollout: Rollout) -> builtins.list[str]:
        """The non-revoked devices the rollout's selector matches now (what stage percents are shares of)."""
        return sorted(
            d.device_id for d in self._devices.list_devices() if not d.revoked and matches(rollout.selector, d.labels)
        )

    def stage_devices(self, rollout: Rollout, index: int | None = None) -> builtins.list[str]:
        """The devices stage `index` (the current one if None) holds now."""
        stage = rollout.stages[rollout.stage_index if index is None else index]
        return stage_devices(rollout.id, self.matched_devices(rollout), stage.percent)

    def progress(self, rollout_id: str) -> dict[str, Any]:
        """The rollout, the devices of each stage (count; the current stage's ids) and its last evaluation."""
        rollout = self.get(rollout_id)
        matched = self.matched_devices(rollout)
        stages = []
        for index, stage in enumerate(rollout.stages):
            if rollout.state == "completed" or index < rollout.stage_index:
                status = "done"
            elif index == rollout.stage_index:
                status = "aborted" if rollout.state == "aborted" else "current"
            else:
                status = "pending"
            count = len(stage_devices(rollout.id, matched, stage.percent))
            stages.append(
                {"index": index, "text": stage.text(), **_stage_json(stage), "devices": count, "status": status}
            )
        return {
            **rollout.to_json(),
            "matched_devices": len(matched),
            "stage_devices": stage_devices(rollout.id, matched, rollout.stage.percent),
            "progress": stages,
        }

    # -- creating -----------------------------------------------------------------------------------------

    def create(
        self,
        model: str,
        to_version: int,
        selector: Mapping[str, str],
        stages: str | Sequence[object],
        gates: str | Mapping[str, object] | Gates | None = None,
        shadow_sample_rate: float = 0.1,
        by: str | None = None,
    ) -> Rollout:
        """Start a rollout of `model` to `to_version` on the devices `selector` picks, at its first stage.

        from_version is what those devices' assignments name now. InvalidArgument for a malformed field, an
        unknown version, or a compressed variant (its manifest has `lineage`) whose plan does not shadow it
        first under the agreement gate (plan.check_variant_plan); FailedPrecondition when the devices run no
        single version of the model, run `to_version` already, or another rollout of the model is in progress
        on some of them. `by`: who asks (a token's name), for the audit log.
        """
        check_model_name(model)
        if isinstance(to_version, bool) or not isinstance(to_version, int) or not 0 < to_version < 2**31:
            raise InvalidArgument(f"to_version {to_version!r}: a positive integer below 2^31")
        checked = check_selector(selector)
        if isinstance(stages, builtins.list) and stages and all(isinstance(s, Stage) for s in stages):
            checked_stages = parse_stages(",".join(s.text() for s in stages))  # checked as if written
        else:
            checked_stages = parse_stages(stages)
        checked_gates = gates if isinstance(gates, Gates) else parse_gates(gates)
        rate = _check_rate(shadow_sample_rate)
        if (model, to_version) not in self._registry.digests():
            raise InvalidArgument(
                f"model {model}:{to_version} is not in the registry: push it with fleetctl models push"
            )
        variant = self.variant(model, to_version)
        if variant is not None:
            check_variant_plan(model, to_version, variant, checked_stages, checked_gates)
        from_version, _ = self._assigned_version(model, checked)
        if from_version == to_version:
            raise FailedPrecondition(
                f"the devices of selector {format_selector(checked)} run {model}:{to_version} already"
            )
        stamp = now_ms()
        rollout = Rollout(
            id=new_rollout_id(),
            model=model,
            from_version=from_version,
            to_version=to_version,
            selector=checked,
            stages=checked_stages,
            gates=checked_gates,
            shadow_sample_rate=rate,
            state="running",
            stage_index=0,
            stage_started_at_ms=stamp,
            created_at_ms=stamp,
            updated_at_ms=stamp,
        )
        reason = f"{model} {from_version} -> {to_version} on {format_selector(checked)}"
        after = {
            "state": "running",
            "stage_index": 0,
            "model": model,
            "from_version": from_version,
            "to_version": to_version,
            "selector": checked,
            "stages": rollout.to_json()["stages_text"],
        }
        created: dict[str, Any] = {"stages": rollout.to_json()["stages_text"]}
        if variant is not None:
            # What the shadow stage compares B with is the devices' A, which need not be B's parent: the record
            # says which it was (a variant of v2 rolled out over v1 is judged against v1).
            created["variant"] = {**variant.to_json(), "from_is_parent": variant.parent_version == from_version}
            after["variant"] = created["variant"]
        audit = AuditDraft(by or "cloud-sync", "rollout.create", f"rollout/{rollout.id}", None, after, reason)
        self.store.insert(rollout, EventDraft("created", "operator", reason, created), audit)
        log.info("rollout.created", rollout=rollout.id, model=model, from_version=from_version, to_version=to_version)
        self._reconciler.on_change()
        return rollout

    def variant(self, model: str, version: int) -> Variant | None:
        """The lineage of the registered `model:version` when it is a compressed variant, else None (also when
        the catalog keeps no manifests)."""
        if not isinstance(self._registry, ManifestCatalog):
            return None
        return variant_of(self._registry.get(model, version).manifest)

    def _assigned_version(self, model: str, selector: dict[str, str]) -> tuple[int, int]:
        """(the one version of `model` the selector's devices are assigned, the highest priority doing so)."""
        assignments = self._assignments.list(model)
        versions: dict[int, int] = {}
        matched = 0
        for device in self._devices.list_devices():
            if device.revoked or not matches(selector, device.labels):
                continue
            matched += 1
            winner = winning_assignments(device.labels, assignments).get(model)
            if winner is not None:
                versions[winner.version] = max(versions.get(winner.version, winner.priority), winner.priority)
        if not matched:
            raise FailedPrecondition(f"selector {format_selector(selector)} matches no device: nothing to roll out to")
        if len(versions) != 1:
            found = ", ".join(str(v) for v in sorted(versions)) or "none"
            raise FailedPrecondition(
                f"the devices of selector {format_selector(selector)} are assigned versions {found} of {model}: "
                "a rollout starts from one version; assign one (fleetctl models assign) or narrow the selector"
            )
        ((version, priority),) = versions.items()
        return version, priority

    # -- transitions --------------------------------------------------------------------------------------

    def pause(self, rollout_id: str, actor: str = "operator", reason: str = "", by: str | None = None) -> Rollout:
        """Stop the gates from moving the rollout; its devices stay as they are. `by`: who (audit log)."""
        seen = self._expect(rollout_id, ("running",), "paused")
        changes = {"state": "paused", "reason": _check_reason(reason)}
        audit = _audit(seen, "rollout.pause", by, changes, reason)
        return self._move(seen, changes, [_draft("paused", actor, reason)], audit)

    def resume(self, rollout_id: str, actor: str = "operator", reason: str = "", by: str | None = None) -> Rollout:
        """Let the gates move a paused rollout again; the bake time of the stage starts over."""
        seen = self._expect(rollout_id, ("paused",), "resumed")
        changes = {"state": "running", "reason": _check_reason(reason), "stage_started_at_ms": now_ms()}
        audit = _audit(seen, "rollout.resume", by, changes, reason)
        return self._move(seen, changes, [_draft("resumed", actor, reason)], audit)

    def abort(
        self,
        rollout_id: str,
        actor: str = "operator",
        reason: str = "",
        values: dict[str, Any] | None = None,
        by: str | None = None,
    ) -> Rollout:
        """End the rollout: every device it touched goes back to A (what the assignment says)."""
        seen = self._expect(rollout_id, ("running", "paused"), "aborted")
        return self.abort_seen(seen, actor, reason, values, by=by)

    def abort_seen(
        self,
        seen: Rollout,
        actor: str,
        reason: str,
        values: dict[str, Any] | None = None,
        failed_gate: str | None = None,
        by: str | None = None,
    ) -> Rollout:
        """Abort `seen` if it is still where it was seen (the controller's abort after a failed gate).

        The audit record's actor is `by`, else `gate:<failed_gate>` (with the gate's value and threshold in
        its `after`), else the controller for a gate's abort."""
        events = [_draft("aborted", actor, reason, values)]
        changes = {"state": "aborted", "reason": _check_reason(reason)}
        extra: dict[str, Any] = {}
        if failed_gate is not None:
            events.insert(0, _draft("gate_failed", actor, reason, {"gate": failed_gate, **(values or {})}))
            measured = ((values or {}).get("gates") or {}).get(failed_gate) or {}
            extra = {"gate": failed_gate, "value": measured.get("value"), "threshold": measured.get("threshold")}
            by = by or f"gate:{failed_gate}"
        audit = _audit(seen, "rollout.abort", by or _automatic(actor), changes, reason, extra)
        return self._move(seen, changes, events, audit)

    def promote(self, rollout_id: str, actor: str = "operator", reason: str = "", by: str | None = None) -> Rollout:
        """Move to the next stage now, skipping the gates (complete after the last); running or paused."""
        seen = self._expect(rollout_id, ("running", "paused"), "promoted")
        return self.advance_seen(seen, actor, reason or "promoted by hand", kind="promoted", by=by)

    def advance_seen(
        self,
        seen: Rollout,
        actor: str,
        reason: str,
        values: dict[str, Any] | None = None,
        kind: str = "advanced",
        by: str | None = None,
    ) -> Rollout:
        """Move `seen` to its next stage, or complete it after the last, if it is still where it was seen.

        The audit record: rollout.promote by `by` for a promotion, else rollout.advance (rollout.complete after
        the last stage) by the controller."""
        _check_reason(reason)
        action = "rollout.complete" if seen.last_stage else "rollout.advance"
        action = "rollout.promote" if kind == "promoted" else action
        who = by or _automatic(actor)
        if seen.last_stage:
            priority = self._winning_priority(seen)
            assign = completion_assignment(seen.model, seen.to_version, seen.selector, priority)
            events = [_draft(kind, actor, reason, values), _draft("completed", actor, reason, values)]
            changes: dict[str, Any] = {"state": "completed", "reason": reason}
            audit = _audit(seen, action, who, changes, reason)
            moved = self.store.transition(seen, changes, events, assign, audit)
        else:
            changes = {"stage_index": seen.stage_index + 1, "stage_started_at_ms": now_ms(), "reason": reason}
            audit = _audit(seen, action, who, changes, reason)
            moved = self.store.transition(seen, changes, [_draft(kind, actor, reason, values)], audit=audit)
        log.info("rollout.moved", rollout=seen.id, kind=kind, actor=actor, state=moved.state, stage=moved.stage_index)
        self._reconciler.on_change()
        return moved

    def _winning_priority(self, rollout: Rollout) -> int:
        """The priority B's assignment needs to win on the rollout's devices: that of the assignments of the
        model winning there now (the newer assignment wins a tie), 0 when none does."""
        assignments = self._assignments.list(rollout.model)
        priorities = [
            winner.priority
            for device in self._devices.list_devices()
            if not device.revoked and matches(rollout.selector, device.labels)
            for winner in [winning_assignments(device.labels, assignments).get(rollout.model)]
            if winner is not None
        ]
        return max(priorities, default=0)

    def _expect(self, rollout_id: str, states: tuple[State, ...], verb: str) -> Rollout:
        rollout = self.get(rollout_id)
        if rollout.state not in states:
            raise FailedPrecondition(
                f"rollout {rollout_id} is {rollout.state}: only a {' or '.join(states)} rollout can be {verb}"
            )
        return rollout

    def _move(
        self, seen: Rollout, changes: dict[str, Any], events: builtins.list[EventDraft], audit: AuditDraft
    ) -> Rollout:
        moved = self.store.transition(seen, changes, events, audit=audit)
        log.info("rollout.moved", rollout=seen.id, kind=events[-1].kind, actor=events[-1].actor, state=moved.state)
        self._reconciler.on_change()
        return moved

    def record_evaluation(self, seen: Rollout, evaluation: dict[str, Any]) -> bool:
        return self.store.record_evaluation(seen, evaluation)


def _automatic(actor: str) -> str:
    """The audit actor of a transition no person asked for: the controller's (its gates), else cloud-sync."""
    return "controller" if actor in ("gate", "controller") else "cloud-sync"


def _audit(
    seen: Rollout,
    action: str,
    by: str | None,
    changes: dict[str, Any],
    reason: str,
    extra: dict[str, Any] | None = None,
) -> AuditDraft:
    """The audit record of a transition of `seen`: its state and stage before and after."""
    before = {"state": seen.state, "stage_index": seen.stage_index}
    after = {
        "state": changes.get("state", seen.state),
        "stage_index": changes.get("stage_index", seen.stage_index),
        **(extra or {}),
    }
    return AuditDraft(by or "cloud-sync", action, f"rollout/{seen.id}", before, after, reason)


def _draft(kind: str, actor: str, reason: str, values: dict[str, Any] | None = None) -> EventDraft:
    return EventDraft(kind, _check_actor(actor), _check_reason(reason), dict(values or {}))


def _stage_json(stage: Stage) -> dict[str, Any]:
    return {"mode": stage.mode, "percent": stage.percent, "bake_s": stage.bake_s}
