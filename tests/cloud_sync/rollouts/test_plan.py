"""Stages, gates and device order as an operator writes them: parsing, refusals, and nested stages."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cloud_sync.errors import InvalidArgument
from cloud_sync.rollouts.plan import Gates, Stage, format_gates, format_stages, parse_gates, parse_stages, stage_devices


def test_the_issue_stages_parse_with_units_and_a_default_bake() -> None:
    stages = parse_stages("shadow:10%:60s,active:10%:2m,active:50%:1h,active:100%")
    assert stages == [
        Stage("shadow", 10, 60),
        Stage("active", 10, 120),
        Stage("active", 50, 3600),
        Stage("active", 100, 0),
    ]
    assert parse_stages(format_stages(stages)) == stages
    assert parse_stages([{"mode": "active", "percent": 100}]) == [Stage("active", 100, 0)]


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("", "1 to 20 stages"),
        ("canary:10%,active:100%", "'canary:10%'"),
        ("active:0%,active:100%", "'active:0%'"),
        ("active:150%", "'active:150%'"),
        ("active:10%:soon,active:100%", "'active:10%:soon'"),
        ("active:50%,active:10%,active:100%", "may not decrease"),
        ("active:10%,shadow:10%,active:100%", "shadow stages come first"),
        ("shadow:10%:60s,active:50%", "must be active:100%"),
        ("active:10%:8d,active:100%", "'active:10%:8d'"),
        ("active:10%:900000h,active:100%", "7 days"),
    ],
)
def test_bad_stages_are_refused_naming_the_term(text: str, named: str) -> None:
    with pytest.raises(InvalidArgument, match=named):
        parse_stages(text)


def test_gates_parse_and_print_back() -> None:
    gates = parse_gates("max_error_rate=0.01,max_p99_ratio=1.5,min_shadow_agreement=0.95,min_devices=1")
    assert gates == Gates(max_error_rate=0.01, max_p99_ratio=1.5, min_shadow_agreement=0.95, min_devices=1)
    assert parse_gates(format_gates(gates)) == gates
    assert parse_gates({"max_apply_failures": 2, "max_fallback_rate": None}) == Gates(max_apply_failures=2)


@pytest.mark.parametrize(
    ("value", "named"),
    [
        ("max_eror_rate=0.1", "unknown gate 'max_eror_rate'"),
        ("max_error_rate", "not key=value"),
        ("max_error_rate=2", "within 0..1"),
        ("max_error_rate=abc", "within 0..1"),
        ("max_p99_ratio=0", "ratio above 0"),
        ("min_devices=0", "min_devices"),
        ("min_devices=1.5", "an integer"),
        ("min_requests=none", "cannot be turned off"),
        ("min_devices=1,min_devices=2", "given twice"),
        ({"max_error_rate": True}, "a number"),
    ],
)
def test_bad_gates_are_refused_naming_the_key(value: object, named: str) -> None:
    with pytest.raises(InvalidArgument, match=named):
        parse_gates(value)  # type: ignore[arg-type]


def test_stage_sizes_round_up_and_a_stage_of_every_device_is_the_fleet() -> None:
    fleet = [f"cam-{i}" for i in range(30)]
    assert len(stage_devices("ro-0000000001", fleet, 10)) == 3  # not 4: 10% of 30 is 3.0000000000000004
    assert len(stage_devices("ro-0000000001", fleet, 1)) == 1
    assert sorted(stage_devices("ro-0000000001", fleet, 100)) == sorted(fleet)
    assert stage_devices("ro-0000000001", [], 50) == []


@given(
    rollout_id=st.from_regex(r"ro-[0-9a-f]{10}", fullmatch=True),
    fleet=st.sets(st.text(min_size=1, max_size=12), max_size=200),
    percents=st.lists(st.floats(min_value=0.01, max_value=100), min_size=2, max_size=6),
)
def test_each_stage_holds_the_previous_one(rollout_id: str, fleet: set[str], percents: list[float]) -> None:
    stages = [set(stage_devices(rollout_id, fleet, p)) for p in sorted(percents)]
    for smaller, larger in itertools.pairwise(stages):
        assert smaller <= larger
    assert all(stage <= fleet for stage in stages)
    assert all(stage for stage in stages) or not fleet  # a stage of a non-empty fleet holds a device


@given(fleet=st.sets(st.text(min_size=1, max_size=8), min_size=1, max_size=100), extra=st.text(min_size=1, max_size=8))
def test_a_device_joining_the_fleet_moves_no_one_else_out_of_a_stage_but_the_last(fleet: set[str], extra: str) -> None:
    # Order is by (rollout, device) alone: the devices ahead of a new one keep their places.
    before = stage_devices("ro-00000000aa", fleet, 100)
    after = stage_devices("ro-00000000aa", fleet | {extra}, 100)
    assert [d for d in after if d != extra] == [d for d in before if d != extra]
