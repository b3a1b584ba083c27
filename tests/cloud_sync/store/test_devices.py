"""The device registry on both engines: tokens shown once and stored as hashes, revocation, listing."""

from __future__ import annotations

import hashlib

import pytest
import sqlalchemy as sa

from cloud_sync.errors import AlreadyExists, DeviceRevoked, InvalidArgument, NotFound
from cloud_sync.store import Database, DeviceRegistry, ResultStore
from cloud_sync.store.devices import TOKEN_PREFIX
from cloud_sync.store.schema import devices
from tests.cloud_sync.store.conftest import make_batch


def test_a_new_device_gets_a_token_that_authenticates_it(registry: DeviceRegistry) -> None:
    token = registry.add_device("cam-1", {"site": "lyon", "line": "3"})

    assert token.startswith(TOKEN_PREFIX) and len(token) > 40
    assert registry.authenticate(token) == "cam-1"
    device = registry.get_device("cam-1")
    assert device.labels == {"site": "lyon", "line": "3"}
    assert device.created_at_ms > 0 and not device.revoked


def test_only_the_tokens_hash_is_stored(registry: DeviceRegistry, db: Database) -> None:
    token = registry.add_device("cam-1")

    rows = db.read(lambda conn: [tuple(row) for row in conn.execute(sa.select(devices))])

    assert len(rows) == 1
    stored = rows[0]
    assert bytes(stored[1]) == hashlib.sha256(token.encode()).digest()
    assert token not in repr(stored)


def test_each_device_gets_a_different_token(registry: DeviceRegistry) -> None:
    tokens = {registry.add_device(f"cam-{i}") for i in range(20)}
    assert len(tokens) == 20
    assert {registry.authenticate(token) for token in tokens} == {f"cam-{i}" for i in range(20)}


@pytest.mark.parametrize("token", ["", "efd_not-a-token", "x" * 10_000, TOKEN_PREFIX])
def test_an_unknown_token_authenticates_nobody(registry: DeviceRegistry, token: str) -> None:
    registry.add_device("cam-1")
    assert registry.authenticate(token) is None


def test_a_revoked_device_cannot_authenticate_or_upload(registry: DeviceRegistry, store: ResultStore) -> None:
    token = registry.add_device("cam-1")
    store.ingest("cam-1", make_batch(0, 3))

    registry.revoke("cam-1")

    with pytest.raises(DeviceRevoked, match="'cam-1' was revoked"):
        registry.authenticate(token)
    with pytest.raises(DeviceRevoked, match="uploads are refused"):
        store.ingest("cam-1", make_batch(3, 6))
    assert registry.get_device("cam-1").revoked
    assert store.seqs("cam-1") == [1, 2, 3]  # what it stored before stays


def test_revoke_is_idempotent_and_keeps_the_first_time(registry: DeviceRegistry) -> None:
    registry.add_device("cam-1")
    registry.revoke("cam-1")
    first = registry.get_device("cam-1").revoked_at_ms
    registry.revoke("cam-1")
    assert registry.get_device("cam-1").revoked_at_ms == first


def test_unknown_devices_are_not_found(registry: DeviceRegistry) -> None:
    with pytest.raises(NotFound, match="no device 'ghost'"):
        registry.revoke("ghost")
    with pytest.raises(NotFound, match="no device 'ghost'"):
        registry.get_device("ghost")


def test_a_device_id_is_registered_once(registry: DeviceRegistry) -> None:
    token = registry.add_device("cam-1")
    with pytest.raises(AlreadyExists, match="'cam-1' is registered already"):
        registry.add_device("cam-1")
    registry.revoke("cam-1")
    with pytest.raises(AlreadyExists):
        registry.add_device("cam-1")
    with pytest.raises(DeviceRevoked):
        registry.authenticate(token)  # the failed attempts changed nothing


@pytest.mark.parametrize("device_id", ["", "a/b", "cam 1", "+", "#", "-lead", "x" * 129, "é"])
def test_malformed_device_ids_are_refused(registry: DeviceRegistry, device_id: str) -> None:
    with pytest.raises(InvalidArgument, match="invalid device id"):
        registry.add_device(device_id)
    assert registry.list_devices() == []


@pytest.mark.parametrize(
    ("labels", "reason"),
    [
        ({"": "x"}, "invalid label key"),
        ({"a b": "x"}, "invalid label key"),
        ({"site": "x" * 257}, "at most 256"),
        ({"site": 3}, "must be a UTF-8 string"),
        ({"site": "\ud800"}, "must be a UTF-8 string"),
        ({f"k{i}": "v" for i in range(65)}, "65 labels: at most 64"),
    ],
)
def test_malformed_labels_are_refused(registry: DeviceRegistry, labels: dict[str, str], reason: str) -> None:
    with pytest.raises(InvalidArgument, match=reason):
        registry.add_device("cam-1", labels)
    assert registry.list_devices() == []


def test_list_devices_in_id_order_with_revoked_ones(registry: DeviceRegistry) -> None:
    for device_id in ("cam-b", "cam-a", "cam-c"):
        registry.add_device(device_id, {"name": device_id})
    registry.revoke("cam-b")

    listed = registry.list_devices()

    assert [device.device_id for device in listed] == ["cam-a", "cam-b", "cam-c"]
    assert [device.revoked for device in listed] == [False, True, False]
    assert listed[0].labels == {"name": "cam-a"}
