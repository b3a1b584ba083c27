"""Enrollment tokens in the store, on SQLite and PostgreSQL: minted once, redeemed once, atomically.

A used, expired or unknown token enrols nothing and says what to do; a redeemed token registers exactly one
device (also when many present it at once); only the token's sha256 is stored.
"""

from __future__ import annotations

import threading

import pytest
import sqlalchemy as sa
from hypothesis import given
from hypothesis import strategies as st

from cloud_sync.errors import AlreadyExists, CloudSyncError, InvalidArgument
from cloud_sync.store import Database, DeviceRegistry
from cloud_sync.store.database import now_ms
from cloud_sync.store.devices import check_device_id, is_reserved
from cloud_sync.store.enrollment import (
    MAX_TTL_S,
    MIN_TTL_S,
    EnrollmentRefused,
    EnrollmentTokens,
    device_id_for_host,
    enrollment_tokens,
)


@pytest.fixture
def tokens(db: Database, devices: DeviceRegistry) -> EnrollmentTokens:
    return EnrollmentTokens(db, devices)


def test_a_redeemed_token_registers_the_device_with_its_labels(
    tokens: EnrollmentTokens, devices: DeviceRegistry
) -> None:
    token, expires = tokens.mint({"site": "lab", "cam": "front"}, ttl_s=3600)
    assert token.startswith("efe_") and expires > now_ms() + 3500_000
    device_id, device_token, labels = tokens.redeem(token, hostname="jetson-7")
    assert device_id.startswith("jetson-7-") and len(device_id) == len("jetson-7-") + 6
    assert labels == {"site": "lab", "cam": "front"}
    assert devices.authenticate(device_token) == device_id
    assert devices.get_device(device_id).labels == labels
    [listed] = tokens.list()
    assert listed.used_by == device_id and listed.state(now_ms()) == "used"


def test_only_the_token_s_hash_is_stored(tokens: EnrollmentTokens, db: Database) -> None:
    token, _ = tokens.mint({}, ttl_s=3600)
    rows = db.read(lambda conn: conn.execute(sa.select(enrollment_tokens)).all())
    assert len(rows) == 1
    assert token.encode() not in repr(rows).encode()
    assert all(token[4:20] not in repr(t) for t in tokens.list())


def test_a_used_token_is_refused_and_enrols_nothing(tokens: EnrollmentTokens, devices: DeviceRegistry) -> None:
    token, _ = tokens.mint({}, ttl_s=3600)
    tokens.redeem(token, hostname="a")
    with pytest.raises(EnrollmentRefused, match="used already.*fleetctl devices token create") as refused:
        tokens.redeem(token, hostname="b")
    assert refused.value.reason == "used"
    assert len(devices.list_devices()) == 1


def test_an_expired_token_is_refused(tokens: EnrollmentTokens, devices: DeviceRegistry) -> None:
    long_ago = now_ms() - 2 * MIN_TTL_S * 1000
    token, expires = tokens.mint({}, ttl_s=MIN_TTL_S, now=long_ago)
    assert expires < now_ms()
    with pytest.raises(EnrollmentRefused, match="expired.*mint a new one") as refused:
        tokens.redeem(token, hostname="a")
    assert refused.value.reason == "expired"
    assert devices.list_devices() == []
    assert tokens.list()[0].state(now_ms()) == "expired"


@pytest.mark.parametrize("token", ["", "efe_unknown", "efd_a-device-token", "efe_" + "x" * 200, "\u00e9"])
def test_an_unknown_or_malformed_token_is_refused(tokens: EnrollmentTokens, token: str) -> None:
    tokens.mint({}, ttl_s=3600)
    with pytest.raises(EnrollmentRefused, match="not one cloud-sync minted") as refused:
        tokens.redeem(token, hostname="a")
    assert refused.value.reason == "unknown"


def test_a_pre_chosen_device_id_is_used(tokens: EnrollmentTokens) -> None:
    token, _ = tokens.mint({"site": "lab"}, ttl_s=3600, device_id="cam-17")
    assert tokens.redeem(token, hostname="whatever")[0] == "cam-17"


