"""SampleStore over a real database (SQLite file, PostgreSQL schema): samples come back attributable and
filtered (model, version, device, time in SQL; reason and engine from the payload), paged by the results id
without a gap or a repeat, and decoded to the exact tensors the device kept."""

from __future__ import annotations

import numpy as np
import pytest

from cloud_sync.errors import InvalidArgument, TooLarge
from cloud_sync.store import Database
from cloud_sync.store.samples import SampleQuery, SampleStore, sample_inputs, sample_tensors
from edgefleet.proto.edgefleet.v1 import results_pb2
from tests.cloud_sync.samples.conftest import BASE_MS, Fleet, image, probabilities, sampled


def _mixed(fleet: Fleet) -> None:
    """cam-1: 3 random + 2 uncertain of v1; cam-2: 1 disagreement of v2 (TensorRT), a result and an event;
    other-model samples."""
    fleet.upload("cam-1", [sampled({"x": image(i)}) for i in range(3)])
    fleet.upload(
        "cam-1",
        [sampled({"x": image(10 + i)}, reason="uncertain", measure="margin", score=0.01 * i) for i in range(2)],
    )
    fleet.upload(
        "cam-2",
        [sampled({"x": image(20)}, reason="disagreement", engine="tensorrt/10.3.0", shadow_version=3)],
        version=2,
    )
    fleet.upload("cam-2", [b"a result"], kind=results_pb2.RECORD_KIND_RESULT, payload_type="inference.X", version=2)
    fleet.upload("cam-2", [b"an event"], kind=results_pb2.RECORD_KIND_EVENT, payload_type="edgefleet.v1.DeviceEvent")
    fleet.upload("cam-2", [sampled({"x": image(30)})], model="mnist")


def test_samples_are_attributable_and_filtered(db: Database, fleet: Fleet) -> None:
    _mixed(fleet)
    store = SampleStore(db)
    every = store.page(SampleQuery("digits"))
    assert [(s.device_id, s.seq, s.version, s.reason) for s in every.samples] == [
        ("cam-1", 1, 1, "random"),
        ("cam-1", 2, 1, "random"),
        ("cam-1", 3, 1, "random"),
        ("cam-1", 4, 1, "uncertain"),
        ("cam-1", 5, 1, "uncertain"),
        ("cam-2", 1, 2, "disagreement"),
    ]
    assert not every.more and every.next_after_id == every.samples[-1].id
    hard = store.page(SampleQuery("digits", reason="uncertain")).samples
    assert [(s.seq, s.measure, s.score) for s in hard] == [(4, "margin", 0.0), (5, "margin", 0.01)]
    (disagreed,) = store.page(SampleQuery("digits", reason="disagreement")).samples
    assert (disagreed.engine, disagreed.shadow_version, disagreed.precision) == ("tensorrt/10.3.0", 3, "fp32")
    assert [s.seq for s in store.page(SampleQuery("digits", version=2)).samples] == [1]
    assert [s.seq for s in store.page(SampleQuery("digits", device_id="cam-2")).samples] == [1]
    assert [s.seq for s in store.page(SampleQuery("digits", engine="tensorrt/10.3.0")).samples] == [1]
    assert [s.device_id for s in store.page(SampleQuery("mnist")).samples] == ["cam-2"]
    assert store.page(SampleQuery("nothing")).samples == []
    # created_at_ms is BASE_MS + seq: [BASE+2, BASE+4) holds cam-1's seqs 2 and 3 (and no cam-2 seq 1).
    window = store.page(SampleQuery("digits", since_ms=BASE_MS + 2, until_ms=BASE_MS + 4)).samples
    assert [(s.device_id, s.seq) for s in window] == [("cam-1", 2), ("cam-1", 3)]


def test_pages_follow_the_cursor_without_gap_or_repeat(db: Database, fleet: Fleet) -> None:
    for i in range(5):
        fleet.upload("cam-1", [sampled({"x": image(i)}, reason="uncertain" if i % 2 else "")])
        fleet.upload("cam-2", [sampled({"x": image(i)})])
    store = SampleStore(db)
    seen, after = [], 0
    while True:
        page = store.page(SampleQuery("digits", reason="random"), after, limit=2)
        seen += [(s.device_id, s.seq) for s in page.samples]
        after = page.next_after_id
        if not page.more:
            break
    assert seen == [
        ("cam-1", 1),
        ("cam-2", 1),
        ("cam-2", 2),
        ("cam-1", 3),
        ("cam-2", 3),
        ("cam-2", 4),
        ("cam-1", 5),
        ("cam-2", 5),
    ]
    # A scan budget smaller than the candidates returns a short page that says to go on.
    short = store.page(SampleQuery("digits", reason="uncertain"), 0, limit=10, max_scan=3)
    assert ([s.seq for s in short.samples], short.more, short.scanned) == ([2], True, 3)
    rest = store.page(SampleQuery("digits", reason="uncertain"), short.next_after_id, limit=10)
    assert ([s.seq for s in rest.samples], rest.more) == ([4], False)


