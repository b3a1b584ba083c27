"""Properties of ingest. Whatever batches a truthful device sends, in whatever order and how often, the cloud
stores each record once and accounts for every seq up to its ack as stored or evicted (SQLite; the rules are
shared). And whatever its records hold, no record wedges the stream and the ledger balances on both sides
(both engines: PostgreSQL is the one that cannot hold a NUL)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cloud_sync.store import DeviceRegistry, IngestLimits, ResultStore, open_database
from cloud_sync.store.batches import record_checksum
from edgefleet.proto.edgefleet.v1 import results_pb2
from tests.cloud_sync.store.conftest import make_batch
from tests.postgres import ENGINES, postgres_schema_url


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


# --- no record content wedges ingest ----------------------------------------------------------------------------

# Small record limits, so records past them are cheap to draw.
LIMITS = IngestLimits(max_record_payload_bytes=64, max_model_chars=8, max_payload_type_chars=8, max_request_id_chars=8)


def _text(limit: int) -> st.SearchStrategy[str]:
    return st.one_of(
        st.text(max_size=limit),
        st.text(alphabet=st.characters(codec="utf-8"), min_size=limit - 1, max_size=limit + 2),
        st.text(alphabet="ab\0", max_size=4),
    )


records_contents = st.fixed_dictionaries(
    {
        "created_at_ms": st.integers(-(2**63), 2**63 - 1),
        "model": _text(LIMITS.max_model_chars),
        "version": st.integers(0, 2**32 - 1),
        "priority": st.integers(0, 2**32 - 1),
        "kind": st.one_of(st.sampled_from([0, 1, 2, 3]), st.integers(-(2**31), 2**31 - 1)),
        "payload_type": _text(LIMITS.max_payload_type_chars),
        "payload": st.one_of(st.binary(max_size=8), st.integers(62, 66).map(lambda n: b"\0" * n)),
        "request_id": _text(LIMITS.max_request_id_chars),
        "damaged": st.booleans(),  # the checksum does not match
    }
)


@st.composite
def uploads(draw: st.DrawFn) -> list[tuple[str, list[dict[str, Any]], int, int]]:
    """What a device sends: ("next", contents of each seq, seqs it evicts, seqs it declares rejected), or "again"
    (its last stream's ack was lost: the same batch once more)."""
    steps = []
    for _ in range(draw(st.integers(1, 6))):
        if steps and draw(st.booleans()) and draw(st.booleans()):
            steps.append(("again", [], 0, 0))
            continue
        contents = draw(st.lists(records_contents, max_size=6))
        steps.append(("next", contents, draw(st.integers(0, 2)), draw(st.integers(0, 2))))
    return steps


@pytest.fixture(scope="module", params=ENGINES)
def any_store(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[DeviceRegistry, ResultStore]]:
    if request.param == "sqlite":
        db = open_database(f"sqlite:///{Path(tmp_path_factory.mktemp('contents')) / 'cloud.db'}")
        yield DeviceRegistry(db), ResultStore(db, LIMITS)
        db.close()
        return
    with postgres_schema_url() as url:
        db = open_database(url)
        yield DeviceRegistry(db), ResultStore(db, LIMITS)
        db.close()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(uploads())
def test_no_record_content_wedges_ingest_and_the_ledger_balances_on_both_sides(
    any_store: tuple[DeviceRegistry, ResultStore], steps: list[tuple[str, list[dict[str, Any]], int, int]]
) -> None:
    registry, store = any_store
    device = f"any-{uuid.uuid4().hex[:12]}"
    registry.add_device(device)
    produced = evicted = declared_total = 0
    device_rejected = device_delivered = 0
    held: set[int] = set()  # seqs the device still holds (sent, not acked), with what it declared
    declared_here: set[int] = set()
    acked = 0
    last: results_pb2.ResultBatch | None = None
    for kind, contents, evicts, declares in steps:
        if kind == "again":
            assert last is not None
            batch = last
        else:
            after = produced
            records = []
            for fields in contents:
                produced += 1
                values = {k: v for k, v in fields.items() if k != "damaged"}
                record = results_pb2.ResultRecord(seq=produced, **values)
                record.checksum = record_checksum(record) ^ (1 if fields["damaged"] else 0)
                records.append(record)
            rejected = list(range(produced + 1, produced + 1 + declares))
            produced += declares + evicts  # the last `evicts` seqs were evicted before the read
            evicted += evicts
            declared_total += declares
            declared_here.update(rejected)
            batch = make_batch(
                after,
                produced,
                records=records,
                rejected=rejected,
                produced_total=produced,
                evicted_total=evicted,
                rejected_total=device_rejected + len(declared_here - set(range(1, acked + 1))),
            )
            if not records:
                batch.ClearField("records")
            held.update(r.seq for r in records)
        outcome = store.ingest(device, batch)  # never refused: every batch here is truthful
        assert outcome.acked_seq == batch.through_seq  # the stream always moves past every record
        named = set(outcome.rejected_seqs)
        # The device deletes up to the ack: each record it held counts once, as rejected when named.
        for seq in sorted(s for s in held if s <= outcome.acked_seq):
            held.discard(seq)
            if seq in named:
                device_rejected += 1
            else:
                device_delivered += 1
        for seq in sorted(s for s in declared_here if acked < s <= outcome.acked_seq):
            device_rejected += 1 if seq in named else 0
            device_delivered += 0 if seq in named else 1
        acked = max(acked, outcome.acked_seq)
        last = batch

    r = store.reconcile(device)
    assert r.acked_seq == produced
    assert r.stored + r.evicted + r.rejected == produced == r.device_produced
    assert (device_delivered, evicted, device_rejected) == (r.stored, r.evicted, r.rejected)
    assert len(store.seqs(device)) == r.stored
    assert [e.seq for e in store.quarantine(device, limit=1000)] == sorted(
        set(range(1, produced + 1))
        - set(store.seqs(device))
        - {s for lo, hi in store.eviction_ranges(device) for s in range(lo, hi + 1)}
    )