def test_a_pre_chosen_id_registered_already_is_refused_at_mint(
    tokens: EnrollmentTokens, devices: DeviceRegistry
) -> None:
    devices.add_device("cam-1")
    with pytest.raises(AlreadyExists, match="registered already"):
        tokens.mint({}, ttl_s=3600, device_id="cam-1")
    assert tokens.list() == []


def test_an_id_taken_between_mint_and_redeem_leaves_the_token_unused(
    tokens: EnrollmentTokens, devices: DeviceRegistry
) -> None:
    token, _ = tokens.mint({}, ttl_s=3600, device_id="cam-2")
    devices.add_device("cam-2")
    with pytest.raises(AlreadyExists):
        tokens.redeem(token, hostname="a")
    assert tokens.list()[0].used_at_ms is None


@pytest.mark.parametrize(
    ("labels", "ttl_s", "device_id", "match"),
    [
        ({"bad key!": "x"}, 3600, None, "invalid label key"),
        ({}, MIN_TTL_S - 1, None, "60 s to 30 days"),
        ({}, MAX_TTL_S + 1, None, "60 s to 30 days"),
        ({}, True, None, "60 s to 30 days"),
        ({}, 3600, "cloud-sync-x", "reserved"),
        ({}, 3600, "a/b", "invalid device id"),
    ],
)
def test_bad_mint_input_is_refused_and_changes_nothing(
    tokens: EnrollmentTokens, labels: dict[str, str], ttl_s: int, device_id: str | None, match: str
) -> None:
    with pytest.raises(InvalidArgument, match=match):
        tokens.mint(labels, ttl_s=ttl_s, device_id=device_id)
    assert tokens.list() == []


def test_many_devices_presenting_one_token_at_once_enrol_one(tokens: EnrollmentTokens, devices: DeviceRegistry) -> None:
    token, _ = tokens.mint({}, ttl_s=3600)
    outcomes: list[object] = []
    start = threading.Barrier(8)

    def present(n: int) -> None:
        start.wait()
        try:
            outcomes.append(tokens.redeem(token, hostname=f"host-{n}"))
        except CloudSyncError as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=present, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    enrolled = [o for o in outcomes if isinstance(o, tuple)]
    assert len(enrolled) == 1, outcomes
    assert all(isinstance(o, EnrollmentRefused) and o.reason == "used" for o in outcomes if o not in enrolled)
    assert [d.device_id for d in devices.list_devices()] == [enrolled[0][0]]


def test_listeners_hear_of_enrolled_and_revoked_devices(tokens: EnrollmentTokens, devices: DeviceRegistry) -> None:
    heard: list[tuple[str, ...]] = []
    devices.on_added.append(lambda device_id, token: heard.append(("added", device_id, token)))
    devices.on_revoked.append(lambda device_id: heard.append(("revoked", device_id)))
    token, _ = tokens.mint({}, ttl_s=3600)
    device_id, device_token, _labels = tokens.redeem(token, hostname="h")
    devices.revoke(device_id)
    assert heard == [("added", device_id, device_token), ("revoked", device_id)]


def test_a_failing_listener_does_not_undo_the_change(tokens: EnrollmentTokens, devices: DeviceRegistry) -> None:
    def broken(device_id: str, token: str) -> None:
        raise RuntimeError("broker away")

    devices.on_added.append(broken)
    token, _ = tokens.mint({}, ttl_s=3600)
    device_id, device_token, _ = tokens.redeem(token, hostname="h")
    assert devices.authenticate(device_token) == device_id


@given(st.text(max_size=300))
def test_a_device_id_from_any_hostname_is_valid_and_not_reserved(hostname: str) -> None:
    device_id = device_id_for_host(hostname, "a1b2c3")
    assert check_device_id(device_id) == device_id
    assert not is_reserved(device_id)
    assert device_id.endswith("-a1b2c3")


@pytest.mark.parametrize(
    ("hostname", "expected"),
    [
        ("jetson-7", "jetson-7-abcdef"),
        ("Cam 1.local", "Cam-1.local-abcdef"),
        ("", "device-abcdef"),
        ("cloud-sync", "device-abcdef"),
        ("../etc", "etc-abcdef"),
        ("a" * 300, "a" * 121 + "-abcdef"),
    ],
)
def test_hostnames_become_device_ids(hostname: str, expected: str) -> None:
    assert device_id_for_host(hostname, "abcdef") == expected
