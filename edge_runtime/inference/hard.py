"""Hard examples: inputs a classifier was unsure of, or that a shadow candidate answered differently, kept in
the outbox for the people who retrain, within a byte budget per window (the policy's `samples` section).

The measures are plain vectorised functions over the classifier output (`uncertainty_scores`); `HardExamples`
judges an answer's rows and keeps the uncertain ones as a RECORD_KIND_SAMPLED_INPUT record (priority 20),
encoded on the outbox's writer thread. Not which requests are kept as results or random samples
(keeping.py), nor which output is a classifier's (the shadow Comparator's rule, models/shadow.py).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import structlog

from edge_runtime.errors import EdgeRuntimeError, PackageError
from edge_runtime.inference.keeping import RecordSink, nbytes
from edge_runtime.inference.types import InferResponse
from edge_runtime.kserve.codec import build_request, encode_response
from edge_runtime.outbox import DeferredPayload, OutboxRecord
from edgefleet.policy import UNCERTAINTY_MEASURES, SamplesPolicy
from edgefleet.proto.edgefleet.v1 import results_pb2

__all__ = [
    "DEFAULT_THRESHOLDS",
    "PRIORITY_HARD",
    "ByteBudget",
    "HardCounter",
    "HardCounts",
    "HardExamples",
    "HardModel",
    "UncertaintyRule",
    "manifest_uncertainty",
    "probabilities",
    "record_size",
    "uncertainty_scores",
]

log = structlog.get_logger(__name__)

Array = np.ndarray[Any, Any]

# Outbox priority of a hard example: above random samples (10), below events (50) and kept results (100).
PRIORITY_HARD = 20
# What each measure calls uncertain when neither the policy nor the manifest names a threshold.
DEFAULT_THRESHOLDS = {"margin": 0.2, "top1": 0.5, "entropy": 0.5}
# A row is read as probabilities when none is negative and it sums to 1 within this; else as logits.
_SUM_TOLERANCE = 1e-3
# Answers of up to this many values (rows x classes) are scored in plain Python, larger ones with numpy.
_SMALL = 256
# What a record's encoding adds to its tensors' bytes, at most: fixed fields and varints, each tensor's shape and
# datatype, plus every string at its UTF-8 length (record_size). So the declared size the budget counts is never
# below the payload stored: an operator's budget bounds what reaches the cloud.
_FIXED_OVERHEAD_BYTES = 256
_TENSOR_OVERHEAD_BYTES = 48
REASON_UNCERTAIN = "uncertain"
REASON_DISAGREEMENT = "disagreement"


@dataclass(frozen=True)
class UncertaintyRule:
    """A measure and its threshold: top1 and margin mark a row uncertain below it, entropy above it."""

    measure: str
    threshold: float

    def is_uncertain(self, score: float) -> bool:
        """`uncertain` of one score, in plain Python."""
        return not (score <= self.threshold) if self.measure == "entropy" else not (score >= self.threshold)

    def uncertain(self, scores: Array) -> Array:
        """Per row: whether it is uncertain (a NaN score, from a NaN output, is: a model answering NaN is hard)."""
        if self.measure == "entropy":
            return ~(scores <= self.threshold)
        return ~(scores >= self.threshold)

    def most_uncertain(self, scores: Array) -> float:
        """The score of the row judged most uncertain (what a record of several rows carries)."""
        if scores.size == 0:
            return 0.0
        finite = scores[np.isfinite(scores)]
        if finite.size < scores.size or finite.size == 0:
            return math.nan
        return float(finite.max() if self.measure == "entropy" else finite.min())


def probabilities(values: Array) -> Array:
    """Class probabilities along the last axis: rows that already are (none negative, summing to ~1) as they
    are, the others (logits) through a softmax. float32 or float64 in, the same out."""
    x = values if values.dtype.kind == "f" and values.dtype.itemsize >= 4 else values.astype(np.float32)
    sums = x.sum(axis=-1, keepdims=True)
    is_prob = (x.min(axis=-1, keepdims=True) >= 0) & (np.abs(sums - 1) <= _SUM_TOLERANCE)
    if bool(is_prob.all()):
        return x
    shifted = np.exp(x - x.max(axis=-1, keepdims=True))
    soft = shifted / shifted.sum(axis=-1, keepdims=True)
    return np.where(is_prob, x, soft)


def uncertainty_scores(measure: str, output: Array, rows: int) -> Array:
    """One score per row of a classifier output (rows x ... x classes): for an output with more than one
    prediction per row (per position), the row's most uncertain one."""
    if measure not in DEFAULT_THRESHOLDS:
        raise ValueError(f"unknown uncertainty measure {measure!r}")  # the policy and manifests are checked
    if output.ndim == 2 and output.size <= _SMALL and output.shape[0] == rows:
        return np.array(_scores_python(measure, output.tolist()), np.float64)
    return _scores_numpy(measure, output, rows)


