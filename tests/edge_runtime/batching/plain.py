"""A plain request and a recording observer, for testing the batcher without a model."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

__all__ = ["Recorder", "Req"]


@dataclass(frozen=True)
class Req:
    ident: int
    rows: int = 1
    priority: int = 1
    deadline: float | None = None
    group: Hashable = None


class Recorder:
    """A BatchObserver that keeps what it saw."""

    def __init__(self) -> None:
        self.batches: list[tuple[int, int, bool]] = []
        self.rejected: list[str] = []

    def on_batch(self, rows: int, requests: int, queue_s: Sequence[float], compute_s: float, ok: bool) -> None:
        self.batches.append((rows, requests, ok))

    def on_rejected(self, reason: str) -> None:
        self.rejected.append(reason)
