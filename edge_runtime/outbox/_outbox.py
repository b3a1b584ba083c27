"""`Outbox`: the device's durable, bounded store of results waiting for upload (DESIGN.md "Data plane")."""

from __future__ import annotations

import os
from collections.abc import Iterable
from concurrent.futures import Future
from pathlib import Path
from types import TracebackType

import structlog

from edge_runtime.errors import ConfigError
from edge_runtime.outbox._queue import Ack, AppendQueue, Flush, MarkInDoubt, Quarantine, SetLimits
from edge_runtime.outbox._reader import Reader
from edge_runtime.outbox._record import MAX_RECORD_PAYLOAD_BYTES
from edge_runtime.outbox._recovery import open_checked
from edge_runtime.outbox._types import OutboxCounters, OutboxRecord, OutboxUnusable, UploadBatch
from edge_runtime.outbox._writer import Writer
from edgefleet.durable import hold_lock

__all__ = ["Outbox"]

log = structlog.get_logger(__name__)

# Reads that found unfit records and quarantined them before one read comes back clean. Each round moves
# what it found out of the range, so a second is already rare.
_QUARANTINE_ROUNDS = 10
_CONTROL_TIMEOUT_S = 30.0


class Outbox:
    """Appends go to one writer thread that group-commits them; reads run on the caller's thread.

    Open with `Outbox.open`; every method is thread-safe. Methods that change the file (append, ack,
    mark_in_doubt, set_limits, flush) return a concurrent.futures.Future that resolves once the change
    is committed (with synchronous=FULL: durable across power loss).
    """

    def __init__(self, path: Path, lock_fd: int, queue: AppendQueue, writer: Writer, reader: Reader) -> None:
        self._path = path
        self._lock_fd: int | None = lock_fd
        self._queue = queue
        self._writer = writer
        self._reader = reader

    @classmethod
    def open(
        cls,
        path: Path,
        *,
        max_bytes: int,
        max_age_s: float,
        commit_interval_s: float = 0.002,
        max_group: int = 1000,
        max_pending: int = 20_000,
        max_pending_bytes: int = 64 * 1024 * 1024,
        max_file_bytes: int | None = None,
        max_record_bytes: int = MAX_RECORD_PAYLOAD_BYTES,
    ) -> Outbox:
        """Open (or create) the outbox at `path` and start its writer thread.

        max_bytes / max_age_s: the eviction bounds (buffer.max_bytes, buffer.max_age_s; 0: no age limit).
        commit_interval_s / max_group: a group commit gathers appends for up to this long or this many.
        max_pending / max_pending_bytes: the append queue's bound (a DeferredPayload counts its declared
        size until encoded); past it `append` raises Overloaded instead of growing memory.
        max_file_bytes: a hard ceiling on the database file (PRAGMA max_page_count); past it commits
        fail as on a full disk. None: only the disk limits it.
        max_record_bytes: the largest payload one record may hold (cloud-sync's per-record limit).
        Raises OutboxUnusable when the file is in use by another process, newer than this code, or damaged
        past salvage (a damaged file is otherwise moved aside and salvaged: see _recovery.py).
        """
        _check_limits(max_bytes, max_age_s)
        if commit_interval_s < 0 or min(max_group, max_pending, max_pending_bytes, max_record_bytes) < 1:
            raise ConfigError(
                "outbox: commit_interval_s must be >= 0, max_group/max_pending(_bytes)/max_record_bytes >= 1"
            )
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        lock_fd = _lock(path)
        try:
            conn = open_checked(path, max_file_bytes=max_file_bytes)
            queue = AppendQueue(
                max_pending=max_pending,
                max_pending_bytes=max_pending_bytes,
                max_group=max_group,
                commit_interval_s=commit_interval_s,
                max_record_bytes=max_record_bytes,
            )
            try:
                writer = Writer(conn, str(path), queue, max_bytes=max_bytes, max_age_s=max_age_s)
            except BaseException:
                conn.close()
                raise
        except BaseException:
            os.close(lock_fd)
            raise
        writer.start()
        outbox = cls(path, lock_fd, queue, writer, Reader(path, max_record_bytes=max_record_bytes))
        c = writer.snapshot
        log.info("outbox.opened", path=str(path), depth=c.depth, last_seq=c.last_seq, acked_seq=c.acked_seq)
        return outbox

    @property
    def path(self) -> Path:
        return self._path

    def append(self, record: OutboxRecord) -> Future[int]:
        """Queue a record; the future resolves with its seq once committed (wait on it only for durability).

        No SQLite work happens here. Raises Overloaded when the queue is full (the disk is not keeping
        up), ShuttingDown after close, InvalidInput for a payload that is neither bytes nor a
        DeferredPayload, RequestTooLarge for one past max_record_bytes. A record refused by the writer
        (fields the cloud would not accept, an encoder that fails, an encoded payload past the limit) or a
        failed commit (disk full: Overloaded) fails its future.
        """
        return self._queue.put(record)

    def flush(self) -> Future[None]:
        """Resolves once every append queued before this call was committed (or failed) and eviction ran."""
        future: Future[None] = Future()
        self._queue.put_control(Flush(self._queue.flush_ticket(), future))
        return future

    def read_batch(
        self, max_records: int, max_bytes: int, *, after_seq: int | None = None, timeout: float | None = None
    ) -> UploadBatch:
        """The next records to upload after `after_seq` (default: acked_seq), checked against their checksums.

        Records found unfit (damaged, past the per-record limit) are quarantined first, which waits for the
        writer thread, then the range is read again: the batch declares them as rejected instead. Before
        sending, persist the range with mark_in_doubt (or use next_batch, which does both).
        """
        return self._read_fit(max_records, max_bytes, after_seq, None, timeout)

    def mark_in_doubt(self, through_seq: int, *, after_seq: int | None = None) -> Future[int]:
        """Persist that records up to through_seq are being sent: eviction spares them until acked.

        Resolves with the number of records now held in (after_seq or acked_seq, through_seq]: fewer
        than the batch read carries means an eviction ran between the read and the mark (read again).
        A through_seq past last_seq fails with InvalidInput.
        """
        future: Future[int] = Future()
        self._queue.put_control(MarkInDoubt(through_seq, after_seq, future))
        return future

    def next_batch(
        self, max_records: int, max_bytes: int, *, after_seq: int | None = None, timeout: float | None = None
    ) -> UploadBatch:
        """read_batch + mark_in_doubt: a batch safe to send, its range persisted as in doubt."""
        batch = self._read_fit(max_records, max_bytes, after_seq, None, timeout)
        if batch.empty:
            return batch
        held = self.mark_in_doubt(batch.through_seq, after_seq=batch.after_seq).result(timeout)
        if held == len(batch.records):
            return batch
        # Eviction took records of this range after the read; the range is protected now, so this read
        # is final (and declares them evicted).
        return self._read_fit(max_records, max_bytes, batch.after_seq, batch.through_seq, timeout)

    def next_batches(
        self,
        count: int,
        max_records: int,
        max_bytes: int,
        *,
        after_seq: int | None = None,
        timeout: float | None = None,
    ) -> list[UploadBatch]:
        """Up to `count` consecutive batches after `after_seq` (default acked_seq), marked in doubt at once.

        One in-doubt commit (one fsync) per upload stream instead of one per batch: measured, the per-batch
        marks bounded the uplink at ~30k records/s here.
        """
        batches = self._read_run(count, max_records, max_bytes, after_seq, None, timeout)
        if not batches:
            return batches
        first, through = batches[0].after_seq, batches[-1].through_seq
        held = self.mark_in_doubt(through, after_seq=first).result(timeout)
        if held == sum(len(b.records) for b in batches):
            return batches
        # Eviction took records of this range after the read; it is protected now, so read it again, final.
        return self._read_run(count, max_records, max_bytes, first, through, timeout)

    def _read_run(
        self,
        count: int,
        max_records: int,
        max_bytes: int,
        after_seq: int | None,
        through_limit: int | None,
        timeout: float | None,
    ) -> list[UploadBatch]:
        batches: list[UploadBatch] = []
        while len(batches) < count:
            batch = self._read_fit(max_records, max_bytes, after_seq, through_limit, timeout)
            if batch.empty:
                break
            batches.append(batch)
            after_seq = batch.through_seq
            if through_limit is not None and after_seq >= through_limit:
                break
        return batches

    def _read_fit(
        self,
        max_records: int,
        max_bytes: int,
        after_seq: int | None,
        through_limit: int | None,
        timeout: float | None,
    ) -> UploadBatch:
        """A read whose records all verify: unfit ones are quarantined (on the writer thread), then read again."""
        for _ in range(_QUARANTINE_ROUNDS):
            batch = self._reader.read_batch(max_records, max_bytes, after_seq=after_seq, through_limit=through_limit)
            if not batch.unfit:
                return batch
            future: Future[int] = Future()
            self._queue.put_control(Quarantine(batch.unfit, future))
            future.result(_CONTROL_TIMEOUT_S if timeout is None else timeout)
        raise OutboxUnusable(
            f"outbox {self._path}: records after seq {batch.after_seq} still fail their checks after "
            f"{_QUARANTINE_ROUNDS} quarantines; the file may be failing: check the disk"
        )

    def ack(self, acked_seq: int, rejected: Iterable[int] = ()) -> Future[int]:
        """The cloud accounted for everything up to acked_seq: delete those records. Resolves with acked_seq.

        `rejected`: the seqs the cloud counts as rejected (UploadAck.rejected_seqs); those records are
        counted as rejected, the others as delivered, each once, by the ack that deletes it. Records
        quarantined here settle the same way. Acks never move backwards (an older ack resolves with the
        current one); an ack past last_seq fails with InvalidInput and changes nothing.
        """
        future: Future[int] = Future()
        self._queue.put_control(Ack(acked_seq, frozenset(rejected), future))
        return future

    def set_limits(self, max_bytes: int, max_age_s: float) -> Future[None]:
        """Apply new buffer bounds live; resolves after the eviction they call for."""
        _check_limits(max_bytes, max_age_s)
        future: Future[None] = Future()
        self._queue.put_control(SetLimits(max_bytes, max_age_s, future))
        return future

    def counters(self) -> OutboxCounters:
        """The counters as of the last commit, plus the queue's; no SQLite work."""
        return self._writer.counters()

    def writer_alive(self) -> bool:
        """Whether the writer thread runs: False once it died (or after close), when nothing can be kept."""
        return self._writer.alive()

    def close(self, timeout: float | None = 10.0) -> bool:
        """Commit what is queued, stop the writer, close the file. False if the writer did not stop in time."""
        self._queue.close()
        if not self._writer.join(timeout):
            log.warning("outbox.close_timeout", pending=self._queue.pending, timeout_s=timeout)
            return False
        self._reader.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        return True

    def __enter__(self) -> Outbox:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _check_limits(max_bytes: int, max_age_s: float) -> None:
    if max_bytes < 1:
        raise ConfigError(f"buffer.max_bytes must be at least 1, got {max_bytes}")
    if max_age_s < 0:
        raise ConfigError(f"buffer.max_age_s must be >= 0 (0: no age limit), got {max_age_s}")


def _lock(path: Path) -> int:
    """An exclusive lock for this process's lifetime: two writers would hand out the same seqs."""
    lock_path = path.with_name(path.name + ".lock")
    fd = hold_lock(lock_path, 0o644)
    if fd is None:
        raise OutboxUnusable(f"outbox {path} is in use by another process (it holds {lock_path})")
    return fd