def _scores_numpy(measure: str, output: Array, rows: int) -> Array:
    classes = int(output.shape[-1]) if output.ndim else 1
    p = probabilities(output.reshape(rows, -1, max(classes, 1)))
    scores: Array
    if measure == "entropy":
        if classes < 2:
            return np.zeros(rows, p.dtype)
        with np.errstate(divide="ignore", invalid="ignore"):
            terms = np.where(p == 0, 0.0, p * np.log(p))  # a NaN stays NaN: uncertain
        scores = (-terms.sum(axis=-1) / math.log(classes)).max(axis=1)
    elif measure == "top1":
        scores = p.max(axis=-1).min(axis=1)
    elif classes < 2:  # margin
        scores = p[..., 0].min(axis=1)
    else:
        top2 = np.partition(p, classes - 2, axis=-1)[..., -2:]
        scores = (top2[..., 1] - top2[..., 0]).min(axis=1)
    return scores


def _scores_python(measure: str, rows: list[list[float]]) -> list[float]:
    """The scores of a small answer in plain Python: each numpy call costs 1-3 us, a 1 x 10 answer's whole
    judgement here about as much as one of them (measured: docs/notes/hard.md)."""
    return [_row_score(measure, row) for row in rows]


def _row_score(measure: str, row: list[float]) -> float:
    classes = len(row)
    if not (min(row) >= 0 and abs(sum(row) - 1) <= _SUM_TOLERANCE):  # logits (or NaN: it stays NaN)
        top = max(row)
        shifted = [math.exp(v - top) for v in row]
        total = sum(shifted)
        row = [v / total for v in shifted]
    if measure == "top1":
        return max(row)
    if measure == "margin":
        if classes < 2:
            return row[0]
        second, first = sorted(row)[-2:]  # at most _SMALL values: faster than heapq.nlargest
        return first - second if first == first and second == second else math.nan
    if classes < 2:
        return 0.0
    return -sum(v * math.log(v) if v != 0 else 0.0 for v in row) / math.log(classes)


def manifest_uncertainty(extra: Mapping[str, Any], classes_output: str | None, ref: str) -> UncertaintyRule | None:
    """The manifest's `extra.uncertainty` {"measure", "threshold"} (threshold optional), checked: PackageError
    names the key. None when it declares none."""
    raw = extra.get("uncertainty")
    if raw is None:
        return None
    where = f"{ref}: extra.uncertainty"
    if not isinstance(raw, dict) or "measure" not in raw or not set(raw) <= {"measure", "threshold"}:
        raise PackageError(f'{where} must be an object of "measure" and optionally "threshold", not {raw!r}')
    measure = raw["measure"]
    if measure not in UNCERTAINTY_MEASURES:
        raise PackageError(f"{where}.measure must be one of {', '.join(UNCERTAINTY_MEASURES)}, not {measure!r}")
    threshold = raw.get("threshold", DEFAULT_THRESHOLDS[measure])
    ok = isinstance(threshold, (int, float)) and not isinstance(threshold, bool) and 0 <= threshold <= 1
    if not ok:  # NaN fails the bounds
        raise PackageError(f"{where}.threshold must be a number within 0..1, not {threshold!r}")
    if classes_output is None:
        raise PackageError(
            f"{where}: the model is not a classifier (no output as wide as its labels, nor a single FP output "
            "whose last axis is classes), so it has no uncertainty to measure"
        )
    return UncertaintyRule(measure, float(threshold))


@dataclass(frozen=True)
class HardCounts:
    """A version's cumulative hard-example counts: kept records by reason, their declared bytes, and those the
    byte budget left out."""

    kept: Mapping[str, int] = field(default_factory=dict)
    bytes: int = 0
    over_budget: int = 0

    @property
    def kept_total(self) -> int:
        return sum(self.kept.values())