def test_tensors_decode_to_what_the_device_kept(db: Database, fleet: Fleet) -> None:
    rng = np.random.default_rng(7)
    x = rng.random((2, 1, 28, 28), dtype=np.float32)
    ids = np.array([[3, 1]], dtype=np.int64)
    fleet.upload("cam-1", [sampled({"x": x, "ids": ids}, {"probabilities": probabilities(4)}, reason="uncertain")])
    (sample,) = SampleStore(db).page(SampleQuery("digits")).samples
    inputs = sample_inputs(sample)
    assert set(inputs) == {"x", "ids"}
    np.testing.assert_array_equal(inputs["x"], x)
    assert inputs["x"].dtype == np.float32 and inputs["ids"].dtype == np.int64
    np.testing.assert_array_equal(inputs["ids"], ids)
    both_inputs, outputs = sample_tensors(sample)
    assert set(both_inputs) == {"x", "ids"} and set(outputs) == {"probabilities"}
    np.testing.assert_array_equal(outputs["probabilities"], probabilities(4))


def test_typed_contents_decode_like_raw_ones(db: Database, fleet: Fleet) -> None:
    message = results_pb2.SampledInference(reason="uncertain")
    tensor = message.request.inputs.add(name="x", datatype="INT32", shape=[2, 2])
    tensor.contents.int_contents.extend([1, -2, 3, 4])
    fleet.upload("cam-1", [message.SerializeToString()])
    (sample,) = SampleStore(db).page(SampleQuery("digits")).samples
    np.testing.assert_array_equal(sample_inputs(sample)["x"], np.array([[1, -2], [3, 4]], dtype=np.int32))


def test_calibration_is_newest_first_of_any_reason_and_skips_the_undecodable(db: Database, fleet: Fleet) -> None:
    fleet.upload("cam-1", [sampled({"x": image(i)}, reason="uncertain" if i == 1 else "") for i in range(3)])
    fleet.upload("cam-1", [b"\xff\xff not a message"])
    fleet.upload("cam-2", [sampled({"x": image(9)})], version=2)
    store = SampleStore(db)
    got = store.calibration("digits", 1, 10)
    assert [float(a["x"].flat[0]) for a in got] == [2.0, 1.0, 0.0]
    assert [float(a["x"].flat[0]) for a in store.calibration("digits", None, 2)] == [9.0, 2.0]
    recent = store.calibration("digits", 1, 10, since_ms=BASE_MS + 3)  # seq 3 (and the undecodable seq 4)
    assert [float(a["x"].flat[0]) for a in recent] == [2.0]
    assert store.calibration("mnist", None, 5) == []
    page = store.page(SampleQuery("digits", version=1))
    assert (len(page.samples), page.undecodable) == (3, 1)
    # A byte bound stops before the sample that would pass it (calibration holds the arrays in memory).
    one = int(got[0]["x"].nbytes)
    assert [float(a["x"].flat[0]) for a in store.calibration("digits", 1, 10, max_bytes=2 * one)] == [2.0, 1.0]
    assert store.calibration("digits", 1, 10, max_bytes=one - 1) == []


@pytest.mark.parametrize(
    ("query", "message"),
    [
        (SampleQuery(""), "model"),
        (SampleQuery("digits", version=0), "version"),
        (SampleQuery("digits", reason="hard"), "reason: one of random, uncertain, disagreement"),
        (SampleQuery("digits", device_id=""), "device_id"),
        (SampleQuery("digits", since_ms=5, until_ms=5), "until"),
    ],
)
def test_a_bad_query_is_refused_naming_the_filter(db: Database, query: SampleQuery, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        SampleStore(db).page(query)


def test_limits_are_checked(db: Database, fleet: Fleet) -> None:
    fleet.upload("cam-1", [sampled({"x": image(i)}) for i in range(3)])
    store = SampleStore(db)
    for bad in (0, 10_001):
        with pytest.raises(InvalidArgument, match="limit"):
            store.page(SampleQuery("digits"), limit=bad)
        with pytest.raises(InvalidArgument, match="limit"):
            store.calibration("digits", None, bad)
    with pytest.raises(InvalidArgument, match="after_id"):
        store.page(SampleQuery("digits"), after_id=-1)
    size = len(sampled({"x": image(0)}))
    assert len(store.page(SampleQuery("digits"), max_bytes=3 * size).samples) == 3
    with pytest.raises(TooLarge, match="first 3 samples"):
        store.page(SampleQuery("digits"), max_bytes=3 * size - 1)
