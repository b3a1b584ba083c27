"""Is the agent healthy: the decision systemd's watchdog pings and the gRPC health status follow.

Healthy = the loop answers (the check runs on it, so a wedged loop never gets here), no model version has
been executing one batch for longer than `stuck_batch_s`, and the outbox's writer thread is alive. The
decision (`judge`) is a plain function over plain facts; `gather` reads the facts from the running parts.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = ["STUCK_BATCH_S", "HealthFacts", "gather", "judge", "running_batch_s"]

# A batch running this long is an engine that hangs (a GPU fault, a driver deadlock), not a slow model: the
# slowest batch profiling accepts is 0.5 s and a TensorRT build runs on the builder thread, not in a batch.
# Once it passes, the watchdog stops and systemd restarts the agent WatchdogSec later.
STUCK_BATCH_S = 60.0


class _Batcher(Protocol):
    name: str


class _Served(Protocol):
    @property
    def batcher(self) -> Any: ...


@dataclass(frozen=True)
class HealthFacts:
    """What the decision needs: per model version ("name:version") the seconds its longest-running batch has
    run (absent: none running), and whether the outbox writer thread lives (None: no outbox)."""

    running_batches: Mapping[str, float] = field(default_factory=dict)
    outbox_writer_alive: bool | None = True


def judge(facts: HealthFacts, stuck_batch_s: float = STUCK_BATCH_S) -> str:
    """ "" when healthy, else why not (one line, for the log and `edge-agent status`)."""
    stuck = sorted((ref, s) for ref, s in facts.running_batches.items() if s > stuck_batch_s)
    if stuck:
        ref, seconds = max(stuck, key=lambda item: item[1])
        more = f" (and {len(stuck) - 1} more)" if len(stuck) > 1 else ""
        return f"engine of {ref} has been running one batch for {seconds:.0f} s (limit {stuck_batch_s:.0f} s){more}"
    if facts.outbox_writer_alive is False:
        return "the outbox writer thread has stopped: results can no longer be kept"
    return ""


def gather(served: Iterable[_Served], outbox: object | None, now: float) -> HealthFacts:
    """The facts, read from the served versions' batchers and the outbox; cheap enough for every tick."""
    running: dict[str, float] = {}
    for model in served:
        since = running_since(model.batcher)
        if since is not None:
            running[model.batcher.name] = max(0.0, now - since)
    return HealthFacts(running, None if outbox is None else _writer_alive(outbox))


def running_batch_s(batcher: Any, now: float) -> float:
    """Seconds the batcher's longest-running batch has run; 0.0 when none runs."""
    since = running_since(batcher)
    return 0.0 if since is None else max(0.0, now - since)


def running_since(batcher: Any) -> float | None:
    """time.monotonic() at which the batcher's oldest batch still executing started; None when none is."""
    result = batcher.running_since()
    return None if result is None else float(result)


def _writer_alive(outbox: Any) -> bool:
    return bool(outbox.writer_alive())
