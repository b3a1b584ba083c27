"""The device-facing Uplink service: authenticated client-streaming upload of result batches.

The device's identity comes from its token in the call's metadata, never from the message. Each batch is
stored (idempotently, committed) on an ingest thread before the next is read; the final ack names the
highest seq up to which everything is stored, declared evicted or rejected, and the seqs of the stream's
range the cloud counts as rejected; the device deletes up to it.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import structlog
from prometheus_client import CollectorRegistry, Counter, Histogram

from cloud_sync.errors import CloudSyncError, Unauthenticated
from cloud_sync.status import INTERNAL_MESSAGE, grpc_code, unexpected_error_fields
from cloud_sync.store import DeviceRegistry, IngestOutcome, ResultStore
from edgefleet.proto.edgefleet.v1 import results_pb2

__all__ = ["DeviceAuthenticator", "UplinkServicer", "bearer_token"]

log = structlog.get_logger(__name__)

# A token -> device lookup is a database read; cache it briefly (revocation takes effect within this).
AUTH_CACHE_S = 10.0
# Batches of a stream received while the ones before are stored; those waiting are then stored together, in
# one transaction (one fsync: 0.2 ms on the dev VM, several on an SD card or a network disk). A stream holds at
# most 2 * READ_AHEAD + 2 parsed batches (being stored, waiting, and one the reader holds).
READ_AHEAD = 2


def bearer_token(metadata: Any) -> str:
    """The token of an `authorization: Bearer <token>` metadata entry; Unauthenticated without one."""
    for key, value in metadata or ():
        if key == "authorization":
            scheme, _, token = str(value).partition(" ")
            if scheme.lower() == "bearer" and token:
                return token.strip()
    raise Unauthenticated("no device credential: send metadata 'authorization: Bearer <device token>'")


class DeviceAuthenticator:
    """Token -> device id, with a short cache so each upload does not cost a database read."""

    def __init__(self, devices: DeviceRegistry) -> None:
        self._devices = devices
        self._cache: dict[bytes, tuple[str, float]] = {}
        self._lock = threading.Lock()

    def device_for(self, token: str) -> str:
        key = hashlib.sha256(token.encode()).digest()
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(key)
        if hit is not None and now - hit[1] < AUTH_CACHE_S:
            return hit[0]
        device_id = self._devices.authenticate(token)
        if device_id is None:
            raise Unauthenticated("the device credential matches no enrolled device (revoked or unknown)")
        with self._lock:
            if len(self._cache) > 100_000:
                self._cache.clear()
            self._cache[key] = (device_id, now)
        return device_id

    def forget(self, device_id: str) -> None:
        """Drop the cached tokens of `device_id` (it was revoked here: its next call is refused at once, not
        after AUTH_CACHE_S). Thread-safe."""
        with self._lock:
            for key in [k for k, (device, _) in self._cache.items() if device == device_id]:
                del self._cache[key]


class UplinkMetrics:
    """Fleet-wide uplink counters (no per-device labels: a fleet has too many devices for that)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.streams = Counter("cloud_sync_uplink_streams", "Upload streams accepted", registry=registry)
        self.batches = Counter("cloud_sync_uplink_batches", "Result batches stored", registry=registry)
        self.records = Counter("cloud_sync_uplink_records", "Records by outcome", ["outcome"], registry=registry)
        self.refused = Counter("cloud_sync_uplink_refused", "Upload streams refused", ["code"], registry=registry)
        self.ingest_seconds = Histogram(
            "cloud_sync_uplink_ingest_seconds", "Time to store one batch (validate, insert, commit)", registry=registry
        )
        # Every outcome (and the refusals an operator alerts on) at 0 before the first upload.
        for outcome in ("stored", "duplicate", "evicted", "rejected"):
            self.records.labels(outcome)
        for code in ("UNAUTHENTICATED", "PERMISSION_DENIED", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "INTERNAL"):
            self.refused.labels(code)


