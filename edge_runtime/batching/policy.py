"""Pure batching decisions: which batch sizes to profile, when to stop, and the plan the batcher runs.

Measured here: batching makes a tiny MLP ~19x faster per inference but makes a CNN on CPU slower
(batch 32 at ~0.75x the throughput of batch 1), so the plan batches only where the profile says it pays.
No I/O in this module; profiler.py measures, batcher.py executes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["ON_LOOP_LIMIT_S", "BatchPlan", "ProfilePoint", "plan_batching", "profile_sizes", "profiling_done"]

# A larger batch must beat the best smaller one by this much to count as an improvement: below it the
# difference is within run-to-run noise on a shared 2-core box and the smaller batch has lower latency.
MIN_GAIN = 1.05
# A batch larger than 1 is planned only if it gives this much more throughput than batch 1. Batching costs
# every request a queue delay, a longer execution and activation memory; a smaller gain is not worth that,
# and from a profile of a few runs it can be noise: mobilenet-bench on this CPU profiled batch 4 at 111/s
# against 97/s for batch 1, then served 74 requests/s at batch 4 where batch 1 served 93/s.
WORTH_BATCHING = 1.2
# Stop profiling after this many sizes in a row without an improvement.
PATIENCE = 2
# A model whose planned batch runs within this long runs on the server's event loop instead of an engine
# thread (batcher.py "on the loop"): handing a batch to a thread and its answers back costs two wake-ups,
# GIL hand-offs and ~40-90 µs of CPU per batch on one core (docs/performance.md), more than such a batch
# itself, and the loop is never held for longer than this by one batch.
ON_LOOP_LIMIT_S = 200e-6


@dataclass(frozen=True)
class ProfilePoint:
    batch_size: int
    latency_s: float  # the fastest measured run of one batch of this size (profiler.py says why)

    @property
    def throughput(self) -> float:
        """Inferences (rows) per second."""
        return self.batch_size / self.latency_s if self.latency_s > 0 else 0.0


@dataclass(frozen=True)
class BatchPlan:
    max_batch_size: int
    max_queue_delay_s: float
    reason: str
    # Batches run on the event loop that submits them, not on engine threads (ON_LOOP_LIMIT_S).
    on_loop: bool = False


def profile_sizes(cap: int) -> list[int]:
    """Powers of two up to `cap`, and `cap` itself."""
    sizes, size = [], 1
    while size < cap:
        sizes.append(size)
        size *= 2
    sizes.append(cap)
    return sizes


def profiling_done(points: Sequence[ProfilePoint], slo_s: float, budget_s: float) -> bool:
    """Whether larger batch sizes are not worth measuring."""
    if not points:
        return False
    last = points[-1]
    if slo_s > 0 and last.latency_s > slo_s:
        return True  # larger batches only take longer
    if last.latency_s > budget_s:
        return True
    best_before, misses = 0.0, 0
    for point in points:
        if point.throughput >= best_before * MIN_GAIN:
            misses = 0
        else:
            misses += 1
        best_before = max(best_before, point.throughput)
    return misses >= PATIENCE


def plan_batching(
    points: Sequence[ProfilePoint] | None,
    *,
    cap: int,
    configured_delay_s: float,
    slo_s: float,
    on_loop_allowed: bool = False,
) -> BatchPlan:
    """The batch size and queue delay that give the most throughput within the latency SLO.

    `cap` is the smaller of the policy's and the model's max batch size (1 for a model with no batch axis).
    Without a profile the configured values are used as they are. `on_loop_allowed`: the model may run on the
    event loop (fixed non-batch shapes, inference.run_on_loop), which the plan then asks for when the chosen
    batch runs within ON_LOOP_LIMIT_S.
    """
    if cap <= 1:
        return BatchPlan(1, 0.0, "batch size 1: the model has no batch axis, or inference.max_batch_size is 1")
    if not points:
        return BatchPlan(cap, configured_delay_s, "configured (no profile)")
    fits = [p for p in points if p.batch_size <= cap and (slo_s <= 0 or p.latency_s <= slo_s)]
    if not fits:
        return BatchPlan(1, 0.0, f"even batch 1 takes longer than the {slo_s * 1e3:g} ms SLO")
    best = max(p.throughput for p in fits)
    # The smallest batch within noise of the best: same throughput, less latency.
    chosen = min((p for p in fits if p.throughput * MIN_GAIN >= best), key=lambda p: p.batch_size)
    one = next((p for p in fits if p.batch_size == 1), None)
    if one is not None and chosen.throughput < one.throughput * WORTH_BATCHING:
        chosen = one
    delay = configured_delay_s
    if slo_s > 0:
        delay = min(delay, max(0.0, slo_s - chosen.latency_s))
    on_loop = on_loop_allowed and chosen.latency_s <= ON_LOOP_LIMIT_S
    where = f"; on the event loop (a batch takes {chosen.latency_s * 1e6:.0f} µs)" if on_loop else ""
    if chosen.batch_size == 1:
        return BatchPlan(
            1,
            0.0,
            f"batching does not pay: batch 1 gives {chosen.throughput:.0f}/s, "
            f"the best larger batch {best:.0f}/s (less than {WORTH_BATCHING:g}x){where}",
            on_loop,
        )
    within = f" within the {slo_s * 1e3:g} ms SLO" if slo_s > 0 else ""
    return BatchPlan(
        chosen.batch_size,
        delay,
        f"batch {chosen.batch_size} gives {chosen.throughput:.0f}/s{within} "
        f"(batch 1: {fits[0].throughput:.0f}/s){where}",
        on_loop,
    )
