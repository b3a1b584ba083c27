"""ControlStore's bulk calls: set_desired_many (generations as set_desired's), report_many (each judged alone)."""

from __future__ import annotations

import pytest

from cloud_sync.errors import DeviceRevoked, InvalidArgument, NotFound
from cloud_sync.store import DeviceRegistry
from cloud_sync.store.control import DESIRED_CHUNK, ControlStore, StaleReport
from edgefleet.proto.edgefleet.v1.state_pb2 import DesiredState, ModelAssignment, ModelRole, ReportedState


def state(version: int = 1) -> DesiredState:
    s = DesiredState()
    s.models.append(ModelAssignment(name="digits", version=version, role=ModelRole.MODEL_ROLE_ACTIVE))
    return s


def report(device_id: str, generation: int) -> ReportedState:
    return ReportedState(device_id=device_id, generation=generation, converged=True)


def test_set_desired_many_bumps_each_generation_and_calls_listeners_after_commit(
    devices: DeviceRegistry, control: ControlStore
) -> None:
    for d in ("a", "b", "c"):
        devices.add_device(d)
    control.set_desired("a", state())
    control.set_desired("a", state())
    control.report("a", report("a", 2))
    heard: list[tuple[str, int]] = []
    states: list[DesiredState] = []
    control.on_desired(lambda device_id, generation: heard.append((device_id, generation)))
    control.on_desired_state(states.append)
    devices.revoke("c")
    written = control.set_desired_many({"a": state(2), "b": state(2), "c": state(2), "ghost": state(2)})
    assert written == {"a": 3, "b": 1}  # revoked and unknown devices are left out
    assert sorted(heard) == [("a", 3), ("b", 1)]
    assert {(s.device_id, s.generation, s.models[0].version) for s in states} == {("a", 3, 2), ("b", 1, 2)}
    stored = control.desired_many()
    assert {d: (s.generation, s.models[0].version) for d, s in stored.items()} == {"a": (3, 2), "b": (1, 2)}
    gens = control.generations()
    assert (gens["a"].desired_generation, gens["a"].reported_generation) == (3, 2)
    assert gens["b"].reported_generation is None


def test_set_desired_many_checks_every_state_before_writing_any(devices: DeviceRegistry, control: ControlStore) -> None:
    devices.add_device("a")
    devices.add_device("b")
    bad = DesiredState()
    bad.models.append(ModelAssignment(name="digits", version=0, role=ModelRole.MODEL_ROLE_ACTIVE))
    with pytest.raises(InvalidArgument, match="version >= 1"):
        control.set_desired_many({"a": state(), "b": bad})
    assert control.desired_many() == {}


def test_set_desired_many_writes_past_one_chunk(devices: DeviceRegistry, control: ControlStore) -> None:
    ids = [f"d{i:04}" for i in range(DESIRED_CHUNK + 3)]
    for device_id in ids:
        devices.add_device(device_id)
    written = control.set_desired_many(dict.fromkeys(ids, state()))
    assert written == dict.fromkeys(ids, 1)
    assert len(control.desired_many(ids[:10])) == 10


def test_report_many_stores_the_good_and_says_why_each_other_was_refused(
    devices: DeviceRegistry, control: ControlStore
) -> None:
    for d in ("a", "b", "r"):
        devices.add_device(d)
    control.set_desired_many({"a": state(), "b": state(), "r": state()})
    control.set_desired("a", state(2))
    devices.revoke("r")
    outcome = control.report_many(
        [
            ("a", report("a", 2)),
            ("a", report("a", 1)),  # below the one just before it in the batch: stale
            ("b", report("b", 5)),  # never issued
            ("b", report("other", 1)),  # names another device
            ("r", report("r", 1)),
            ("ghost", report("ghost", 1)),
            ("b", report("b", 1)),
        ]
    )
    kinds = [type(e) if e is not None else None for e in outcome]
    assert kinds == [None, StaleReport, InvalidArgument, InvalidArgument, DeviceRevoked, NotFound, None]
    reported = control.reported_many()
    assert {d: r.state.generation for d, r in reported.items()} == {"a": 2, "b": 1}
    assert control.report_many([("a", report("a", 1))])[0].__class__ is StaleReport
    assert control.report_many([("a", report("a", 2))]) == [None]  # the same generation again is fine


def test_reporting_lists_devices_whose_report_runs_a_version(devices: DeviceRegistry, control: ControlStore) -> None:
    from edgefleet.proto.edgefleet.v1.state_pb2 import ModelState, ModelStatus

    for d in ("a", "b"):
        devices.add_device(d)
        control.set_desired(d, state())
    ok = report("a", 1)
    ok.models.append(
        ModelStatus(name="digits", version=1, role=ModelRole.MODEL_ROLE_ACTIVE, state=ModelState.MODEL_STATE_ACTIVE)
    )
    failed = report("b", 1)
    failed.models.append(
        ModelStatus(name="digits", version=1, role=ModelRole.MODEL_ROLE_ACTIVE, state=ModelState.MODEL_STATE_FAILED)
    )
    control.report_many([("a", ok), ("b", failed)])
    assert control.reporting("digits", 1) == ["a"]
    assert control.reporting("digits", 2) == []
