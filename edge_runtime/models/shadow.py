"""Shadow evaluation: a sampled share of a model's live requests mirrored to a candidate version, and the
candidate's answers compared with the active version's.

A mirror is made after the active answer exists and costs its request a random draw and, when sampled, a
copy of the inputs (gathered with other mirrors into one shadow run): the shadow runs on its own version's
batcher at the lowest priority, and a shadow that falls behind has mirrors dropped (counted), never the
active request slowed or failed.
Comparison: top-1 agreement for a classifier (an output as wide as the manifest's labels, or a single
output whose last axis is classes), else elementwise within the manifest's `extra.shadow_tolerance`. The
rows that disagree go to the hard examples (inference/hard.py) when the policy keeps them.

Not which version shadows which (the converger, from the desired state), nor whether the candidate is good
enough (the cloud's rollout gates, over the figures this module counts).
"""

from __future__ import annotations

import asyncio
import math
import random
import threading
import time
from collections.abc import Hashable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import structlog

from edge_runtime.errors import InvalidInput, Overloaded, PackageError
from edge_runtime.inference.hard import HardModel
from edge_runtime.inference.types import InferRequest, InferResponse
from edge_runtime.models.package import ModelManifest

if TYPE_CHECKING:
    from edge_runtime.models.served import ServedModel

__all__ = [
    "DEFAULT_TOLERANCE",
    "Comparator",
    "ShadowCounts",
    "ShadowMirror",
    "Tolerance",
    "check_sample_rate",
    "classes_output",
    "tolerance_of",
]

log = structlog.get_logger(__name__)

Array = np.ndarray[Any, Any]

# Shadow runs in flight at most (queued or running); past it a mirror is dropped and counted.
MAX_IN_FLIGHT = 256
# A batched model's mirrors are gathered into one shadow run of up to this many rows, or this old.
MERGE_ROWS = 16
MERGE_AGE_S = 1.0


@dataclass(frozen=True)
class Tolerance:
    rtol: float = 1e-3
    atol: float = 1e-5


DEFAULT_TOLERANCE = Tolerance()


@dataclass(frozen=True)
class ShadowCounts:
    """One shadow's cumulative counts since it was set. `compared`/`agreed` count rows (one per request for a
    model without a batch axis); `mirrored` requests reached the shadow's queue, `dropped` did not (its
    queue full), `failed` ran and failed or were refused by the shadow's signature."""

    version: int
    sample_rate: float
    mirrored: int = 0
    dropped: int = 0
    failed: int = 0
    compared: int = 0
    agreed: int = 0


def check_sample_rate(rate: float) -> float:
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate <= 1.0:
        raise InvalidInput(f"shadow sample rate must be a number within 0..1, not {rate!r}")
    return float(rate)


def tolerance_of(manifest: ModelManifest) -> Tolerance:
    """The manifest's `extra.shadow_tolerance` {"rtol", "atol"} (either may be left out), checked."""
    raw = manifest.extra.get("shadow_tolerance")
    if raw is None:
        return DEFAULT_TOLERANCE
    where = f"{manifest.ref}: extra.shadow_tolerance"
    if not isinstance(raw, dict) or not set(raw) <= {"rtol", "atol"}:
        raise PackageError(f'{where} must be an object with "rtol" and/or "atol", not {raw!r}')
    values = {}
    for key in ("rtol", "atol"):
        value = raw.get(key, getattr(DEFAULT_TOLERANCE, key))
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0
        if not ok:
            raise PackageError(f"{where}.{key} must be a finite number >= 0, not {value!r}")
        values[key] = float(value)
    return Tolerance(**values)


class Comparator:
    """How a shadow version's answers are judged against the active version's, from the shadow's manifest."""

    def __init__(self, manifest: ModelManifest) -> None:
        self.tolerance = tolerance_of(manifest)
        self.batched = manifest.max_batch_size > 0
        self.classes_output = classes_output(manifest)

    @property
    def rule(self) -> str:
        if self.classes_output is not None:
            return f"top-1 of {self.classes_output}"
        return f"elementwise (rtol {self.tolerance.rtol:g}, atol {self.tolerance.atol:g})"

    def compare(self, active: Mapping[str, Array], shadow: Mapping[str, Array]) -> tuple[int, int]:
        """(compared, agreed): rows for a batched model, else 1 for the request. A missing output or a shape
        that differs disagrees on every row."""
        agree = self.agreement(active, shadow)
        if agree is None:
            return 0, 0
        return int(agree.size), int(agree.sum())

    def agreement(self, active: Mapping[str, Array], shadow: Mapping[str, Array]) -> Array | None:
        """Per row (one for a model without a batch axis): whether the shadow agreed; None: nothing to compare."""
        names = [self.classes_output] if self.classes_output is not None else sorted(active)
        agree: Array | None = None
        rows = 1
        for name in names:
            a, b = active.get(name), shadow.get(name)
            if a is None:
                continue  # the request did not ask for it
            rows = _rows(a, self.batched)
            if b is None or b.shape != a.shape:
                return np.zeros(rows, bool)
            if self.classes_output is not None:
                same = np.argmax(a, axis=-1) == np.argmax(b, axis=-1)
            else:
                same = np.isclose(b, a, rtol=self.tolerance.rtol, atol=self.tolerance.atol, equal_nan=True)
            per_row = same.reshape(rows, -1).all(axis=1) if same.size else np.ones(rows, bool)
            agree = per_row if agree is None else agree & per_row
        return agree


