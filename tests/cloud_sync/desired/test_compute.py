"""compute_desired, property-tested: the winning assignment per model, registry misses named, policy overlaid."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from cloud_sync.desired import Desired, compute_desired, same_content
from cloud_sync.policies import Policy, policy_hash
from cloud_sync.selectors import format_selector, matches
from cloud_sync.store.assignments import Assignment
from edgefleet.proto.edgefleet.v1.state_pb2 import ModelRole

KEYS = ("site", "cam")
VALUES = ("lab", "front", "back")

labels_st = st.dictionaries(st.sampled_from(KEYS), st.sampled_from(VALUES), max_size=2)
assignment_st = st.builds(
    Assignment,
    name=st.sampled_from(("digits", "faces", "plates")),
    version=st.integers(1, 4),
    selector=labels_st,
    priority=st.integers(-2, 2),
    created_at_ms=st.just(0),
    updated_at_ms=st.integers(0, 3),
)
policy_st = st.builds(
    Policy,
    name=st.sampled_from(("base", "lab", "night")),
    version=st.just(1),
    selector=labels_st,
    priority=st.integers(0, 3),
    document=st.fixed_dictionaries({"inference": st.fixed_dictionaries({"max_batch_size": st.integers(1, 8)})}),
    updated_at_ms=st.just(0),
)


def registry_of(known: set[tuple[str, int]]):  # type: ignore[no-untyped-def]
    return lambda name, version: f"sha-{name}-{version}" if (name, version) in known else None


@settings(max_examples=300, deadline=None)
@given(
    labels=labels_st,
    assignments=st.lists(assignment_st, max_size=8),
    known=st.sets(st.tuples(st.sampled_from(("digits", "faces", "plates")), st.integers(1, 4))),
)
def test_each_model_gets_its_best_matching_assignment_or_a_problem(
    labels: dict[str, str], assignments: list[Assignment], known: set[tuple[str, int]]
) -> None:
    desired = compute_desired(labels, assignments, [], registry_of(known))
    matching = [a for a in assignments if matches(a.selector, labels)]
    names = {a.name for a in matching}
    by_name = {m.name: m for m in desired.models}
    assert [m.name for m in desired.models] == sorted(by_name)  # one per model, sorted
    for name in names:
        best = max((a.priority, a.updated_at_ms) for a in matching if a.name == name)
        winners = {a.version for a in matching if a.name == name and (a.priority, a.updated_at_ms) == best}
        if name in by_name:
            model = by_name[name]
            assert model.version in winners and (name, model.version) in known
            assert model.role == ModelRole.MODEL_ROLE_ACTIVE and model.sha256 == f"sha-{name}-{model.version}"
        else:  # the winner is not in the registry: left out and named, never replaced by a loser
            assert any(f"model {name}:" in p for p in desired.problems)
    assert set(by_name) <= names
    assert len(desired.problems) == len(names) - len(by_name)


@settings(max_examples=200, deadline=None)
@given(labels=labels_st, policies=st.lists(policy_st, max_size=5, unique_by=lambda p: p.name))
def test_the_policy_is_the_overlay_of_the_matching_ones_with_its_hash(
    labels: dict[str, str], policies: list[Policy]
) -> None:
    desired = compute_desired(labels, [], policies, registry_of(set()))
    applied = sorted((p for p in policies if matches(p.selector, labels)), key=lambda p: (p.priority, p.name))
    if not applied:
        assert (desired.policy_json, desired.policy_hash) == ("", "")
        assert desired.empty
        return
    expected = {"inference": {"max_batch_size": applied[-1].document["inference"]["max_batch_size"]}}
    assert desired.policy_hash == policy_hash(expected)
    assert '"max_batch_size":' in desired.policy_json


@given(
    labels=labels_st,
    # As the stores hold them: one assignment per (model, selector), one policy per name.
    assignments=st.lists(assignment_st, max_size=6, unique_by=lambda a: (a.name, format_selector(a.selector))),
    policies=st.lists(policy_st, max_size=3, unique_by=lambda p: p.name),
)
def test_a_state_built_from_a_result_has_the_same_content_and_order_does_not_matter(
    labels: dict[str, str], assignments: list[Assignment], policies: list[Policy]
) -> None:
    everything = registry_of({(n, v) for n in ("digits", "faces", "plates") for v in range(1, 5)})
    desired = compute_desired(labels, assignments, policies, everything)
    reversed_ = compute_desired(labels, list(reversed(assignments)), list(reversed(policies)), everything)
    state = desired.to_state()
    state.generation, state.device_id, state.issued_at_ms = 7, "cam-1", 123  # the store's fields do not count
    assert same_content(state, reversed_)
    assert same_content(None, desired) == desired.empty


def test_a_new_version_or_policy_is_a_change_of_content() -> None:
    a = Assignment("digits", 1, {}, 0, 0, 0)
    everything = registry_of({("digits", 1), ("digits", 2)})
    before = compute_desired({}, [a], [], everything).to_state()
    moved = compute_desired({}, [Assignment("digits", 2, {}, 0, 0, 1)], [], everything)
    policy = Policy("p", 1, {}, 0, {"inference": {"max_batch_size": 4}}, 0)
    with_policy = compute_desired({}, [a], [policy], everything)
    assert not same_content(before, moved)
    assert not same_content(before, with_policy)
    assert same_content(before, compute_desired({}, [a], [], everything))
    assert not same_content(before, Desired())
