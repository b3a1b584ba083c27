"""Property: whatever batches a truthful device sends, in whatever order and how often, the cloud stores each
record once and accounts for every seq up to its ack as stored or evicted (SQLite; the rules are shared)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cloud_sync.store import DeviceRegistry, ResultStore, open_database
from tests.cloud_sync.store.conftest import make_batch


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DeviceRegistry, ResultStore]]:
    db = open_database(f"sqlite:///{Path(tmp_path_factory.mktemp('property')) / 'cloud.db'}")
    yield DeviceRegistry(db), ResultStore(db)
    db.close()


@st.composite
def device_histories(draw: st.DrawFn) -> tuple[int, set[int], list[tuple[str, int, int]]]:
    """(seqs produced, seqs the device evicted, uploads): "next" continues from the device's ack by n seqs,
    "any" is any range (a replay, an overlap, or a batch past a gap)."""
    produced = draw(st.integers(0, 60))
    evicted = draw(st.sets(st.integers(1, produced))) if produced else set()
    upload = st.one_of(
        st.tuples(st.just("next"), st.integers(0, 15), st.just(0)),
        st.tuples(st.just("any"), st.integers(0, produced), st.integers(0, produced)),
    )
    return produced, evicted, draw(st.lists(upload, max_size=25))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(device_histories())
def test_every_seq_up_to_the_ack_is_stored_once_or_evicted(
    stores: tuple[DeviceRegistry, ResultStore], history: tuple[int, set[int], list[tuple[str, int, int]]]
) -> None:
    registry, store = stores
    produced, evicted, uploads = history
    device = f"prop-{uuid.uuid4().hex[:12]}"
    registry.add_device(device)
    device_ack = watermark = 0
    sent: set[int] = set()
    stored_sum = duplicates_sum = evicted_sum = 0

    for kind, a, b in uploads:
        after, through = (device_ack, min(device_ack + a, produced)) if kind == "next" else (min(a, b), max(a, b))
        seqs = [seq for seq in range(after + 1, through + 1) if seq not in evicted]
        outcome = store.ingest(
            device, make_batch(after, through, seqs, produced_total=produced, evicted_total=len(evicted))
        )
        # The rule: a batch that starts at or below the watermark moves it to its end; one past a gap does not.
        if after <= watermark:
            watermark = max(watermark, through)
        assert outcome.acked_seq == watermark
        assert outcome.stored + outcome.duplicates == len(seqs)
        device_ack = max(device_ack, outcome.acked_seq)
        sent.update(seqs)
        stored_sum += outcome.stored
        duplicates_sum += outcome.duplicates
        evicted_sum += outcome.evicted

    stored = store.seqs(device)
    reconciliation = store.reconcile(device)
    assert len(stored) == len(set(stored)) == reconciliation.stored == stored_sum  # no duplicates
    assert set(stored) <= sent
    acked = [seq for seq in stored if seq <= watermark]
    evicted_below = evicted & set(range(1, watermark + 1))
    assert set(acked) == set(range(1, watermark + 1)) - evicted_below
    assert reconciliation.evicted == evicted_sum == len(evicted_below)
    assert len(acked) + reconciliation.evicted == reconciliation.acked_seq == watermark
    ranges = store.eviction_ranges(device)
    assert sorted(seq for low, high in ranges for seq in range(low, high + 1)) == sorted(evicted_below)
    assert reconciliation.duplicates_total == duplicates_sum
