"""cloud_sync/policies.py: checking a policy document, and a device's effective policy (a pure function).

The overlay is property-tested: the effective value of each key is the one of the highest-priority matching
policy that sets it (ties: the later name), whatever order the policies come in; a policy whose selector does
not match changes nothing; equal documents have equal hashes.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cloud_sync.errors import InvalidArgument
from cloud_sync.policies import (
    MAX_PRIORITY,
    Policy,
    PolicyInvalid,
    check_document,
    check_policy_name,
    check_priority,
    effective_policy,
    matching_policies,
    policy_hash,
    policy_json,
)
from edge_runtime.policy import parse_policy
from edgefleet.policy import EffectivePolicy

# -- check_document ------------------------------------------------------------------------------------------


def test_a_valid_document_comes_back_canonical() -> None:
    doc = {
        "inference": {"max_batch_size": 8, "max_queue_delay_ms": 2, "adaptive": False},
        "upload": {"sample_rate": 0.5},
        "buffer": {},
        "telemetry": {"interval_s": 5},
    }
    assert check_document(doc) == {
        "inference": {"max_batch_size": 8, "max_queue_delay_ms": 2.0, "adaptive": False},
        "upload": {"sample_rate": 0.5},
        "telemetry": {"interval_s": 5.0},
    }
    assert check_document({}) == {}


@pytest.mark.parametrize(
    ("doc", "field", "says"),
    [
        ({"inference": {"max_batch_size": "8"}}, "document.inference.max_batch_size", "must be int, not str"),
        ({"inference": {"max_batch_size": 8.0}}, "document.inference.max_batch_size", "must be int, not float"),
        ({"inference": {"max_batch_size": True}}, "document.inference.max_batch_size", "must be int, not bool"),
        ({"inference": {"max_batch_size": 0}}, "document.inference.max_batch_size", "0 is out of range [1, 4096]"),
        ({"inference": {"max_batch_size": 10**30}}, "document.inference.max_batch_size", "out of range"),
        ({"inference": {"adaptive": 1}}, "document.inference.adaptive", "must be bool"),
        ({"inference": {"max_queue_delay_ms": float("nan")}}, "document.inference.max_queue_delay_ms", "finite"),
        ({"upload": {"sample_rate": float("inf")}}, "document.upload.sample_rate", "finite"),
        ({"upload": {"sample_rate": 1.5}}, "document.upload.sample_rate", "out of range"),
        ({"inference": {"max_batch_sze": 8}}, "document.inference.max_batch_sze", "unknown key (known: adaptive"),
        ({"engine": {"backend": "auto"}}, "document.engine", "unknown policy section"),
        ({"inference": [1]}, "document.inference", "must be an object"),
        ({"inference": None}, "document.inference", "must be an object"),
        ({"inference": {"default_priority": 3}}, "document.inference", "default_priority (3) must be within"),
        ([], "document", "must be an object of policy sections"),
        ("{}", "document", "must be an object of policy sections"),
    ],
)
def test_a_bad_document_is_refused_naming_the_field(doc: Any, field: str, says: str) -> None:
    with pytest.raises(PolicyInvalid) as info:
        check_document(doc)
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: ")
    assert says in info.value.message
    assert isinstance(info.value, InvalidArgument)  # 422 at the API


def test_a_cross_field_rule_is_met_within_the_document() -> None:
    doc = {"inference": {"default_priority": 3, "priority_levels": 4}}
    assert check_document(doc) == doc


@pytest.mark.parametrize("name", ["lab", "lab-batching", "a.b_c-1", "x" * 63, "0day"])
def test_policy_names(name: str) -> None:
    assert check_policy_name(name) == name


@pytest.mark.parametrize("name", ["", "Lab", "-lab", "lab/x", "lab\n", "x" * 64, "lab batching", 7, None])
def test_bad_policy_names_are_refused(name: Any) -> None:
    with pytest.raises(PolicyInvalid) as info:
        check_policy_name(name)
    assert info.value.field == "name"


@pytest.mark.parametrize("priority", [-1, MAX_PRIORITY + 1, 1.0, True, "1", None])
def test_bad_priorities_are_refused(priority: Any) -> None:
    with pytest.raises(PolicyInvalid) as info:
        check_priority(priority)
    assert info.value.field == "priority"


# -- effective_policy ----------------------------------------------------------------------------------------


def policy(name: str, priority: int, document: dict[str, Any], selector: dict[str, str] | None = None) -> Policy:
    return Policy(name, 1, selector or {}, priority, document, 0)


def test_a_device_matching_nothing_gets_the_empty_document() -> None:
    policies = [policy("lab", 1, {"inference": {"max_batch_size": 8}}, {"site": "lab"})]
    assert effective_policy({"site": "paris"}, policies) == {}
    assert matching_policies({"site": "paris"}, policies) == []


def test_higher_priority_wins_key_by_key_and_the_rest_is_merged() -> None:
    fleet = policy("fleet", 0, {"inference": {"max_batch_size": 16, "instances": 2}, "telemetry": {"interval_s": 30.0}})
    lab = policy("lab", 10, {"inference": {"max_batch_size": 8}}, {"site": "lab"})
    front = policy("front", 5, {"inference": {"instances": 4, "max_batch_size": 4}}, {"cam": "front"})
    labels = {"site": "lab", "cam": "front"}
    assert [p.name for p in matching_policies(labels, [lab, front, fleet])] == ["fleet", "front", "lab"]
    assert effective_policy(labels, [lab, front, fleet]) == {
        "inference": {"max_batch_size": 8, "instances": 4},
        "telemetry": {"interval_s": 30.0},
    }


def test_a_priority_tie_is_broken_by_name_the_later_name_wins() -> None:
    a = policy("a", 3, {"upload": {"sample_rate": 0.1}})
    b = policy("b", 3, {"upload": {"sample_rate": 0.9}})
    assert effective_policy({}, [b, a]) == {"upload": {"sample_rate": 0.9}}


_SECTIONS: dict[str, dict[str, st.SearchStrategy[Any]]] = {
    "inference": {"max_batch_size": st.integers(1, 4096), "instances": st.integers(1, 64), "adaptive": st.booleans()},
    "upload": {"sample_rate": st.floats(0, 1), "batch_max_records": st.integers(1, 100_000)},
    "telemetry": {"interval_s": st.floats(0.1, 86_400)},
}


@st.composite
def documents(draw: st.DrawFn) -> dict[str, dict[str, Any]]:
    doc: dict[str, dict[str, Any]] = {}
    for section, keys in _SECTIONS.items():
        chosen = draw(st.lists(st.sampled_from(sorted(keys)), unique=True, max_size=len(keys)))
        if chosen:
            doc[section] = {key: draw(keys[key]) for key in chosen}
    return doc


labels_st = st.dictionaries(st.sampled_from(["site", "cam", "hw"]), st.sampled_from(["a", "b"]), max_size=3)


@st.composite
def policy_sets(draw: st.DrawFn) -> list[Policy]:
    names = draw(st.lists(st.text("abcdefgh", min_size=1, max_size=3), unique=True, max_size=6))
    return [policy(name, draw(st.integers(0, 3)), draw(documents()), draw(labels_st)) for name in names]


@given(policy_sets(), labels_st, st.randoms())
def test_each_key_comes_from_the_highest_matching_policy_that_sets_it(
    policies: list[Policy], labels: dict[str, str], rnd: Any
) -> None:
    shuffled = list(policies)
    rnd.shuffle(shuffled)
    effective = effective_policy(labels, shuffled)
    assert effective == effective_policy(labels, policies)  # order of the input does not matter
    matching = [p for p in policies if all(labels.get(k) == v for k, v in p.selector.items())]
    expected_keys = {(s, k) for p in matching for s in p.document for k in p.document[s]}
    assert {(s, k) for s in effective for k in effective[s]} == expected_keys
    for section, key in expected_keys:
        setters = [p for p in matching if key in p.document.get(section, {})]
        winner = max(setters, key=lambda p: (p.priority, p.name))
        assert effective[section][key] == winner.document[section][key]


@given(policy_sets(), labels_st, documents())
def test_a_policy_that_does_not_match_changes_nothing(
    policies: list[Policy], labels: dict[str, str], doc: dict[str, Any]
) -> None:
    outsider = policy("zz-outsider", 3, doc, {"nowhere": "x"})
    assert effective_policy(labels, [*policies, outsider]) == effective_policy(labels, policies)


@given(policy_sets(), labels_st)
def test_the_effective_document_is_valid_and_the_device_applies_it_as_overlaid(
    policies: list[Policy], labels: dict[str, str]
) -> None:
    effective = effective_policy(labels, policies)
    assert check_document(effective) == effective
    applied = parse_policy(policy_json(effective), EffectivePolicy())
    for section, keys in effective.items():
        for key, value in keys.items():
            assert getattr(getattr(applied, section), key) == value


@given(documents())
def test_the_hash_depends_on_content_not_on_key_order(doc: dict[str, Any]) -> None:
    reordered = {s: dict(reversed(list(keys.items()))) for s, keys in reversed(list(doc.items()))}
    assert policy_hash(reordered) == policy_hash(doc)
    assert len(policy_hash(doc)) == 16 and int(policy_hash(doc), 16) >= 0
    assert json.loads(policy_json(doc)) == doc


def test_different_documents_have_different_hashes() -> None:
    assert policy_hash({}) != policy_hash({"inference": {"max_batch_size": 8}})
    assert policy_hash({"inference": {"max_batch_size": 8}}) != policy_hash({"inference": {"max_batch_size": 9}})
