"""The Uplink service through a real gRPC channel to a real cloud-sync: who may upload, what is stored, once.

Every refusal carries its status and a reason, changes nothing in the store, and leaves the server serving
(each refusal test ends with a good upload by the same device that starts from seq 0).
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from structlog.testing import capture_logs

from cloud_sync.store import DeviceRegistry, IngestOutcome, ResultStore, open_database
from cloud_sync.uplink import DeviceAuthenticator, UplinkServicer
from edgefleet.proto.edgefleet.v1 import results_pb2, services_pb2, services_pb2_grpc
from edgefleet.rpc import add_service
from tests.cloud_sync.conftest import MAX_MESSAGE_BYTES, UPLOAD_METHOD, RunningCloudSync, batch, record
from tests.waiting import wait_for


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
    batches = [batch(0, 3), batch(3, 5)]

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
    ack = cloud_sync.upload(token, [batch(0, 6, [1, 2, 6])])
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
    "unknown-kind": (batch(0, 1, records=[record(1, kind=99)]), "not a known RecordKind"),
    "unspecified-kind": (batch(0, 1, records=[record(1, kind=results_pb2.RECORD_KIND_UNSPECIFIED)]), "RecordKind"),
    "nul-in-model": (batch(0, 1, records=[record(1, model="dig\0its")]), "NUL"),
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
    # The first batch was committed before the second was read; the device, unacked, sends it again.
    assert [r["seq"] for r in cloud_sync.results(device_id)] == [1, 2]
    assert cloud_sync.device(device_id)["uplink"]["acked_seq"] == 2


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
    cloud_sync.upload(token, [batch(0, 4), batch(4, 6, [5])])
    cloud_sync.upload(token, [batch(0, 4)])
    after = counts()

    def grew(key: tuple[str, str]) -> float:
        return after.get(key, 0) - before.get(key, 0)

    assert grew(("cloud_sync_uplink_batches_total", "")) == 3
    assert grew(("cloud_sync_uplink_records_total", "stored")) == 5
    assert grew(("cloud_sync_uplink_records_total", "evicted")) == 1
    assert grew(("cloud_sync_uplink_records_total", "duplicate")) == 4
