"""The rollout service over a real store: create refusals, checked transitions with their events, and the
desired states a rollout's stages give its devices (through the reconciler)."""

from __future__ import annotations

import threading

import pytest

from cloud_sync.errors import FailedPrecondition, InvalidArgument, NotFound
from cloud_sync.reconciler import Reconciler
from cloud_sync.rollouts.service import RolloutService
from cloud_sync.store import DeviceRegistry
from cloud_sync.store.assignments import AssignmentStore
from cloud_sync.store.control import ControlStore
from tests.cloud_sync.rollouts.conftest import fleet, runs

STAGES = "shadow:10%:60s,active:10%:60s,active:50%:60s,active:100%"


def test_a_rollout_walks_its_stages_and_every_device_ends_on_b(
    service: RolloutService, devices: DeviceRegistry, assignments: AssignmentStore, control: ControlStore
) -> None:
    ids = fleet(devices, assignments, 20)
    rollout = service.create("digits", 2, {"site": "lab"}, STAGES, "max_error_rate=0.01", shadow_sample_rate=0.2)
    assert (rollout.from_version, rollout.state, rollout.stage_index) == (1, "running", 0)
    first = service.stage_devices(rollout)
    assert len(first) == 2
    for device_id in ids:
        expected = [(1, "active", ""), (2, "shadow", rollout.id)] if device_id in first else [(1, "active", "")]
        assert runs(control, device_id) == expected
    shadow = control.desired(first[0])
    assert shadow is not None and shadow.models[1].shadow_sample_rate == pytest.approx(0.2)

    for kind_stage in (1, 2, 3):
        rollout = service.promote(rollout.id, reason="looks fine")
        assert rollout.stage_index == kind_stage
        holding = set(service.stage_devices(rollout))
        assert {d for d in ids if runs(control, d) == [(2, "active", rollout.id)]} == holding
    rollout = service.promote(rollout.id)
    assert rollout.state == "completed"
    # The assignment now says B: the devices keep it with the rollout gone (no rollout id any more).
    assert all(runs(control, d) == [(2, "active", "")] for d in ids)
    kinds = [(e.kind, e.actor) for e in service.events(rollout.id)]
    assert kinds == [("created", "operator")] + [("promoted", "operator")] * 4 + [("completed", "operator")]
    assert service.events(rollout.id, after_id=service.events(rollout.id)[-2].id)[0].kind == "completed"


def test_abort_puts_every_touched_device_back_on_a(
    service: RolloutService, devices: DeviceRegistry, assignments: AssignmentStore, control: ControlStore
) -> None:
    ids = fleet(devices, assignments, 10)
    rollout = service.create("digits", 2, {}, "active:30%,active:100%")
    assert sum(runs(control, d) == [(2, "active", rollout.id)] for d in ids) == 3
    aborted = service.abort(rollout.id, reason="operator saw something")
    assert (aborted.state, aborted.reason) == ("aborted", "operator saw something")
    assert all(runs(control, d) == [(1, "active", "")] for d in ids)
    with pytest.raises(FailedPrecondition, match="aborted"):
        service.promote(rollout.id)
    assert [e.kind for e in service.events(rollout.id)] == ["created", "aborted"]


def test_pause_and_resume_are_checked_and_recorded(
    service: RolloutService, devices: DeviceRegistry, assignments: AssignmentStore
) -> None:
    fleet(devices, assignments, 3)
    rollout = service.create("digits", 2, {}, "active:50%:1h,active:100%")
    paused = service.pause(rollout.id, reason="lunch")
    with pytest.raises(FailedPrecondition, match="only a running rollout can be paused"):
        service.pause(rollout.id)
    assert service.list("paused") == [paused] and service.list("running") == []
    resumed = service.resume(rollout.id)
    assert resumed.state == "running" and resumed.stage_started_at_ms >= paused.stage_started_at_ms
    events = service.events(rollout.id)
    assert [(e.kind, e.reason) for e in events] == [
        ("created", "digits 1 -> 2 on *"),
        ("paused", "lunch"),
        ("resumed", ""),
    ]


