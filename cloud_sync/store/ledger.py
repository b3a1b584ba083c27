"""The ledger of a device's uploads as plain functions: where a batch lies against the watermark, which seqs it
declares evicted, and whether the counts it implies contradict the device's own counters or the cloud's.

stored + evicted + rejected = produced, on both sides. No I/O here; results.py applies these decisions in a
transaction. Not the validation of one batch's contents: see batches.py.
"""

from __future__ import annotations

import bisect
import enum
from collections.abc import Sequence
from dataclasses import dataclass, replace

from cloud_sync.errors import InvalidBatch
from cloud_sync.store.batches import QuarantinedRecord, ValidBatch

__all__ = [
    "DeviceLedger",
    "IngestPlan",
    "Placement",
    "check_ledger",
    "merge_seqs",
    "missing_ranges",
    "place",
    "plan_ingest",
]


class Placement(enum.Enum):
    """Where a batch lies against the device's watermark (the cloud's acked_seq)."""

    # after_seq <= watermark < through_seq: it continues (or overlaps) what the cloud has; the watermark moves.
    ADVANCES = "advances"
    # after_seq > watermark: the cloud lacks seqs before it; store its records, leave the watermark.
    GAP = "gap"
    # through_seq <= watermark: everything in it is stored, declared evicted or rejected already.
    REPLAY = "replay"


def place(after_seq: int, through_seq: int, watermark: int) -> Placement:
    """Classify a batch covering (after_seq, through_seq] against `watermark`."""
    if through_seq <= watermark:
        return Placement.REPLAY
    if after_seq > watermark:
        return Placement.GAP
    return Placement.ADVANCES


def missing_ranges(after_seq: int, through_seq: int, present: Sequence[int]) -> list[tuple[int, int]]:
    """The inclusive ranges of seqs in (after_seq, through_seq] absent from `present` (sorted, unique, in range)."""
    if len(present) == through_seq - after_seq:
        return []  # the usual batch: nothing evicted
    ranges: list[tuple[int, int]] = []
    expected = after_seq + 1
    for seq in present:
        if seq > expected:
            ranges.append((expected, seq - 1))
        expected = seq + 1
    if expected <= through_seq:
        ranges.append((expected, through_seq))
    return ranges


def merge_seqs(*sorted_seqs: Sequence[int]) -> list[int]:
    """The union of sorted, disjoint seq lists, sorted (the common case, one non-empty list, costs nothing)."""
    non_empty = [seqs for seqs in sorted_seqs if seqs]
    if len(non_empty) <= 1:
        return list(non_empty[0]) if non_empty else []
    return sorted(seq for seqs in non_empty for seq in seqs)


@dataclass(frozen=True)
class DeviceLedger:
    """What the cloud has counted for one device, and the device's counters as it declared them."""

    acked_seq: int = 0
    max_stored_seq: int = 0
    stored: int = 0
    evicted: int = 0
    rejected: int = 0  # by the cloud or declared by the device
    rejected_on_device: int = 0  # of those, declared by the device
    device_produced: int = 0
    device_evicted: int = 0
    device_rejected: int = 0


def check_ledger(batch: ValidBatch, before: DeviceLedger, after: DeviceLedger) -> None:
    """Refuse a batch whose counters contradict what the cloud counted (InvalidBatch; nothing changes).

    `after` is the ledger as accepting the batch would leave it. The cloud never counts more seqs than the
    device says it produced, more evictions than it says it made, nor more of its rejections than it says it
    declared; and the device never reports producing fewer seqs than the cloud has already accounted for.
    A current batch of a truthful device always passes: its counters only grow and count every seq the cloud
    counted. A stale one (from a stream that outlived its agent) may not, and nobody waits for its answer.
    """
    produced, evicted, rejected = batch.device_produced_total, batch.device_evicted_total, batch.device_rejected_total
    accounted = max(before.acked_seq, before.max_stored_seq)
    if produced < accounted:
        raise InvalidBatch(
            f"the device's produced_total {produced} is below seq {accounted}, which the cloud has already "
            "accounted for: its counters went backwards (a restored outbox?) or another device uses its token"
        )
    if after.stored + after.evicted + after.rejected > produced:
        raise InvalidBatch(
            f"accepting the batch would account for {after.stored} stored + {after.evicted} evicted + "
            f"{after.rejected} rejected seqs, more than the device's produced_total {produced}"
        )
    if after.evicted > evicted:
        raise InvalidBatch(
            f"accepting the batch would count {after.evicted} seqs evicted (the cloud counted {before.evicted} "
            f"before it), more than the device's evicted_total {evicted}"
        )
    if after.rejected_on_device > rejected:
        raise InvalidBatch(
            f"accepting the batch would count {after.rejected_on_device} rejections declared by the device, more "
            f"than its rejected_total {rejected}"
        )


@dataclass(frozen=True)
class IngestPlan:
    """What accepting a batch that is not a replay does: what to insert, quarantine and record as evicted, and
    the ledger it leaves."""

    rows: list[tuple[object, ...]]
    seqs: list[int]
    quarantined: list[QuarantinedRecord]
    declared: list[QuarantinedRecord]
    evictions: list[tuple[int, int]]
    after: DeviceLedger
    skews: list[int]  # of the rows to store stamped past the clock tolerance


def plan_ingest(batch: ValidBatch, before: DeviceLedger, placement: Placement, accounted: Sequence[int]) -> IngestPlan:
    """Plan a batch that advances the watermark or lies past a gap (REPLAY is the caller's: it changes nothing).

    `accounted`: the seqs of (watermark, through_seq] already stored or quarantined (by a batch past a gap),
    ascending. Seqs at or below the watermark, or accounted, are duplicates: never inserted again.
    """
    watermark = before.acked_seq
    start = bisect.bisect_right(batch.seqs, watermark)
    rows, seqs = batch.rows[start:], batch.seqs[start:]
    quarantined = [q for q in batch.quarantined if q.seq > watermark]
    declared = [d for d in batch.declared if d.seq > watermark]
    if accounted:
        known = set(accounted)
        kept = [i for i, seq in enumerate(seqs) if seq not in known]
        rows, seqs = [rows[i] for i in kept], [seqs[i] for i in kept]
        quarantined = [q for q in quarantined if q.seq not in known]
        declared = [d for d in declared if d.seq not in known]
    quarantined_seqs, declared_seqs = [q.seq for q in quarantined], [d.seq for d in declared]
    evictions: list[tuple[int, int]] = []
    acked_seq = watermark
    if placement is Placement.ADVANCES:
        acked_seq = batch.through_seq
        present = merge_seqs(seqs, quarantined_seqs, declared_seqs, accounted)
        evictions = missing_ranges(watermark, acked_seq, present)
    after = replace(
        before,
        acked_seq=acked_seq,
        max_stored_seq=max([before.max_stored_seq, *(s[-1] for s in (seqs, quarantined_seqs, declared_seqs) if s)]),
        stored=before.stored + len(rows),
        evicted=before.evicted + sum(high - low + 1 for low, high in evictions),
        rejected=before.rejected + len(quarantined) + len(declared),
        rejected_on_device=before.rejected_on_device + len(declared),
        # Counters only grow on the device: an older batch arriving after a newer one must not lower them.
        device_produced=max(before.device_produced, batch.device_produced_total),
        device_evicted=max(before.device_evicted, batch.device_evicted_total),
        device_rejected=max(before.device_rejected, batch.device_rejected_total),
    )
    skews = [batch.skewed[seq] for seq in seqs if seq in batch.skewed] if batch.skewed else []
    return IngestPlan(rows, seqs, quarantined, declared, evictions, after, skews)