def _rows(a: Array, batched: bool) -> int:
    return int(a.shape[0]) if batched and a.ndim > 0 and a.shape[0] > 0 else 1


def classes_output(manifest: ModelManifest) -> str | None:
    """The output a classifier's top-1 is read from, or None for a model compared elementwise."""

    def width(shape: tuple[int, ...]) -> int:
        return shape[-1] if shape else -1

    if manifest.labels:
        for out in manifest.outputs:
            if width(out.shape) == len(manifest.labels):
                return out.name
    if len(manifest.outputs) == 1:
        out = manifest.outputs[0]
        if out.datatype.startswith("FP") and len(out.shape) >= 2 and width(out.shape) > 1:
            return out.name
    return None


@dataclass(frozen=True)
class _Mirror:
    """One mirrored request: its inputs (a copy), the active's answer, and what a disagreement would keep."""

    inputs: dict[str, Array]
    outputs: dict[str, Array]
    rows: int
    request_id: str
    source: HardModel | None
    kept: bool


class ShadowMirror:
    """Mirrors a sampled share of one model's answered requests to its shadow version and counts agreement.

    `offer` is called with each request the active version answered; it never raises and never waits. For a
    batched model the sampled requests are gathered (up to MERGE_ROWS rows, or MERGE_AGE_S) and run as one
    shadow batch: one wake-up, validation and engine run per batch, not per mirror, keeps the shadow's share
    of the interpreter small. `flush` sends what is gathered (telemetry calls it before it reads the counts).
    """

    def __init__(self, shadow: ServedModel, sample_rate: float, *, rng: random.Random | None = None) -> None:
        self.shadow = shadow
        self.version = shadow.version
        self.sample_rate = check_sample_rate(sample_rate)
        self.comparator = Comparator(shadow.manifest)
        self.max_in_flight = max(1, min(MAX_IN_FLIGHT, shadow.policy.max_queue_depth // 2))
        self.merge_rows = max(1, min(MERGE_ROWS, shadow.manifest.max_batch_size))
        self._random = rng or random.Random()
        self._lock = threading.Lock()
        self._in_flight = 0
        self._mirrored = self._dropped = self._failed = self._compared = self._agreed = 0
        self._closed = False
        # Gathered mirrors of one kind (`_kind`), not yet sent.
        self._pending: list[_Mirror] = []
        self._kind: Hashable = None
        self._pending_rows = 0
        self._pending_since = 0.0

    def set_rate(self, sample_rate: float) -> None:
        self.sample_rate = check_sample_rate(sample_rate)

    def counts(self) -> ShadowCounts:
        with self._lock:
            return ShadowCounts(
                self.version,
                self.sample_rate,
                self._mirrored,
                self._dropped,
                self._failed,
                self._compared,
                self._agreed,
            )

    def close(self) -> None:
        """Mirror nothing more; runs already queued finish and are still counted, gathered ones are dropped."""
        with self._lock:
            self._closed = True
            self._dropped += len(self._pending)
            self._pending, self._pending_rows = [], 0

    def offer(
        self, request: InferRequest, response: InferResponse, source: HardModel | None = None, kept: bool = False
    ) -> None:
        """Maybe mirror `request` (answered by the active version with `response`).

        `source`: the active version (whose answer a disagreement's hard example carries); `kept`: the request
        went to the outbox with its inputs already (a random sample), so a disagreement does not keep it again.
        """
        rate = self.sample_rate
        try:
            if rate > 0.0 and (rate >= 1.0 or self._random.random() < rate) and not self._closed:
                self._gather(request, response, source, kept)
            elif self._pending and time.monotonic() - self._pending_since > MERGE_AGE_S:
                self.flush()
        except Exception as exc:  # a mirror never fails the request it copies
            with self._lock:
                self._failed += 1
            log.debug("shadow.mirror_failed", model=self.shadow.name, version=self.version, error=str(exc))

    def offer_future(
        self,
        request: InferRequest,
        future: Future[InferResponse] | asyncio.Future[InferResponse],
        source: HardModel | None = None,
        kept: bool = False,
    ) -> None:
        """`offer` as a done-callback of an active request's future (failed or cancelled ones are not)."""
        if future.cancelled() or future.exception() is not None:
            return
        self.offer(request, future.result(), source, kept)

    def flush(self) -> None:
        """Send the gathered mirrors now."""
        with self._lock:
            batch, outputs = self._take()
        if batch:
            self._send(batch, outputs)

    def _gather(self, request: InferRequest, response: InferResponse, source: HardModel | None, kept: bool) -> None:
        # A copy: an in-process caller may reuse its input buffers once its answer is back.
        inputs = {name: np.array(value, copy=True) for name, value in request.inputs.items()}
        rows = next((a.shape[0] for a in inputs.values() if a.ndim > 0), 1) if self.comparator.batched else 1
        mirror = _Mirror(inputs, dict(response.outputs), rows, request.id, source, kept)
        if not self.comparator.batched:
            self._send([mirror], request.outputs)
            return
        kind = (request.outputs, tuple((n, a.dtype.str, a.shape[1:]) for n, a in sorted(inputs.items())))
        now = time.monotonic()
        ready = []
        with self._lock:
            if self._pending and (kind != self._kind or self._pending_rows + rows > self.merge_rows):
                ready.append(self._take())
            if not self._pending:
                self._kind, self._pending_since = kind, now
            self._pending.append(mirror)
            self._pending_rows += rows
            if self._pending_rows >= self.merge_rows or now - self._pending_since > MERGE_AGE_S:
                ready.append(self._take())
        for batch, outputs in ready:
            self._send(batch, outputs)

    def _take(self) -> tuple[list[_Mirror], tuple[str, ...] | None]:
        """The gathered mirrors and their output filter (holding the lock)."""
        batch, self._pending, self._pending_rows = self._pending, [], 0
        outputs = self._kind[0] if batch and isinstance(self._kind, tuple) else None
        return batch, outputs

    def _send(self, batch: list[_Mirror], outputs: tuple[str, ...] | None) -> None:
        """Queue one shadow run of `batch` (rows concatenated); dropped when too many runs are in flight."""
        with self._lock:
            if self._in_flight >= self.max_in_flight:
                self._dropped += len(batch)
                return
            self._in_flight += 1
        try:
            if len(batch) == 1:
                inputs, active = batch[0].inputs, batch[0].outputs
            else:
                inputs = {n: np.concatenate([b.inputs[n] for b in batch]) for n in batch[0].inputs}
                active = {n: np.concatenate([b.outputs[n] for b in batch]) for n in batch[0].outputs}
            shadow = self.shadow
            mirror = InferRequest(
                shadow.name,
                inputs,
                model_version=shadow.version_str,
                outputs=outputs,
                priority=shadow.policy.priority_levels,
            )
            future = shadow.batcher.submit(shadow.prepare(mirror, mirror_of=True))
        except Exception as exc:
            with self._lock:
                self._in_flight -= 1
                if isinstance(exc, Overloaded):  # its queue is full of other requests
                    self._dropped += len(batch)
                else:
                    self._failed += len(batch)
            log.debug("shadow.mirror_failed", model=self.shadow.name, version=self.version, error=str(exc))
            return
        with self._lock:
            self._mirrored += len(batch)
        future.add_done_callback(lambda f: self._done(batch, active, f))

    def _done(self, batch: list[_Mirror], active: dict[str, Array], future: Future[InferResponse]) -> None:
        compared = agreed = failed = 0
        requests = len(batch)
        agree: Array | None = None
        shadow: Mapping[str, Array] = {}
        try:
            if future.cancelled() or future.exception() is not None:
                failed = requests
            else:
                shadow = future.result().outputs
                agree = self.comparator.agreement(active, shadow)
                if agree is not None:
                    compared, agreed = int(agree.size), int(agree.sum())
        except Exception as exc:
            failed = requests
            log.warning("shadow.compare_failed", model=self.shadow.name, version=self.version, error=str(exc))
        if agreed < compared and agree is not None:
            # Before the counts move: whoever sees a row compared finds its hard example appended.
            try:
                self._keep_disagreements(batch, agree, shadow)
            except Exception as exc:  # keeping never changes what is counted
                log.warning("shadow.keep_failed", model=self.shadow.name, version=self.version, error=str(exc))
        with self._lock:
            self._in_flight -= 1
            self._failed += failed
            self._compared += compared
            self._agreed += agreed

    def _keep_disagreements(self, batch: list[_Mirror], agree: Array, shadow: Mapping[str, Array]) -> None:
        """Each mirrored request's disagreeing rows as a hard example (not those kept already with their inputs:
        a random sample, or rows its active answer was uncertain of, which the engine thread kept)."""
        hard = self.shadow.hard_examples
        if hard is None or not (hard.enabled and hard.policy.keep_disagreements):
            return
        start = 0
        for mirror in batch:
            rows = mirror.rows  # 1 for a model without a batch axis, whose runs hold one mirror each
            differ = ~agree[start : start + rows]
            begin, start = start, start + rows
            if mirror.kept or mirror.source is None or not differ.any():
                continue
            judged = hard.uncertain_rows(mirror.source, mirror.outputs)
            if judged is not None:
                differ = differ & ~judged[0]
                if not differ.any():
                    continue
            own = {n: a[begin : begin + rows] for n, a in shadow.items()} if self.comparator.batched else shadow
            hard.disagreement(
                mirror.source,
                self.version,
                self.comparator.rule,
                differ,
                mirror.inputs,
                mirror.outputs,
                own,
                mirror.request_id,
            )
