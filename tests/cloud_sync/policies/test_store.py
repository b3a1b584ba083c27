"""PolicyStore on SQLite and PostgreSQL: versions, reading back, deleting, and bad input that changes nothing."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from cloud_sync.errors import InvalidArgument, NotFound
from cloud_sync.policies import PolicyInvalid
from cloud_sync.store import Database, PolicyStore


@pytest.fixture
def policies(db: Database) -> PolicyStore:
    return PolicyStore(db)


def test_create_change_and_read_back(policies: PolicyStore) -> None:
    created = policies.set("lab", {"site": "lab"}, 10, {"inference": {"max_batch_size": 8}})
    assert (created.name, created.version, created.selector, created.priority) == ("lab", 1, {"site": "lab"}, 10)
    assert created.document == {"inference": {"max_batch_size": 8}}
    assert policies.get("lab") == created

    changed = policies.set("lab", {"site": "lab"}, 10, {"inference": {"max_batch_size": 4}})
    assert changed.version == 2 and changed.document == {"inference": {"max_batch_size": 4}}
    assert policies.set("lab", {"site": "lab"}, 20, {"inference": {"max_batch_size": 4}}).version == 3
    assert policies.set("lab", {}, 20, {"inference": {"max_batch_size": 4}}).version == 4
    assert policies.get("lab").version == 4


def test_setting_what_is_stored_keeps_the_version(policies: PolicyStore) -> None:
    first = policies.set("same", {}, 0, {"telemetry": {"interval_s": 5}})
    # 5 and 5.0 are the same setting: the document is stored canonical.
    again = policies.set("same", {}, 0, {"telemetry": {"interval_s": 5.0}})
    assert again == first and again.version == 1


def test_list_is_by_name_and_delete_removes(policies: PolicyStore) -> None:
    for name in ("b", "a", "c"):
        policies.set(name, {}, 0, {})
    assert [p.name for p in policies.list()] == ["a", "b", "c"]
    removed = policies.delete("b")
    assert removed.name == "b"
    assert [p.name for p in policies.list()] == ["a", "c"]
    with pytest.raises(NotFound, match="no policy named 'b'"):
        policies.get("b")
    with pytest.raises(NotFound):
        policies.delete("b")
    assert policies.set("b", {}, 0, {}).version == 1  # a new policy of the same name starts again


@pytest.mark.parametrize(
    ("name", "selector", "priority", "document", "field"),
    [
        ("Bad Name", {}, 0, {}, "name"),
        ("ok", {}, -1, {}, "priority"),
        ("ok", {}, 0, {"inference": {"max_batch_size": 0}}, "document.inference.max_batch_size"),
        ("ok", {}, 0, {"server": {}}, "document.server"),
    ],
)
def test_bad_input_is_refused_and_changes_nothing(
    policies: PolicyStore, name: str, selector: dict[str, str], priority: int, document: Any, field: str
) -> None:
    policies.set("ok", {"site": "lab"}, 1, {"upload": {"sample_rate": 0.5}})
    with pytest.raises(PolicyInvalid) as info:
        policies.set(name, selector, priority, document)
    assert info.value.field == field
    assert [(p.name, p.version) for p in policies.list()] == [("ok", 1)]


def test_a_bad_selector_is_refused(policies: PolicyStore) -> None:
    with pytest.raises(InvalidArgument, match="selector"):
        policies.set("ok", {"bad key!": "x"}, 0, {})
    assert policies.list() == []


def test_concurrent_sets_of_a_new_policy_give_distinct_versions(policies: PolicyStore) -> None:
    errors: list[BaseException] = []
    versions: list[int] = []
    lock = threading.Lock()

    def put(size: int) -> None:
        try:
            version = policies.set("race", {}, 0, {"inference": {"max_batch_size": size}}).version
            with lock:
                versions.append(version)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=put, args=(size,)) for size in range(1, 9)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors
    assert sorted(versions) == list(range(1, 9))
    assert policies.get("race").version == 8
