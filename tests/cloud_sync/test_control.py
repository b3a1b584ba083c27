"""The Control service through a real gRPC channel, over a real store (SQLite file and PostgreSQL schema).

The servicer runs in a grpc.aio server on its own loop in debug mode (the loop check judges it at teardown);
devices call it with a plain grpc client, as an agent of another version would. Every refusal carries its
status and reason and changes nothing stored.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import grpc
import pytest

from cloud_sync.control import RECHECK_S, WATCH_OPEN_METADATA, ControlServicer, DesiredChanges
from cloud_sync.errors import InvalidArgument, NotFound
from cloud_sync.store import Database, DeviceRegistry, open_database
from cloud_sync.store.control import MAX_STATE_BYTES, ControlStore, desired_state
from cloud_sync.store.telemetry import TelemetryStore
from cloud_sync.uplink import DeviceAuthenticator
from edgefleet.proto.edgefleet.v1 import services_pb2, services_pb2_grpc
from edgefleet.proto.edgefleet.v1.state_pb2 import (
    MODEL_ROLE_ACTIVE,
    MODEL_ROLE_SHADOW,
    MODEL_STATE_READY,
    DesiredState,
    ModelAssignment,
    ModelStatus,
    ReportedState,
)
from edgefleet.rpc import add_service
from tests.cloud_sync.telemetry.conftest import telemetry
from tests.loopcheck import LoopThread
from tests.waiting import wait_for

POLICY = '{"inference": {"max_batch_size": 8}, "telemetry": {"interval_s": 5}}'


@dataclass
class ControlCloud:
    """The Control service on 127.0.0.1:port over `db`, and a channel to it."""

    db: Database
    store: ControlStore
    telemetry: TelemetryStore
    devices: DeviceRegistry
    channel: grpc.Channel
    stub: services_pb2_grpc.ControlStub
    servicer: ControlServicer
    loop: LoopThread
    changes: DesiredChanges
    io: ThreadPoolExecutor

    def poll(self, interval_s: float) -> None:
        """Start looking for changes written elsewhere every `interval_s` (no test relies on it otherwise)."""

        async def start() -> None:
            self.polling.append(asyncio.ensure_future(self.changes.poll(self.io, interval_s)))

        self.loop.run(start())

    def __post_init__(self) -> None:
        self.polling: list[asyncio.Future[None]] = []

    def device(self, device_id: str) -> str:
        """Register `device_id`; its token."""
        return self.devices.add_device(device_id)

    def presence(self, device_id: str) -> bool | None:
        found = [p for p in self.telemetry.fleet_presence() if p.device_id == device_id]
        return found[0].online if found else None


def creds(token: str | None) -> list[tuple[str, str]] | None:
    return [("authorization", f"Bearer {token}")] if token is not None else None


@pytest.fixture
def cloud(store_url: str) -> Iterator[ControlCloud]:
    db = open_database(store_url)
    loop = LoopThread("test-cloud-loop")
    io = ThreadPoolExecutor(4, thread_name_prefix="ingest")
    store, telemetry_store, devices = ControlStore(db), TelemetryStore(db), DeviceRegistry(db)

    async def start() -> tuple[Any, ControlServicer, DesiredChanges, int]:
        changes = DesiredChanges(store, loop.loop)
        auth = DeviceAuthenticator(devices)
        devices.on_revoked += [auth.forget, changes.revoked]  # as cloud-sync wires them
        servicer = ControlServicer(auth, store, telemetry_store, io, changes)
        server = grpc.aio.server()
        add_service(server, services_pb2, "Control", servicer)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, servicer, changes, port

    server, servicer, changes, port = loop.run(start())
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = services_pb2_grpc.ControlStub(channel)
    running = ControlCloud(db, store, telemetry_store, devices, channel, stub, servicer, loop, changes, io)
    try:
        yield running
    finally:
        channel.close()
        for polling in running.polling:
            loop.call(polling.cancel)
        loop.run(server.stop(1))
        servicer.presence.close()
        io.shutdown(wait=True)
        loop.close()
        db.close()
    assert not loop.blocking(), f"the servicer blocked its loop: {loop.blocking()}"


class Watch:
    """A WatchDesired stream read on a thread of its own; `states` fills as messages arrive."""

    def __init__(self, cloud: ControlCloud, token: str | None, known_generation: int = 0) -> None:
        self.call = cloud.stub.WatchDesired(
            services_pb2.WatchDesiredRequest(known_generation=known_generation), metadata=creds(token)
        )
        self.states: list[DesiredState] = []
        self.error: grpc.RpcError | None = None
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        try:
            for state in self.call:
                self.states.append(state)
        except grpc.RpcError as exc:
            self.error = exc

    def opened(self) -> bool:
        return WATCH_OPEN_METADATA[0] in tuple(self.call.initial_metadata())

    def close(self) -> None:
        self.call.cancel()
        self._reader.join(10)


@pytest.fixture
def watches() -> Iterator[list[Watch]]:
    made: list[Watch] = []
    yield made
    for watch in made:
        watch.close()


def watch(cloud: ControlCloud, watches: list[Watch], token: str | None, known: int = 0) -> Watch:
    made = Watch(cloud, token, known)
    watches.append(made)
    return made


def refused(call: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


# -- WatchDesired ------------------------------------------------------------------------------------------


def test_a_stream_gets_the_current_desired_state_then_each_change_at_once(
    cloud: ControlCloud, watches: list[Watch]
) -> None:
    token = cloud.device("cam-1")
    first = cloud.store.set_desired("cam-1", DesiredState(policy_json=POLICY, policy_hash="p1"))
    stream = watch(cloud, watches, token)
    (got,) = wait_for(lambda: stream.states, 10, "the current desired state")
    assert (got.device_id, got.generation, got.policy_json, got.policy_hash) == ("cam-1", 1, POLICY, "p1")
    assert got.issued_at_ms == first.issued_at_ms > 0

    cloud.store.set_desired("cam-1", DesiredState(policy_json="", policy_hash="p2"))
    # Nothing polls here (the fixture starts no poller): only the store's notification can deliver it.
    wait_for(lambda: len(stream.states) == 2, 10, "the change")
    assert [s.generation for s in stream.states] == [1, 2]
    assert stream.states[1].policy_hash == "p2"


def test_revoking_a_device_ends_its_open_stream_at_once(cloud: ControlCloud, watches: list[Watch]) -> None:
    token = cloud.device("cam-1")
    stream = watch(cloud, watches, token)
    wait_for(stream.opened, 10, "the stream to open")
    began = time.monotonic()
    cloud.devices.revoke("cam-1")
    error = wait_for(lambda: stream.error, 10, "the stream to end")
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED and "revoked" in (error.details() or "")
    assert time.monotonic() - began < RECHECK_S  # woken by the revocation, not by the periodic check
    assert refused(lambda: list(cloud.stub.WatchDesired(services_pb2.WatchDesiredRequest(), metadata=creds(token))))


def test_a_stream_resumes_after_the_generation_the_device_knows(cloud: ControlCloud, watches: list[Watch]) -> None:
    token = cloud.device("cam-1")
    for n in range(3):
        cloud.store.set_desired("cam-1", DesiredState(policy_hash=f"p{n}"))
    stream = watch(cloud, watches, token, known=3)
    wait_for(stream.opened, 10, "the stream to open")
    cloud.store.set_desired("cam-1", DesiredState(policy_hash="p3"))
    (got,) = wait_for(lambda: stream.states, 10, "the newer state")
    assert got.generation == 4  # generations 1-3 were not sent again


def test_a_change_written_by_another_replica_is_found_by_polling(
    cloud: ControlCloud, store_url: str, watches: list[Watch]
) -> None:
    token = cloud.device("cam-1")
    cloud.poll(0.1)
    stream = watch(cloud, watches, token)
    wait_for(stream.opened, 10, "the stream to open")
    other = open_database(store_url)  # another process's store: its writes notify nobody here
    try:
        ControlStore(other).set_desired("cam-1", DesiredState(policy_json=POLICY))
    finally:
        other.close()
    (got,) = wait_for(lambda: stream.states, 10, "the state written elsewhere")
    assert got.generation == 1 and got.policy_json == POLICY


def test_a_device_is_online_while_one_of_its_streams_is_open(cloud: ControlCloud, watches: list[Watch]) -> None:
    token = cloud.device("cam-1")
    assert cloud.presence("cam-1") is None
    first = watch(cloud, watches, token)
    wait_for(first.opened, 10, "the first stream")
    assert cloud.presence("cam-1") is True  # written before the stream said it was open
    second = watch(cloud, watches, token)  # a reconnect that overtakes the old stream's end
    wait_for(second.opened, 10, "the second stream")
    first.close()
    # The second stream is still open: the device stays online.
    wait_for(lambda: cloud.servicer.presence._open.get("cam-1") == 1, 10, "the first stream to end here")
    assert cloud.presence("cam-1") is True
    second.close()
    wait_for(lambda: cloud.presence("cam-1") is False, 10, "offline once no stream is open")


@pytest.mark.parametrize(
    ("token", "code"),
    [
        (None, grpc.StatusCode.UNAUTHENTICATED),
        ("efd_nobody", grpc.StatusCode.UNAUTHENTICATED),
        ("revoked", grpc.StatusCode.PERMISSION_DENIED),
    ],
    ids=["no-credential", "unknown-token", "revoked"],
)
def test_a_stream_without_a_valid_credential_is_refused_and_marks_nothing_online(
    cloud: ControlCloud, watches: list[Watch], token: str | None, code: grpc.StatusCode
) -> None:
    if token == "revoked":
        token = cloud.device("cam-gone")
        cloud.devices.revoke("cam-gone")
    stream = watch(cloud, watches, token)
    wait_for(lambda: stream.error is not None, 10, "the refusal")
    assert stream.error is not None and stream.error.code() == code
    assert stream.error.details()
    assert not stream.opened()
    assert cloud.telemetry.fleet_presence() == []


# -- Report ------------------------------------------------------------------------------------------------


def reported(device_id: str = "cam-1", generation: int = 1, **fields: Any) -> ReportedState:
    values: dict[str, Any] = {
        "device_id": device_id,
        "generation": generation,
        "policy_hash": "p1",
        "reported_at_ms": time.time_ns() // 1_000_000,
        "models": [ModelStatus(name="digits", version=1, role=MODEL_ROLE_ACTIVE, state=MODEL_STATE_READY)],
    }
    values.update(fields)
    return ReportedState(**values)


def test_a_report_is_stored_and_the_same_generation_may_come_again(cloud: ControlCloud) -> None:
    token = cloud.device("cam-1")
    cloud.store.set_desired("cam-1", DesiredState(policy_hash="p1"))
    cloud.stub.Report(reported(), metadata=creds(token), timeout=10)
    again = reported(models=[ModelStatus(name="digits", version=2, state=MODEL_STATE_READY, progress=1.0)])
    cloud.stub.Report(again, metadata=creds(token), timeout=10)
    stored = cloud.store.reported("cam-1")
    assert stored is not None and stored.state == again and stored.received_at_ms > 0


BAD_REPORTS = {
    "another-device": (lambda: reported("cam-2"), "names device 'cam-2'"),
    "never-issued": (lambda: reported(generation=5), "generation 5 was never issued"),
    "nan-progress": (
        lambda: reported(models=[ModelStatus(name="digits", version=1, progress=math.nan)]),
        "progress must be within 0..1",
    ),
    "no-version": (lambda: reported(models=[ModelStatus(name="digits")]), "a version >= 1"),
    "unknown-state": (
        lambda: reported(models=[ModelStatus(name="digits", version=1, state=99)]),  # type: ignore[arg-type]
        "unknown role or state",
    ),
    "oversized": (lambda: reported(error="x" * (MAX_STATE_BYTES + 1)), "byte limit"),
    "long-error": (lambda: reported(error="x" * 5000), "error has 5000 characters"),
}


@pytest.mark.parametrize("name", list(BAD_REPORTS))
def test_a_bad_report_is_invalid_argument_with_its_reason_and_changes_nothing(cloud: ControlCloud, name: str) -> None:
    token = cloud.device("cam-1")
    cloud.device("cam-2")
    cloud.store.set_desired("cam-1", DesiredState())
    message, says = BAD_REPORTS[name]
    error = refused(lambda: cloud.stub.Report(message(), metadata=creds(token), timeout=10))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert says in error.details()
    assert cloud.store.reported("cam-1") is None and cloud.store.reported("cam-2") is None
    cloud.stub.Report(reported(), metadata=creds(token), timeout=10)  # and the device is served as before
    assert cloud.store.reported("cam-1") is not None


def test_a_stale_report_never_undoes_a_newer_one(cloud: ControlCloud) -> None:
    token = cloud.device("cam-1")
    for _ in range(2):
        cloud.store.set_desired("cam-1", DesiredState())
    cloud.stub.Report(reported(generation=2), metadata=creds(token), timeout=10)
    error = refused(lambda: cloud.stub.Report(reported(generation=1), metadata=creds(token), timeout=10))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "below the 2 reported before" in error.details()
    stored = cloud.store.reported("cam-1")
    assert stored is not None and stored.state.generation == 2


def test_a_malformed_message_is_invalid_argument(cloud: ControlCloud) -> None:
    token = cloud.device("cam-1")
    raw = cloud.channel.unary_unary("/edgefleet.v1.Control/Report")
    error = refused(lambda: raw(b"\xff\xff\xff", metadata=creds(token), timeout=10))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "edgefleet.v1.ReportedState" in error.details()


# -- PublishTelemetry --------------------------------------------------------------------------------------


def test_telemetry_is_validated_and_stored_as_the_credential_s_device(cloud: ControlCloud) -> None:
    token = cloud.device("cam-1")
    message = telemetry("cam-1", seq=3)
    cloud.stub.PublishTelemetry(message, metadata=creds(token), timeout=10)
    latest = cloud.telemetry.latest("cam-1")
    assert latest is not None and latest.message == message
    presence = cloud.telemetry.fleet_presence()
    assert [(p.device_id, p.online) for p in presence] == [("cam-1", True)]  # telemetry is a sign of life


@pytest.mark.parametrize(
    ("message", "says"),
    [
        (telemetry("cam-2"), "device_mismatch"),
        (telemetry("cam-1", window_s=math.inf), "invalid_values"),
        (telemetry("cam-1", timestamp_ms=0), "invalid_values"),
    ],
    ids=["another-device", "infinite-window", "no-timestamp"],
)
def test_bad_telemetry_is_invalid_argument_and_stores_nothing(cloud: ControlCloud, message: Any, says: str) -> None:
    token = cloud.device("cam-1")
    cloud.device("cam-2")
    error = refused(lambda: cloud.stub.PublishTelemetry(message, metadata=creds(token), timeout=10))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert says in error.details()
    assert cloud.telemetry.latest("cam-1") is None and cloud.telemetry.latest("cam-2") is None


def test_telemetry_without_a_credential_is_unauthenticated(cloud: ControlCloud) -> None:
    cloud.device("cam-1")
    error = refused(lambda: cloud.stub.PublishTelemetry(telemetry("cam-1"), timeout=10))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert cloud.telemetry.latest("cam-1") is None


# -- the store's rules -------------------------------------------------------------------------------------


def test_generations_increase_from_above_what_the_device_reported(cloud: ControlCloud) -> None:
    token = cloud.device("cam-1")
    assert [cloud.store.set_desired("cam-1", DesiredState()).generation for _ in range(3)] == [1, 2, 3]
    assert cloud.store.desired_generations(["cam-1", "cam-none"]) == {"cam-1": 3}
    desired = cloud.store.desired("cam-1")
    assert desired is not None and desired.generation == 3 and desired.device_id == "cam-1"
    cloud.stub.Report(reported(generation=3), metadata=creds(token), timeout=10)
    # A database restored from before those states: the device is ahead of what the cloud remembers issuing.
    cloud.db.write(lambda conn: conn.execute(desired_state.delete()))
    assert cloud.store.set_desired("cam-1", DesiredState()).generation == 4  # not 1, which the device would ignore


BAD_DESIRED = {
    "policy-not-json": (DesiredState(policy_json="{inference"), "not valid JSON"),
    "policy-unknown-section": (DesiredState(policy_json='{"engine": {}}'), "unknown section 'engine'"),
    "policy-section-not-object": (DesiredState(policy_json='{"upload": 3}'), "must be an object"),
    "policy-nan": (DesiredState(policy_json='{"upload": {"sample_rate": NaN}}'), "not valid JSON"),
    "two-active": (
        DesiredState(
            models=[
                ModelAssignment(name="digits", version=1, role=MODEL_ROLE_ACTIVE),
                ModelAssignment(name="digits", version=2, role=MODEL_ROLE_ACTIVE),
            ]
        ),
        "two ACTIVE versions",
    ),
    "no-role": (DesiredState(models=[ModelAssignment(name="digits", version=1)]), "ACTIVE or SHADOW"),
    "shadow-rate": (
        DesiredState(
            models=[ModelAssignment(name="d", version=1, role=MODEL_ROLE_SHADOW, shadow_sample_rate=math.nan)]
        ),
        "shadow_sample_rate",
    ),
}


@pytest.mark.parametrize("name", list(BAD_DESIRED))
def test_a_bad_desired_state_is_refused_with_its_reason(cloud: ControlCloud, name: str) -> None:
    cloud.device("cam-1")
    state, says = BAD_DESIRED[name]
    with pytest.raises(InvalidArgument, match=says):
        cloud.store.set_desired("cam-1", state)
    assert cloud.store.desired("cam-1") is None


def test_a_desired_state_for_an_unknown_device_is_not_found(cloud: ControlCloud) -> None:
    with pytest.raises(NotFound):
        cloud.store.set_desired("cam-nobody", DesiredState())
