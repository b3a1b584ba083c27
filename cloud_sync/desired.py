"""What one device should run: its model versions and policy, computed from assignments, policies and labels.

Pure functions over plain data (no store, no I/O); the reconciler (cloud_sync/reconciler.py) feeds them and
writes the results. Desired states are compared by content (models + policy hash), never by generation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from cloud_sync.policies import Policy, effective_policy, policy_hash, policy_json
from cloud_sync.rollouts.plan import RolloutTarget
from cloud_sync.selectors import format_selector, matches
from cloud_sync.store.assignments import Assignment
from edgefleet.proto.edgefleet.v1.state_pb2 import DesiredState, ModelAssignment, ModelRole

__all__ = ["Desired", "RolloutTarget", "compute_desired", "content_key", "same_content", "winning_assignments"]

# (name, version) -> the registry's sha256 of its model.onnx, or None when the registry has no such version.
VersionLookup = Callable[[str, int], str | None]


@dataclass(frozen=True)
class Desired:
    """A device's computed desired state; `problems` says what could not be honoured (and why)."""

    models: list[ModelAssignment] = field(default_factory=list)
    policy_json: str = ""
    policy_hash: str = ""
    problems: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        """Nothing assigned and no policy: a device that never had a desired state needs none."""
        return not self.models and not self.policy_json

    def to_state(self) -> DesiredState:
        """The DesiredState message (device id, generation and issue time are the store's to set)."""
        state = DesiredState(policy_json=self.policy_json, policy_hash=self.policy_hash)
        state.models.extend(self.models)
        return state


def _rank(assignment: Assignment) -> tuple[int, int, str]:
    # Highest priority, then the latest change; the selector text only makes the order total (deterministic).
    return (assignment.priority, assignment.updated_at_ms, format_selector(assignment.selector))


def winning_assignments(labels: Mapping[str, str], assignments: Iterable[Assignment]) -> dict[str, Assignment]:
    """Per model name, the assignment matching `labels` that wins (highest priority; ties: latest updated)."""
    winners: dict[str, Assignment] = {}
    for assignment in assignments:
        if not matches(assignment.selector, labels):
            continue
        best = winners.get(assignment.name)
        if best is None or _rank(assignment) > _rank(best):
            winners[assignment.name] = assignment
    return winners


def compute_desired(
    labels: Mapping[str, str],
    assignments: Iterable[Assignment],
    policies: Sequence[Policy],
    versions: VersionLookup,
    rollouts: Iterable[RolloutTarget] = (),
) -> Desired:
    """The desired state of a device with `labels` (and the rollouts whose current stage holds it).

    A model whose winning assignment names a version the registry does not hold is left out (the device
    keeps what it runs) and named in `problems`; a lower-priority assignment is not used instead, as that
    could silently move devices to an older version. A rollout's ACTIVE target replaces the assignment's
    version; a SHADOW target is added beside the active version (none without one, nor of the same version).
    """
    models: list[ModelAssignment] = []
    problems: list[str] = []
    targets = {target.model: target for target in rollouts}
    for name, assignment in sorted(winning_assignments(labels, assignments).items()):
        sha256 = versions(name, assignment.version)
        if sha256 is None:
            problems.append(
                f"model {name}:{assignment.version} (selector {format_selector(assignment.selector)}) "
                "is not in the registry: push it with fleetctl models push"
            )
            continue
        models.extend(_with_rollout(name, assignment.version, sha256, targets.pop(name, None), versions, problems))
    for name, target in sorted(targets.items()):  # a rollout to devices without an assignment of the model
        if target.role == "active":
            models.extend(_with_rollout(name, 0, "", target, versions, problems))
    document = effective_policy(labels, list(policies))
    if not document:
        return Desired(models, "", "", problems)
    return Desired(models, policy_json(document), policy_hash(document), problems)


def _with_rollout(
    name: str,
    version: int,
    sha256: str,
    target: RolloutTarget | None,
    versions: VersionLookup,
    problems: list[str],
) -> list[ModelAssignment]:
    """The model's entries: the assigned version, as a rollout target changes it (version 0: none assigned)."""
    active = [ModelAssignment(name=name, version=version, role=ModelRole.MODEL_ROLE_ACTIVE, sha256=sha256)]
    if version == 0:
        active = []
    if target is None or target.version == version:
        return active
    candidate = versions(name, target.version)
    if candidate is None:
        problems.append(f"rollout {target.rollout_id}: model {name}:{target.version} is not in the registry")
        return active
    if target.role == "active":
        return [
            ModelAssignment(
                name=name,
                version=target.version,
                role=ModelRole.MODEL_ROLE_ACTIVE,
                sha256=candidate,
                rollout_id=target.rollout_id,
            )
        ]
    if not active:
        return []
    shadow = ModelAssignment(
        name=name,
        version=target.version,
        role=ModelRole.MODEL_ROLE_SHADOW,
        sha256=candidate,
        rollout_id=target.rollout_id,
        shadow_sample_rate=target.shadow_sample_rate,
    )
    return [*active, shadow]


def content_key(state: DesiredState) -> bytes:
    """What makes two desired states the same for a device: its models and its policy hash."""
    body = DesiredState(policy_hash=state.policy_hash)
    body.models.extend(state.models)
    return body.SerializeToString(deterministic=True)


def same_content(stored: DesiredState | None, computed: Desired) -> bool:
    """Whether `stored` (a device's current desired state, None if it has none) already says `computed`."""
    if stored is None:
        return computed.empty
    return content_key(stored) == content_key(computed.to_state())
