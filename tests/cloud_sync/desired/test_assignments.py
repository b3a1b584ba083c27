"""AssignmentStore: assign is an upsert per (model, selector), unassign, list, uses; bad input changes nothing."""

from __future__ import annotations

import pytest

from cloud_sync.errors import InvalidArgument, NotFound
from cloud_sync.store.assignments import AssignmentStore


def test_assign_creates_then_replaces_the_same_model_and_selector(assignments: AssignmentStore) -> None:
    first = assignments.assign("digits", 1, {"site": "lab", "cam": "front"}, priority=5)
    again = assignments.assign("digits", 2, {"cam": "front", "site": "lab"}, priority=7)
    assert (again.version, again.priority, again.created_at_ms) == (2, 7, first.created_at_ms)
    assert again.updated_at_ms >= first.updated_at_ms
    assert [(a.name, a.version, a.selector) for a in assignments.list()] == [
        ("digits", 2, {"cam": "front", "site": "lab"})
    ]


def test_list_filters_by_model_and_uses_names_each_assignment(assignments: AssignmentStore) -> None:
    assignments.assign("digits", 1, {})
    assignments.assign("digits", 1, {"site": "lab"})
    assignments.assign("faces", 3, {"site": "lab"})
    assert [a.name for a in assignments.list("faces")] == ["faces"]
    assert assignments.uses("digits", 1) == ["assignment digits:1@*", "assignment digits:1@site=lab"]
    assert assignments.uses("digits", 2) == []


def test_unassign_removes_it_and_refuses_an_unknown_one(assignments: AssignmentStore) -> None:
    assignments.assign("digits", 1, {"site": "lab"})
    assignments.unassign("digits", {"site": "lab"})
    assert assignments.list() == []
    with pytest.raises(NotFound, match="no assignment for selector 'site=lab'"):
        assignments.unassign("digits", {"site": "lab"})


@pytest.mark.parametrize(
    "name, version, selector, priority, message",
    [
        ("Digits", 1, {}, 0, "invalid model name"),
        ("", 1, {}, 0, "invalid model name"),
        ("a" * 64, 1, {}, 0, "invalid model name"),
        ("digits", 0, {}, 0, "invalid model version"),
        ("digits", True, {}, 0, "invalid model version"),
        ("digits", 2**31, {}, 0, "invalid model version"),
        ("digits", 1, {"bad key": "x"}, 0, "selector key"),
        ("digits", 1, {"site": "a,b"}, 0, "without ','"),
        ("digits", 1, {}, 10**7, "invalid priority"),
    ],
)
def test_bad_input_is_refused_and_changes_nothing(
    assignments: AssignmentStore,
    name: object,
    version: object,
    selector: dict[str, str],
    priority: object,
    message: str,
) -> None:
    with pytest.raises(InvalidArgument, match=message):
        assignments.assign(name, version, selector, priority)  # type: ignore[arg-type]
    assert assignments.list() == []