class UplinkServicer:
    def __init__(
        self,
        auth: DeviceAuthenticator,
        results: ResultStore,
        executor: ThreadPoolExecutor,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self._auth = auth
        self._results = results
        self._executor = executor
        self._metrics = UplinkMetrics(registry or CollectorRegistry())

    def _ingest(
        self, device_id: str, batches: list[results_pb2.ResultBatch]
    ) -> tuple[list[IngestOutcome], Exception | None]:
        started = time.monotonic()
        outcomes, refused = self._results.ingest_many(device_id, batches)
        m = self._metrics
        if outcomes:
            share = (time.monotonic() - started) / len(outcomes)  # batches stored together share the time
            for _ in outcomes:
                m.ingest_seconds.observe(share)
        m.batches.inc(len(outcomes))
        for outcome in outcomes:
            m.records.labels("stored").inc(outcome.stored)
            m.records.labels("duplicate").inc(outcome.duplicates)
            m.records.labels("evicted").inc(outcome.evicted)
            m.records.labels("rejected").inc(outcome.rejected)
            if outcome.quarantined:  # rare: one line per batch, naming the first
                seq, reason = outcome.quarantined[0]
                log.warning(
                    "uplink.quarantined", device=device_id, records=len(outcome.quarantined), seq=seq, reason=reason
                )
        return outcomes, refused

    async def Upload(
        self, batches: AsyncIterator[results_pb2.ResultBatch], context: grpc.aio.ServicerContext
    ) -> results_pb2.UploadAck:
        loop = asyncio.get_running_loop()
        ack = results_pb2.UploadAck()
        rejected_seqs: set[int] = set()
        device_id = "?"
        received: asyncio.Queue[results_pb2.ResultBatch | BaseException | None] = asyncio.Queue(READ_AHEAD)
        reader: asyncio.Future[None] | None = None
        try:
            token = bearer_token(context.invocation_metadata())
            device_id = await loop.run_in_executor(self._executor, self._auth.device_for, token)
            self._metrics.streams.inc()
            reader = asyncio.ensure_future(_read_into(batches, received))
            while group := await _take(received):
                outcomes, refused = await loop.run_in_executor(self._executor, self._ingest, device_id, group)
                for outcome in outcomes:
                    ack.acked_seq = outcome.acked_seq
                    ack.stored += outcome.stored
                    ack.duplicates += outcome.duplicates
                    ack.evicted += outcome.evicted
                    ack.rejected += outcome.rejected
                    rejected_seqs.update(outcome.rejected_seqs)
                if refused is not None:
                    raise refused
        except CloudSyncError as exc:
            log.warning(
                "uplink.refused",
                device=device_id,
                error=type(exc).__name__,
                reason=exc.message,
                acked_seq=ack.acked_seq,
            )
            self._metrics.refused.labels(grpc_code(exc).name).inc()
            await context.abort(grpc_code(exc), exc.message)
        except grpc.aio.AbortError:
            raise  # a malformed message, aborted with its reason by the parsing wrapper
        except Exception as exc:
            # Else grpc answers UNKNOWN with the exception's text and logs the traceback with its locals.
            log.error("uplink.internal_error", device=device_id, **unexpected_error_fields(exc))
            await context.abort(grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE)
        finally:
            if reader is not None:
                reader.cancel()
        # Up to the final ack only: a seq past it is not the device's to count yet (a batch past a gap).
        ack.rejected_seqs.extend(sorted(seq for seq in rejected_seqs if seq <= ack.acked_seq))
        if ack.stored or ack.duplicates or ack.evicted or ack.rejected:
            log.debug(
                "uplink.stored",
                device=device_id,
                acked_seq=ack.acked_seq,
                stored=ack.stored,
                duplicates=ack.duplicates,
                evicted=ack.evicted,
                rejected=ack.rejected,
            )
        return ack


async def _read_into(
    batches: AsyncIterator[results_pb2.ResultBatch],
    received: asyncio.Queue[results_pb2.ResultBatch | BaseException | None],
) -> None:
    """Receive the stream's batches into `received`, then None; an error (a malformed message's abort) goes
    in as well, for the storing loop to raise in its place."""
    try:
        async for batch in batches:
            await received.put(batch)
    except Exception as exc:
        await received.put(exc)
        return
    await received.put(None)


async def _take(
    received: asyncio.Queue[results_pb2.ResultBatch | BaseException | None],
) -> list[results_pb2.ResultBatch]:
    """The next batch and every batch already waiting behind it ([] at the end of the stream)."""
    group: list[results_pb2.ResultBatch] = []
    item = await received.get()
    while True:
        if isinstance(item, BaseException):
            if group:  # store those before it first; the error comes with the next take
                received.put_nowait(item)  # it was the last item, and its slot is free
                return group
            raise item
        if item is None:
            if group:
                received.put_nowait(None)
            return group
        group.append(item)
        if received.empty():
            return group
        item = received.get_nowait()