class HardCounter:
    """One model version's hard-example counters; bumped from engine threads and shadow callbacks."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._kept: dict[str, int] = {}
        self._bytes = self._over_budget = 0

    def on_kept(self, reason: str, size: int) -> None:
        with self._lock:
            self._kept[reason] = self._kept.get(reason, 0) + 1
            self._bytes += size

    def on_over_budget(self) -> None:
        with self._lock:
            self._over_budget += 1

    def snapshot(self) -> HardCounts:
        with self._lock:
            return HardCounts(dict(self._kept), self._bytes, self._over_budget)


@dataclass(frozen=True)
class HardModel:
    """What judging and keeping need of a served version (built by ServedModel at load)."""

    name: str
    version: int
    engine: str  # the engine's description, "onnxruntime/CPUExecutionProvider"
    precision: str
    batched: bool
    classes_output: str | None
    declared: UncertaintyRule | None  # the manifest's extra.uncertainty
    counter: HardCounter = field(compare=False)


class ByteBudget:
    """`limit` bytes per `window_s` (fixed windows from the first take after the last one ended); thread-safe."""

    def __init__(self, limit: int, window_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._lock = threading.Lock()
        self._clock = clock
        self.limit, self.window_s = limit, window_s
        self._used = 0
        self._window_start: float | None = None

    def set_limits(self, limit: int, window_s: float) -> None:
        """New bounds from now; what the current window used still counts against it."""
        with self._lock:
            self.limit, self.window_s = limit, window_s

    def take(self, size: int) -> bool:
        """Reserve `size` bytes in the current window; False (nothing reserved) when they do not fit."""
        with self._lock:
            now = self._clock()
            if self._window_start is None or now - self._window_start >= self.window_s:
                self._window_start, self._used = now, 0
            if self._used + size > self.limit:
                return False
            self._used += size
            return True

    def give_back(self, size: int) -> None:
        """Return bytes a take reserved for a record the outbox then refused."""
        with self._lock:
            self._used = max(0, self._used - size)

    @property
    def used(self) -> int:
        with self._lock:
            return self._used


class HardExamples:
    """Judges answers and keeps the hard ones in the outbox within the device's byte budget.

    One per agent (the budget is the device's), shared by every served version. Off (nothing judged, nothing
    kept) while `samples.hard_bytes_per_window` is 0 or there is no outbox. `apply` changes the policy live.
    """

    def __init__(
        self, sink: RecordSink | None, policy: SamplesPolicy | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._sink = sink
        policy = policy or SamplesPolicy()
        # The policy and the rule it names on its own, swapped as one (engine threads read them unlocked).
        self._state = (policy, _policy_rule(policy))
        self.budget = ByteBudget(policy.hard_bytes_per_window, policy.hard_window_s, clock)
        self.dropped = 0  # records the outbox refused at the door (full queue, shutting down)

    def apply(self, policy: SamplesPolicy) -> None:
        self.budget.set_limits(policy.hard_bytes_per_window, policy.hard_window_s)
        self._state = (policy, _policy_rule(policy))

    @property
    def policy(self) -> SamplesPolicy:
        return self._state[0]

    @property
    def enabled(self) -> bool:
        return self._sink is not None and self.policy.hard_bytes_per_window > 0

    def rule_for(self, model: HardModel) -> UncertaintyRule | None:
        """The policy's measure when it names one, else the manifest's, else margin; None: not a classifier."""
        if model.classes_output is None:
            return None
        (policy, rule), declared = self._state, model.declared
        if rule is None:
            return declared or _DEFAULT_RULES["margin"]
        if not policy.threshold and declared is not None and declared.measure == policy.measure:
            return declared
        return rule

    def uncertain_rows(self, model: HardModel, outputs: Mapping[str, Array]) -> tuple[Array, Array, str] | None:
        """(mask of uncertain rows, the rows' scores, the measure) of an answer; None when off, not measurable
        or no row is uncertain."""
        rule = self.rule_for(model) if self.enabled else None
        if rule is None:
            return None
        assert model.classes_output is not None
        output = outputs.get(model.classes_output)
        if output is None or output.size == 0:
            return None
        rows = int(output.shape[0]) if model.batched and output.ndim > 1 else 1
        if output.ndim == 2 and output.size <= _SMALL and output.shape[0] == rows:
            # The common case (a request of a few rows) without a numpy call but tolist and two small arrays.
            values = _scores_python(rule.measure, output.tolist())
            flags = [rule.is_uncertain(v) for v in values]
            if not any(flags):
                return None
            return np.array(flags), np.array(values, np.float64), rule.measure
        scores = uncertainty_scores(rule.measure, output, rows)
        mask = rule.uncertain(scores)
        return (mask, scores, rule.measure) if mask.any() else None

    def judge(
        self, model: HardModel, inputs: Mapping[str, Array], outputs: Mapping[str, Array], request_id: str
    ) -> Future[int] | None:
        """Keep the uncertain rows of one answer (called on the engine thread, only while enabled)."""
        judged = self.uncertain_rows(model, outputs)
        if judged is None:
            return None
        mask, scores, measure = judged
        score = UncertaintyRule(measure, 0.0).most_uncertain(scores[mask])
        return self.keep(model, REASON_UNCERTAIN, measure, score, mask, inputs, outputs, request_id)

    def disagreement(
        self,
        model: HardModel,
        shadow_version: int,
        rule: str,
        mask: Array,
        inputs: Mapping[str, Array],
        active: Mapping[str, Array],
        shadow: Mapping[str, Array],
        request_id: str = "",
    ) -> Future[int] | None:
        """Keep the rows of one mirrored request where the shadow disagreed (`mask`), with both answers."""
        if not (self.enabled and self.policy.keep_disagreements) or not mask.any():
            return None
        score = _largest_difference(_rows_of(active, mask, model.batched), _rows_of(shadow, mask, model.batched))
        return self.keep(
            model, REASON_DISAGREEMENT, rule, score, mask, inputs, active, request_id, shadow_version, shadow
        )

    def keep(
        self,
        model: HardModel,
        reason: str,
        measure: str,
        score: float,
        mask: Array,
        inputs: Mapping[str, Array],
        outputs: Mapping[str, Array],
        request_id: str,
        shadow_version: int = 0,
        shadow_outputs: Mapping[str, Array] | None = None,
    ) -> Future[int] | None:
        """Append one record of the `mask` rows, if the budget has room (else counted as over budget)."""
        # Copies of the rows: an in-process app may reuse its buffers once answered, before the writer encodes.
        rows_in = _rows_of(inputs, mask, model.batched)
        rows_out = _rows_of(outputs, mask, model.batched)
        rows_shadow = None if shadow_outputs is None else _rows_of(shadow_outputs, mask, model.batched)
        size = record_size(model, reason, measure, request_id, rows_in, rows_out, rows_shadow or {})
        if not self.budget.take(size):
            model.counter.on_over_budget()
            return None
        version = str(model.version)

        def payload() -> bytes:
            message = results_pb2.SampledInference(
                request=build_request(model.name, rows_in, version=version, request_id=request_id),
                response=encode_response(InferResponse(model.name, version, dict(rows_out), id=request_id)),
                reason=reason,
                measure=measure,
                score=score,
                engine=model.engine,
                precision=model.precision,
                shadow_version=shadow_version,
            )
            if rows_shadow is not None:
                shadow_response = InferResponse(model.name, str(shadow_version), dict(rows_shadow), id=request_id)
                message.shadow_response.CopyFrom(encode_response(shadow_response))
            return message.SerializeToString()

        record = OutboxRecord(
            int(time.time() * 1000),
            model.name,
            model.version,
            PRIORITY_HARD,
            results_pb2.RECORD_KIND_SAMPLED_INPUT,
            "edgefleet.v1.SampledInference",
            DeferredPayload(payload, size),
            request_id,
        )
        assert self._sink is not None  # enabled
        try:
            future = self._sink.append(record)
        except EdgeRuntimeError as exc:
            self.budget.give_back(size)
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.warning("outbox.append_refused", dropped_total=self.dropped, reason=str(exc), kind="hard")
            return None
        model.counter.on_kept(reason, size)
        return future


_DEFAULT_RULES = {measure: UncertaintyRule(measure, threshold) for measure, threshold in DEFAULT_THRESHOLDS.items()}


def _policy_rule(policy: SamplesPolicy) -> UncertaintyRule | None:
    """The rule a policy names on its own (a measure and its threshold, or the measure's default)."""
    if not policy.measure:
        return None
    return UncertaintyRule(policy.measure, policy.threshold) if policy.threshold else _DEFAULT_RULES[policy.measure]


def record_size(model: HardModel, reason: str, measure: str, request_id: str, *tensors: Mapping[str, Array]) -> int:
    """The declared size of a hard example: its arrays' bytes and an upper bound of what encoding adds."""
    strings = 3 * (len(model.name.encode()) + len(request_id.encode()))  # request, response, shadow response
    strings += sum(len(text.encode()) for text in (model.engine, model.precision, reason, measure))
    size = nbytes(a for group in tensors for a in group.values()) + _FIXED_OVERHEAD_BYTES + strings
    return size + sum(2 * len(name.encode()) + _TENSOR_OVERHEAD_BYTES for group in tensors for name in group)


def _rows_of(arrays: Mapping[str, Array], mask: Array, batched: bool) -> dict[str, Array]:
    """The `mask` rows of each array, copied."""
    if not batched:
        return {name: np.array(a, copy=True) for name, a in arrays.items()}
    return {name: a[mask] if a.ndim > 0 and a.shape[0] == mask.shape[0] else a for name, a in arrays.items()}


def _largest_difference(active: Mapping[str, Array], shadow: Mapping[str, Array]) -> float:
    """The largest absolute difference between the two answers' float outputs (how far apart they were)."""
    largest = 0.0
    for name, a in active.items():
        b = shadow.get(name)
        if b is None or b.shape != a.shape or a.dtype.kind != "f" or b.dtype.kind != "f" or a.size == 0:
            continue
        largest = max(largest, float(np.nanmax(np.abs(a.astype(np.float64) - b))))
    return largest
