"""Keeps every device's desired state equal to what assignments, policies and its labels say it should be.

Reads the whole fleet in a few queries, computes each device's state (cloud_sync/desired.py) and writes only
the devices whose content changed, in chunked transactions. Run after every change and periodically
(idempotent: a pass with nothing changed writes nothing). Not the transport of the states (control.py,
control_mqtt.py).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterable
from concurrent.futures import Executor
from typing import Protocol

import structlog

from cloud_sync.desired import Desired, RolloutTarget, compute_desired, same_content
from cloud_sync.errors import CloudSyncError
from cloud_sync.policies import Policy
from cloud_sync.rollouts.plan import Rollout, rollout_targets
from cloud_sync.store.assignments import Assignment, AssignmentStore
from cloud_sync.store.control import ControlStore
from cloud_sync.store.devices import DeviceRegistry
from edgefleet.proto.edgefleet.v1.state_pb2 import DesiredState

__all__ = ["PERIODIC_S", "ModelCatalog", "PolicySource", "Reconciler", "RolloutSource"]

log = structlog.get_logger(__name__)

# The periodic pass catches what no trigger announced: a change made by another replica, a failed pass.
PERIODIC_S = 30.0


class ModelCatalog(Protocol):
    """What the reconciler needs of the model registry (cloud_sync/registry/store.py's ModelRegistry)."""

    def digests(self) -> dict[tuple[str, int], str]: ...


class PolicySource(Protocol):
    """What the reconciler needs of the policy store (cloud_sync/store/policies.py's PolicyStore)."""

    def list(self) -> list[Policy]: ...


class RolloutSource(Protocol):
    """What the reconciler needs of the rollouts (cloud_sync/rollouts/store.py's RolloutStore)."""

    def in_progress(self) -> list[Rollout]: ...


class Reconciler:
    """Recomputes desired states; thread-safe (passes take turns), synchronous (call it off the event loop)."""

    def __init__(
        self,
        devices: DeviceRegistry,
        assignments: AssignmentStore,
        policies: PolicySource,
        registry: ModelCatalog,
        control: ControlStore,
        rollouts: RolloutSource | None = None,
    ) -> None:
        self._devices = devices
        self._rollouts = rollouts
        self._assignments = assignments
        self._policies = policies
        self._registry = registry
        self._control = control
        self._lock = threading.Lock()
        self._problems: dict[str, list[str]] = {}

    def reconcile(self, device_ids: Iterable[str] | None = None) -> int:
        """Recompute every non-revoked device (or those of `device_ids`); returns how many got a new state."""
        wanted = None if device_ids is None else set(device_ids)
        with self._lock:
            began = time.monotonic()
            fleet = [d for d in self._devices.list_devices() if not d.revoked]
            # Stages are shares of every device a rollout's selector matches, so they are placed on the whole
            # fleet before it is narrowed to `device_ids`.
            targets = self._rollout_targets({d.device_id: d.labels for d in fleet})
            if wanted is not None:
                fleet = [d for d in fleet if d.device_id in wanted]
            if not fleet:
                return 0
            assignments = self._assignments.list()
            policies = self._policies.list()
            catalog = self._registry.digests()
            stored = self._control.desired_many(None if wanted is None else [d.device_id for d in fleet])
            changed: dict[str, DesiredState] = {}
            for device in fleet:
                desired = self._compute(
                    device.labels, assignments, policies, catalog, targets.get(device.device_id, [])
                )
                self._note_problems(device.device_id, desired)
                if not same_content(stored.get(device.device_id), desired):
                    changed[device.device_id] = desired.to_state()
            written = self._control.set_desired_many(changed) if changed else {}
            log.info(
                "reconciler.pass",
                devices=len(fleet),
                changed=len(written),
                with_problems=sum(1 for d in fleet if self._problems.get(d.device_id)),
                seconds=round(time.monotonic() - began, 3),
            )
            return len(written)

    def _compute(
        self,
        labels: dict[str, str],
        assignments: list[Assignment],
        policies: list[Policy],
        catalog: dict[tuple[str, int], str],
        targets: list[RolloutTarget],
    ) -> Desired:
        return compute_desired(
            labels, assignments, policies, lambda name, version: catalog.get((name, version)), targets
        )

    def _rollout_targets(self, fleet: dict[str, dict[str, str]]) -> dict[str, list[RolloutTarget]]:
        """device id -> what the rollouts in progress ask of it (at most one per model: create refuses overlaps)."""
        found: dict[str, list[RolloutTarget]] = {}
        for rollout in [] if self._rollouts is None else self._rollouts.in_progress():
            for device_id, target in rollout_targets(rollout, fleet).items():
                found.setdefault(device_id, []).append(target)
        return found

    def _note_problems(self, device_id: str, desired: Desired) -> None:
        if desired.problems:
            self._problems[device_id] = list(desired.problems)
        else:
            self._problems.pop(device_id, None)

    def problems(self, device_id: str) -> list[str]:
        """What the last pass could not honour for `device_id` (an assignment to an unregistered version)."""
        return list(self._problems.get(device_id, ()))

    def in_use(self, name: str, version: int) -> list[str]:
        """Why `name` at `version` may not be deleted: the assignments naming it and the devices running it."""
        return [
            *self._assignments.uses(name, version),
            *(f"device {d}" for d in self._control.reporting(name, version)),
        ]

    def on_change(self) -> None:
        """A policy or assignment changed: recompute every device (errors are logged; the periodic pass retries)."""
        self._safely(None)

    def on_enrolled(self, device_id: str) -> None:
        """A device was enrolled (or its labels changed): compute its state now."""
        self._safely([device_id])

    def _safely(self, device_ids: list[str] | None) -> None:
        try:
            self.reconcile(device_ids)
        except CloudSyncError as exc:
            log.warning("reconciler.pass_failed", error=exc.message, retry_in_s=PERIODIC_S)
        except Exception as exc:  # a bug: logged, and the periodic pass (or the next change) tries again
            log.error("reconciler.pass_crashed", error=f"{type(exc).__name__}: {exc}", retry_in_s=PERIODIC_S)

    async def run_periodically(self, executor: Executor, interval_s: float = PERIODIC_S) -> None:
        """Until cancelled: a pass every `interval_s` (the first at once), on `executor`."""
        loop = asyncio.get_running_loop()
        while True:
            await loop.run_in_executor(executor, self._safely, None)
            await asyncio.sleep(interval_s)