def test_create_refuses_what_cannot_be_rolled_out_and_stores_nothing(
    service: RolloutService, devices: DeviceRegistry, assignments: AssignmentStore
) -> None:
    fleet(devices, assignments, 3)
    devices.add_device("home-1", {"site": "home"})
    refusals: list[tuple[tuple[type[Exception], str], dict[str, object]]] = [
        ((InvalidArgument, "not in the registry"), dict(to_version=9)),
        ((InvalidArgument, "model name"), dict(model="Digits!")),
        ((InvalidArgument, "to_version"), dict(to_version=0)),
        ((InvalidArgument, "selector key"), dict(selector={"": "x"})),
        ((InvalidArgument, "must be active:100%"), dict(stages="active:50%")),
        ((InvalidArgument, "unknown gate"), dict(gates="nope=1")),
        ((InvalidArgument, "shadow_sample_rate"), dict(shadow_sample_rate=0)),
        ((InvalidArgument, "shadow_sample_rate"), dict(shadow_sample_rate=float("nan"))),
        ((FailedPrecondition, "run digits:1 already"), dict(to_version=1)),
        ((FailedPrecondition, "matches no device"), dict(selector={"site": "mars"})),
    ]
    for (error, message), change in refusals:
        args = {"model": "digits", "to_version": 2, "selector": {}, "stages": "active:100%", **change}
        with pytest.raises(error, match=message):
            service.create(**args)  # type: ignore[arg-type]
    assert service.list() == []
    assignments.assign("digits", 3, {"site": "home"})
    with pytest.raises(FailedPrecondition, match="versions 1, 3"):
        service.create("digits", 2, {}, "active:100%")


def test_a_second_rollout_of_the_model_on_overlapping_devices_is_refused(
    service: RolloutService, devices: DeviceRegistry, assignments: AssignmentStore
) -> None:
    fleet(devices, assignments, 2, site="lab")
    fleet(devices, assignments, 2, site="home")
    first = service.create("digits", 2, {"site": "lab"}, "active:100%")
    with pytest.raises(FailedPrecondition, match=f"rollout {first.id}"):
        service.create("digits", 3, {}, "active:100%")
    other = service.create("digits", 2, {"site": "home"}, "active:100%")  # disjoint devices: allowed
    assert {r.id for r in service.in_progress()} == {first.id, other.id}


def test_unknown_ids_and_bad_arguments_change_nothing(
    service: RolloutService, devices: DeviceRegistry, assignments: AssignmentStore
) -> None:
    fleet(devices, assignments, 2)
    with pytest.raises(NotFound, match="no rollout 'ro-0000000000'"):
        service.abort("ro-0000000000")
    with pytest.raises(InvalidArgument, match="invalid rollout id"):
        service.get("../etc")
    with pytest.raises(InvalidArgument, match="state"):
        service.list("done")
    rollout = service.create("digits", 2, {}, "active:100%")
    with pytest.raises(InvalidArgument, match="reason"):
        service.pause(rollout.id, reason="x" * 5000)
    with pytest.raises(InvalidArgument, match="after_id"):
        service.events(rollout.id, after_id=-1)
    assert service.get(rollout.id).state == "running" and len(service.events(rollout.id)) == 1


def test_racing_promotions_step_once(
    service: RolloutService, devices: DeviceRegistry, assignments: AssignmentStore
) -> None:
    fleet(devices, assignments, 4)
    rollout = service.create("digits", 2, {}, "active:25%,active:50%,active:100%")
    seen = service.get(rollout.id)
    outcomes: list[str] = []
    barrier = threading.Barrier(4)

    def step() -> None:
        barrier.wait()
        try:
            service.advance_seen(seen, "gate", "race")
            outcomes.append("moved")
        except FailedPrecondition:
            outcomes.append("refused")

    threads = [threading.Thread(target=step) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(outcomes) == ["moved", "refused", "refused", "refused"]
    assert service.get(rollout.id).stage_index == 1
    assert [e.kind for e in service.events(rollout.id)] == ["created", "advanced"]


def test_progress_counts_each_stages_devices(
    service: RolloutService, devices: DeviceRegistry, assignments: AssignmentStore, reconciler: Reconciler
) -> None:
    fleet(devices, assignments, 10)
    rollout = service.create("digits", 2, {}, STAGES)
    progress = service.progress(rollout.id)
    assert [(s["devices"], s["status"]) for s in progress["progress"]] == [
        (1, "current"),
        (1, "pending"),
        (5, "pending"),
        (10, "pending"),
    ]
    assert progress["matched_devices"] == 10 and len(progress["stage_devices"]) == 1
    assert reconciler.reconcile() == 0  # the rollout's states are stable: a periodic pass rewrites nothing
