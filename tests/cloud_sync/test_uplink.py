"""The Uplink service through a real gRPC channel to a real cloud-sync: who may upload, what is stored, once.

Every refusal carries its status and a reason, changes nothing in the store, and leaves the server serving
(each refusal test ends with a good upload by the same device that starts from seq 0). No record's content
wedges a device's stream: the outside report's reproductions run a real device (its Outbox and Uploader)
against the real cloud-sync, and the ledger stored + evicted + rejected = produced balances on both sides.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from structlog.testing import capture_logs

from cloud_sync.store import DeviceRegistry, IngestOutcome, ResultStore, open_database
from cloud_sync.store.batches import record_checksum
from cloud_sync.uplink import DeviceAuthenticator, UplinkServicer
from edge_runtime.config import CloudSection, UploadPolicy
from edge_runtime.outbox import Outbox, OutboxRecord
from edge_runtime.sync.uplink import Uploader
from edgefleet.proto.edgefleet.v1 import results_pb2, services_pb2, services_pb2_grpc
from edgefleet.rpc import add_service
from tests.cloud_sync.conftest import MAX_MESSAGE_BYTES, UPLOAD_METHOD, RunningCloudSync, batch, record
from tests.edge_runtime.outbox.test_migration import build_v1
from tests.loopcheck import LoopThread
from tests.waiting import wait_for


def counted(
    b: results_pb2.ResultBatch, produced: int, evicted: int = 0, *, checksums: bool = False
) -> results_pb2.ResultBatch:
    """`b` with the counters a truthful device sends (and, with `checksums`, its records' checksums)."""
    b.produced_total, b.evicted_total = produced, evicted
    if checksums:
        b.record_checksum = results_pb2.RECORD_CHECKSUM_CRC32
        for r in b.records:
            r.checksum = record_checksum(r)
    return b


def refused(call: object) -> grpc.RpcError:
    """The RpcError that calling `call` raises."""
    with pytest.raises(grpc.RpcError) as caught:
        call()  # type: ignore[operator]
    return caught.value


def assert_untouched_then_serves(cloud_sync: RunningCloudSync, device_id: str, token: str) -> None:
    """Nothing of the device stored or counted, and a first upload from seq 0 is taken whole."""
    uplink = cloud_sync.device(device_id)["uplink"]
    assert (uplink["stored"], uplink["acked_seq"], uplink["duplicates_total"], uplink["evicted"]) == (0, 0, 0, 0)
    assert cloud_sync.results(device_id) == []
    ack = cloud_sync.upload(token, [batch(0, 2)])
    assert (ack.acked_seq, ack.stored, ack.duplicates) == (2, 2, 0)
    assert [r["seq"] for r in cloud_sync.results(device_id)] == [1, 2]


def test_a_call_without_credentials_is_unauthenticated_with_the_reason(cloud_sync: RunningCloudSync) -> None:
    error = refused(lambda: cloud_sync.upload(None, [batch(0, 1)]))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "authorization: Bearer" in error.details()


@pytest.mark.parametrize(
    "metadata",
    [
        [("authorization", "Bearer efd_not-a-token-of-anyone")],
        [("authorization", "Basic dXNlcjpwYXNz")],
        [("authorization", "Bearer " + "x" * 4000)],
    ],
    ids=["unknown-token", "not-bearer", "huge-token"],
)
def test_a_wrong_credential_is_unauthenticated(cloud_sync: RunningCloudSync, metadata: list[tuple[str, str]]) -> None:
    stub_call = cloud_sync.channel.stream_unary(
        UPLOAD_METHOD,
        request_serializer=results_pb2.ResultBatch.SerializeToString,
        response_deserializer=results_pb2.UploadAck.FromString,
    )
    error = refused(lambda: stub_call(iter([batch(0, 1)]), metadata=metadata, timeout=10))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error.details()


def test_a_revoked_device_is_permission_denied(cloud_sync: RunningCloudSync) -> None:
    # One device uploaded before its revocation (its token is in the servicer's cache), one never did.
    uploaded, uploaded_token = cloud_sync.new_device("revoked")
    assert cloud_sync.upload(uploaded_token, [batch(0, 1)]).acked_seq == 1
    fresh, fresh_token = cloud_sync.new_device("revoked")
    for device_id in (uploaded, fresh):
        assert cloud_sync.api.post(f"/v1/devices/{device_id}/revoke").status_code == 200

    for token in (uploaded_token, fresh_token):
        error = refused(lambda token=token: cloud_sync.upload(token, [batch(1, 2)]))
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "revoked" in error.details()
    assert [r["seq"] for r in cloud_sync.results(uploaded)] == [1]
    assert cloud_sync.results(fresh) == []


def test_an_upload_is_acked_and_a_replay_stores_nothing_twice(cloud_sync: RunningCloudSync) -> None:
    device_id, token = cloud_sync.new_device("cam")
    batches = [counted(batch(0, 3), 5), counted(batch(3, 5), 5)]

    ack = cloud_sync.upload(token, batches)
    assert (ack.acked_seq, ack.stored, ack.duplicates, ack.evicted) == (5, 5, 0, 0)
    uplink = cloud_sync.device(device_id)["uplink"]
    assert (uplink["acked_seq"], uplink["stored"], uplink["duplicates_total"]) == (5, 5, 0)
    assert uplink["device_produced"] == 5

    replay = cloud_sync.upload(token, batches)
    assert (replay.acked_seq, replay.stored, replay.duplicates, replay.evicted) == (5, 0, 5, 0)
    uplink = cloud_sync.device(device_id)["uplink"]
    assert (uplink["acked_seq"], uplink["stored"], uplink["duplicates_total"]) == (5, 5, 5)
    rows = cloud_sync.results(device_id)
    assert [r["seq"] for r in rows] == [1, 2, 3, 4, 5]
    assert [r["request_id"] for r in rows] == [f"req-{seq}" for seq in range(1, 6)]


def test_seqs_a_batch_leaves_out_are_counted_as_evicted(cloud_sync: RunningCloudSync) -> None:
    device_id, token = cloud_sync.new_device("cam")
    ack = cloud_sync.upload(token, [counted(batch(0, 6, [1, 2, 6]), 6, evicted=3)])
    assert (ack.acked_seq, ack.stored, ack.evicted) == (6, 3, 3)
    uplink = cloud_sync.device(device_id)["uplink"]
    assert (uplink["stored"], uplink["evicted"]) == (3, 3)


def test_uploads_land_under_the_device_whose_token_sent_them(cloud_sync: RunningCloudSync) -> None:
    # ResultBatch has no device field: the token alone says whose records these are.
    a, a_token = cloud_sync.new_device("a")
    b, _b_token = cloud_sync.new_device("b")
    assert cloud_sync.upload(a_token, [batch(0, 3)]).stored == 3

    assert {r["device_id"] for r in cloud_sync.results(a)} == {a}
    assert cloud_sync.results(b) == []
    assert cloud_sync.device(b)["uplink"]["stored"] == 0


INVALID_BATCHES = {
    "seqs-not-increasing": (batch(0, 3, [1, 3, 2]), "seqs must increase"),
    "seq-repeated": (batch(0, 3, [1, 1, 2]), "seqs must increase"),
    "through-below-after": (batch(5, 3, []), "below after_seq"),
    "record-past-through": (batch(0, 2, [1, 2, 3]), "past through_seq"),
    "record-at-after": (batch(2, 4, [2, 3]), "does not follow after_seq"),
    # The outside report: counters that contradict the batch moved the watermark to 10**15.
    "past-produced-far": (counted(batch(12, 10**15, []), 12), "past the device's own produced_total 12"),
    "past-produced": (counted(batch(2, 5, []), 2, evicted=3), "past the device's own produced_total 2"),
    "more-evicted-than-counted": (counted(batch(0, 5, [1]), 5, evicted=2), "leaves out 4 seqs"),
}


@pytest.mark.parametrize("bad, reason", INVALID_BATCHES.values(), ids=INVALID_BATCHES.keys())
def test_an_invalid_batch_is_refused_with_its_reason_and_nothing_is_stored(
    cloud_sync: RunningCloudSync, bad: results_pb2.ResultBatch, reason: str
) -> None:
    device_id, token = cloud_sync.new_device("invalid")
    error = refused(lambda: cloud_sync.upload(token, [bad]))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reason in error.details()
    assert_untouched_then_serves(cloud_sync, device_id, token)


def test_an_invalid_batch_after_a_good_one_keeps_the_good_one_only(cloud_sync: RunningCloudSync) -> None:
    device_id, token = cloud_sync.new_device("invalid")
    error = refused(lambda: cloud_sync.upload(token, [batch(0, 2), batch(2, 4, [4, 3])]))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    # The first batch was committed (alone, or with the second in a savepoint of its own); the device, unacked,
    # sends it again.
    assert [r["seq"] for r in cloud_sync.results(device_id)] == [1, 2]
    assert cloud_sync.device(device_id)["uplink"]["acked_seq"] == 2


def test_a_long_stream_is_stored_whole_and_acked_to_its_end(cloud_sync: RunningCloudSync) -> None:
    """Batches received while others are stored are stored together: each once, in order."""
    device_id, token = cloud_sync.new_device("long")
    batches = [batch(i * 5, i * 5 + 5) for i in range(40)]
    for b in batches:
        b.produced_total = 200
    ack = cloud_sync.upload(token, batches, timeout=30)
    assert (ack.acked_seq, ack.stored, ack.duplicates) == (200, 200, 0)
    assert [r["seq"] for r in cloud_sync.results(device_id)] == list(range(1, 201))


def test_bytes_that_are_not_a_result_batch_after_good_ones_keep_the_good_ones(cloud_sync: RunningCloudSync) -> None:
    device_id, token = cloud_sync.new_device("garbage-late")
    raw = cloud_sync.channel.stream_unary(UPLOAD_METHOD)
    good = [batch(0, 2).SerializeToString(), batch(2, 4).SerializeToString()]
    metadata = [("authorization", f"Bearer {token}")]
    error = refused(lambda: raw(iter([*good, b"\xff\xff\xff\xff"]), metadata=metadata, timeout=10))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid edgefleet.v1.ResultBatch" in error.details()
    wait_for(lambda: cloud_sync.device(device_id)["uplink"]["acked_seq"] == 4, 10, "the good batches stored")
    assert [r["seq"] for r in cloud_sync.results(device_id)] == [1, 2, 3, 4]


def test_bytes_that_are_not_a_result_batch_are_invalid_argument(cloud_sync: RunningCloudSync) -> None:
    device_id, token = cloud_sync.new_device("garbage")
    raw = cloud_sync.channel.stream_unary(UPLOAD_METHOD)  # identity (de)serializers: bytes on the wire as given
    metadata = [("authorization", f"Bearer {token}")]
    error = refused(lambda: raw(iter([b"\xff\xff\xff\xff"]), metadata=metadata, timeout=10))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid edgefleet.v1.ResultBatch" in error.details()
    assert_untouched_then_serves(cloud_sync, device_id, token)


def test_a_message_past_max_message_bytes_is_resource_exhausted(cloud_sync: RunningCloudSync) -> None:
    device_id, token = cloud_sync.new_device("big")
    oversized = batch(0, 1, records=[record(1, payload=b"x" * (MAX_MESSAGE_BYTES + 1))])
    error = refused(lambda: cloud_sync.upload(token, [oversized]))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert_untouched_then_serves(cloud_sync, device_id, token)


def test_refusals_are_logged_without_the_credentials(cloud_sync: RunningCloudSync) -> None:
    device_id, token = cloud_sync.new_device("quiet")
    before = cloud_sync.proc.event_names().count("uplink.refused")
    wrong = token[:-4] + "AAAA"
    refused(lambda: cloud_sync.upload(wrong, [batch(0, 1)]))
    refused(lambda: cloud_sync.upload(token, [batch(0, 1, [2])]))
    wait_for(lambda: cloud_sync.proc.event_names().count("uplink.refused") >= before + 2, 10, "two uplink.refused")

    refusals = [e for e in cloud_sync.proc.events if e.get("event") == "uplink.refused"][before:]
    assert {e["error"] for e in refusals} == {"Unauthenticated", "InvalidBatch"}
    assert any(e["device"] == device_id for e in refusals)
    logged = repr(cloud_sync.proc.events) + "".join(cloud_sync.proc.not_json)
    assert token not in logged and wrong not in logged


class _FailingResultStore(ResultStore):
    """A real store whose ingest then fails as a bug would: no request makes the real one fail on cue."""

    def ingest(self, device_id: str, batch: results_pb2.ResultBatch) -> IngestOutcome:
        raise RuntimeError("a bug in ingest")

    def ingest_many(
        self, device_id: str, batches: Sequence[results_pb2.ResultBatch]
    ) -> tuple[list[IngestOutcome], Exception | None]:
        raise RuntimeError("a bug in ingest")


def test_an_unexpected_error_is_internal_with_a_generic_message_and_no_secret_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = open_database(f"sqlite:///{tmp_path / 'uplink.db'}")
    token = DeviceRegistry(db).add_device("cam-1")
    executor = ThreadPoolExecutor(2, thread_name_prefix="test-ingest")

    async def upload_once() -> grpc.aio.AioRpcError:
        server = grpc.aio.server()
        servicer = UplinkServicer(DeviceAuthenticator(DeviceRegistry(db)), _FailingResultStore(db), executor)
        add_service(server, services_pb2, "Uplink", servicer)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = services_pb2_grpc.UplinkStub(channel)
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await stub.Upload(iter([batch(0, 1)]), metadata=[("authorization", f"Bearer {token}")])
                return caught.value
        finally:
            await server.stop(None)

    try:
        with capture_logs() as logs:
            error = asyncio.run(upload_once())
    finally:
        executor.shutdown()
        db.close()
    assert error.code() == grpc.StatusCode.INTERNAL
    assert error.details() == "internal error in cloud-sync; its log has the details"
    [logged] = [e for e in logs if e["event"] == "uplink.internal_error"]
    assert (logged["device"], logged["error"], logged["detail"]) == ("cam-1", "RuntimeError", "a bug in ingest")
    assert token not in repr(logs) + caplog.text


def test_uploads_are_counted_in_the_metrics(cloud_sync: RunningCloudSync) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    def counts() -> dict[tuple[str, str], float]:
        text = cloud_sync.api.get("/metrics").text
        return {
            (s.name, s.labels.get("outcome", "")): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name in ("cloud_sync_uplink_records_total", "cloud_sync_uplink_batches_total")
        }

    before = counts()
    _device_id, token = cloud_sync.new_device("metrics")
    cloud_sync.upload(token, [counted(batch(0, 4), 7, 1), counted(batch(4, 6, [5]), 7, 1)])
    cloud_sync.upload(token, [counted(batch(0, 4), 7, 1)])
    cloud_sync.upload(token, [counted(batch(6, 7, records=[record(7, kind=99)]), 7, 1)])
    after = counts()

    def grew(key: tuple[str, str]) -> float:
        return after.get(key, 0) - before.get(key, 0)

    assert grew(("cloud_sync_uplink_batches_total", "")) == 4
    assert grew(("cloud_sync_uplink_records_total", "stored")) == 5
    assert grew(("cloud_sync_uplink_records_total", "evicted")) == 1
    assert grew(("cloud_sync_uplink_records_total", "duplicate")) == 4
    assert grew(("cloud_sync_uplink_records_total", "rejected")) == 1


# --- no record wedges a stream --------------------------------------------------------------------------------


def test_the_contradicting_batches_of_the_report_are_refused_and_a_real_record_then_stored(
    cloud_sync: RunningCloudSync,
) -> None:
    device_id, token = cloud_sync.new_device("liar")
    assert cloud_sync.upload(token, [counted(batch(0, 12), 12)]).acked_seq == 12
    before = cloud_sync.device(device_id)["uplink"]
    for bad in (counted(batch(12, 10**15, []), 12), counted(batch(2, 5, []), 2)):
        error = refused(lambda bad=bad: cloud_sync.upload(token, [bad]))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "past the device's own produced_total" in error.details()
        assert cloud_sync.device(device_id)["uplink"] == before  # the store unchanged
    ack = cloud_sync.upload(token, [counted(batch(12, 13), 13)])
    assert (ack.acked_seq, ack.stored) == (13, 1)
    assert cloud_sync.results(device_id)[-1]["seq"] == 13


def test_a_record_with_a_wrong_checksum_is_quarantined_and_the_stream_moves_on(cloud_sync: RunningCloudSync) -> None:
    device_id, token = cloud_sync.new_device("flipped")
    crafted = counted(batch(0, 3), 5, checksums=True)
    crafted.records[1].payload = b"altered on the way"  # after its checksum was computed
    ack = cloud_sync.upload(token, [crafted, counted(batch(3, 5), 5, checksums=True)])

    assert (ack.acked_seq, ack.stored, ack.rejected, list(ack.rejected_seqs)) == (5, 4, 1, [2])
    assert [r["seq"] for r in cloud_sync.results(device_id)] == [1, 3, 4, 5]
    uplink = cloud_sync.device(device_id)["uplink"]
    assert uplink["stored"] + uplink["evicted"] + uplink["rejected"] == uplink["device_produced"] == 5
    # The ack was lost: the device sends the range again and hears of seq 2 again; nothing counts twice.
    again = cloud_sync.upload(token, [crafted])
    assert (again.acked_seq, again.stored, again.rejected, list(again.rejected_seqs)) == (5, 0, 0, [2])
    assert cloud_sync.device(device_id)["uplink"]["rejected"] == 1
    assert [r["seq"] for r in cloud_sync.results(device_id)] == [1, 3, 4, 5]


def test_records_the_cloud_cannot_accept_are_quarantined_not_refused(cloud_sync: RunningCloudSync) -> None:
    device_id, token = cloud_sync.new_device("odd")
    odd = [record(1, kind=99), record(2, kind=results_pb2.RECORD_KIND_UNSPECIFIED), record(3, model="dig\0its")]
    ack = cloud_sync.upload(token, [counted(batch(0, 4, records=[*odd, record(4)]), 4)])
    assert (ack.acked_seq, ack.stored, ack.rejected, list(ack.rejected_seqs)) == (4, 1, 3, [1, 2, 3])
    assert [r["seq"] for r in cloud_sync.results(device_id)] == [4]
    events = [
        e for e in cloud_sync.proc.events if e.get("event") == "uplink.quarantined" and e.get("device") == device_id
    ]
    wait_for(
        lambda: [
            e for e in cloud_sync.proc.events if e.get("event") == "uplink.quarantined" and e.get("device") == device_id
        ],
        10,
        "uplink.quarantined",
    )
    del events


# --- a real device --------------------------------------------------------------------------------------------

DAY_MS = 24 * 3600 * 1000


def drain(cloud_sync: RunningCloudSync, outbox: Outbox, token: str, timeout: float = 90) -> None:
    """Run the device's real Uploader on a debug-mode loop until its outbox is acknowledged to its last seq."""
    thread = LoopThread("test-device-loop")
    try:
        policy = UploadPolicy(batch_max_records=100, interval_s=0.05)
        uploader = Uploader(outbox, CloudSection(grpc_target=cloud_sync.grpc_target), policy, token)
        task = asyncio.run_coroutine_threadsafe(uploader.run(), thread.loop)
        try:
            wait_for(
                lambda: outbox.counters().acked_seq == outbox.counters().last_seq or task.done(),
                timeout,
                "the device's outbox to drain to the cloud",
            )
            assert not task.done(), task.result()
            assert uploader.status.consecutive_failures == 0, uploader.status.last_error
        finally:
            task.cancel()
            concurrent.futures.wait([task], 10)
    finally:
        thread.close()
    assert not thread.slow.blocking(), thread.slow.blocking()


def assert_ledgers_balance(cloud_sync: RunningCloudSync, device_id: str, outbox: Outbox) -> dict[str, int]:
    """stored + evicted + rejected = produced, by the cloud's counts and by the device's own, and they agree."""
    c = outbox.counters()
    assert c.depth == c.quarantined == 0
    assert c.delivered_total + c.evicted_total + c.rejected_total == c.produced_total == c.last_seq
    up = cloud_sync.device(device_id)["uplink"]
    assert up["stored"] + up["evicted"] + up["rejected"] == up["device_produced"] == c.produced_total
    assert (up["stored"], up["evicted"], up["rejected"]) == (c.delivered_total, c.evicted_total, c.rejected_total)
    assert len(cloud_sync.results(device_id)) == up["stored"]
    return up


def _record(i: int, created_at_ms: int, payload: bytes) -> OutboxRecord:
    return OutboxRecord(created_at_ms, "digits", 1, 100, 1, "inference.ModelInferResponse", payload, f"r{i}")


def test_a_drain_of_many_streams_sends_each_record_once(cloud_sync: RunningCloudSync, tmp_path: Path) -> None:
    """The uploader reads and marks the next range while the cloud stores the current one: 50 batches go out in
    four streams, each record once, and both ledgers balance."""
    device_id, token = cloud_sync.new_device("streams")
    now = int(time.time() * 1000)
    with Outbox.open(tmp_path / "outbox.db", max_bytes=1 << 30, max_age_s=0) as outbox:
        futures = [outbox.append(_record(i, now + i, b"result %d" % i)) for i in range(5000)]
        for future in futures:
            future.result(30)
        drain(cloud_sync, outbox, token)
        up = assert_ledgers_balance(cloud_sync, device_id, outbox)
        assert outbox.counters().in_doubt_seq == 5000
    assert (up["stored"], up["duplicates_total"]) == (5000, 0)
    assert [r["seq"] for r in cloud_sync.results(device_id)] == list(range(1, 5001))


def test_one_record_stamped_8_days_ahead_among_thousands_stops_nothing(
    cloud_sync: RunningCloudSync, tmp_path: Path
) -> None:
    """The outside report: that record was refused, re-sent forever, never evicted (in doubt), and every result
    after it was evicted: 0 of 3,399 stored."""
    device_id, token = cloud_sync.new_device("fast-clock")
    now = int(time.time() * 1000)
    with Outbox.open(tmp_path / "outbox.db", max_bytes=1 << 30, max_age_s=0) as outbox:
        futures = [
            outbox.append(_record(i, now + 8 * DAY_MS if i == 17 else now + i, b"result %d" % i)) for i in range(3400)
        ]
        assert futures[-1].result(timeout=30) == 3400

        drain(cloud_sync, outbox, token)

        up = assert_ledgers_balance(cloud_sync, device_id, outbox)
    assert (up["stored"], up["evicted"], up["rejected"]) == (3400, 0, 0)
    assert up["clock_skewed_total"] == 1
    assert 8 * DAY_MS - 120_000 < up["max_clock_skew_ms"] <= 8 * DAY_MS
    stored = {r["seq"]: r for r in cloud_sync.results(device_id)}
    assert stored[18]["created_at_ms"] == now + 8 * DAY_MS  # as the device stamped it


def test_a_byte_flipped_in_a_stopped_devices_outbox_is_quarantined_and_counted_on_both_sides(
    cloud_sync: RunningCloudSync, tmp_path: Path
) -> None:
    """The outside report: a flipped byte passed quick_check and the altered output was uploaded as valid."""
    device_id, token = cloud_sync.new_device("bit-rot")
    path = tmp_path / "outbox.db"
    payloads = [os.urandom(200) for _ in range(500)]
    with Outbox.open(path, max_bytes=1 << 30, max_age_s=0) as outbox:
        futures = [outbox.append(_record(i, int(time.time() * 1000), p)) for i, p in enumerate(payloads)]
        assert futures[-1].result(timeout=30) == 500
    data = path.read_bytes()
    at = data.find(payloads[249])  # the page holding seq 250's payload
    assert at > 0
    with path.open("r+b") as f:
        f.seek(at + 100)
        f.write(bytes([data[at + 100] ^ 0x10]))

    with Outbox.open(path, max_bytes=1 << 30, max_age_s=0) as outbox:  # the agent restarts
        drain(cloud_sync, outbox, token)
        up = assert_ledgers_balance(cloud_sync, device_id, outbox)

    assert (up["stored"], up["evicted"], up["rejected"], up["device_rejected"]) == (499, 0, 1, 1)
    stored = cloud_sync.results(device_id)
    assert 250 not in {r["seq"] for r in stored}
    payload_of = {r["seq"]: r["payload"] for r in stored}
    assert len(payload_of) == 499  # everything else arrived


def test_a_record_the_cloud_rejects_is_counted_as_rejected_by_the_device_too(
    cloud_sync: RunningCloudSync, tmp_path: Path
) -> None:
    """A record an older agent kept (kind 0, allowed then) reaches the cloud after the upgrade: the cloud
    quarantines it, names it in the ack, and the device counts it rejected rather than delivered."""
    device_id, token = cloud_sync.new_device("upgraded")
    path = tmp_path / "outbox.db"
    old = (4, int(time.time() * 1000), "digits", 1, 100, 0, "inference.ModelInferResponse", b"old", "r-old", 3)
    build_v1(path, [b"a", b"b", b"c"], extra_rows=[old])
    with Outbox.open(path, max_bytes=1 << 30, max_age_s=0) as outbox:
        outbox.append(_record(5, int(time.time() * 1000), b"new")).result(timeout=10)
        drain(cloud_sync, outbox, token)
        up = assert_ledgers_balance(cloud_sync, device_id, outbox)
    # The cloud named seq 4 in its ack; the device reports its new rejected_total with its next batch.
    assert (up["stored"], up["rejected"]) == (4, 1)
