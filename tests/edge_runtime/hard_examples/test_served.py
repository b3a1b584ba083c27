"""Hard examples from live answers, through a real ONNX Runtime session and a real outbox: digits v1 (an
undertrained model) is unsure of some held-out digits; exactly those rows are kept, once, within the budget,
counted in telemetry and on the metrics page, and the outbox's ledger balances."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from edge_runtime import InferRequest, ModelRepository
from edge_runtime.inference.hard import (
    PRIORITY_HARD,
    HardExamples,
    UncertaintyRule,
    record_size,
    uncertainty_scores,
)
from edge_runtime.kserve.codec import KEEP_PARAMETER
from edge_runtime.observability.metrics import AgentMetrics
from edge_runtime.outbox import Outbox
from edge_runtime.telemetry import TelemetryCollector
from edgefleet.policy import SamplesPolicy
from edgefleet.proto.edgefleet.v1 import results_pb2
from models.build import digits_holdout
from tests.edge_runtime.hard_examples.conftest import ON, records, sampled, tensor

MARGIN = UncertaintyRule("margin", 0.2)


@pytest.fixture
def digits(make_repo: Callable[..., ModelRepository], model_packages: dict[str, Path]) -> ModelRepository:
    repo = make_repo()
    repo.install(model_packages["digits:1"])
    return repo


def one_row(repo: ModelRepository) -> int:
    """The declared size of a one-row digits hard example of a request without an id."""
    rows = {"pixels": np.zeros((1, 64), np.float32)}, {"probabilities": np.zeros((1, 10), np.float32)}
    return record_size(repo.model("digits").hard, "uncertain", "margin", "", *rows)


def v1_answers(repo: ModelRepository, x: np.ndarray) -> np.ndarray:
    return repo.model("digits").engine.run({"pixels": x})["probabilities"]


def test_the_uncertain_rows_of_a_batch_are_kept_with_why_and_how(digits: ModelRepository, outbox: Outbox) -> None:
    x = digits_holdout()[0][:64]
    answer = digits.infer(InferRequest("digits", {"pixels": x}, id="batch-1"))
    p = answer.outputs["probabilities"]
    scores = uncertainty_scores("margin", p, 64)
    uncertain = MARGIN.uncertain(scores)
    assert 0 < uncertain.sum() < 64  # v1 is unsure of some, not all

    (record,) = records(outbox)
    assert (record.model, record.version, record.priority, record.request_id) == ("digits", 1, PRIORITY_HARD, "batch-1")
    kept = sampled(record)
    served = digits.model("digits")
    assert (kept.reason, kept.measure, kept.precision) == ("uncertain", "margin", "fp32")
    assert kept.engine == served.engine.info.description == "onnxruntime/CPUExecutionProvider"
    assert kept.score == pytest.approx(float(scores[uncertain].min()))
    assert kept.shadow_version == 0 and not kept.HasField("shadow_response")
    np.testing.assert_array_equal(tensor(kept.request, 0), x[uncertain])  # only the uncertain rows
    np.testing.assert_array_equal(tensor(kept.response, 0), p[uncertain])
    counts = served.hard.counter.snapshot()
    assert counts.kept == {"uncertain": 1} and counts.over_budget == 0
    # The declared size the budget counts: the rows' bytes and a bound of what encoding adds, never below the payload.
    declared = record_size(
        served.hard, "uncertain", "margin", "batch-1", {"pixels": x[uncertain]}, {"probabilities": p[uncertain]}
    )
    assert counts.bytes == declared >= len(record.payload)


def test_one_record_per_uncertain_request_and_none_for_the_certain(digits: ModelRepository, outbox: Outbox) -> None:
    x = digits_holdout()[0][:120]
    for i in range(120):
        digits.infer(InferRequest("digits", {"pixels": x[i : i + 1]}, id=f"r-{i}"))
    uncertain = MARGIN.uncertain(uncertainty_scores("margin", v1_answers(digits, x), 120))
    kept = records(outbox)
    assert sorted(r.request_id for r in kept) == sorted(f"r-{i}" for i in np.flatnonzero(uncertain))
    for r in kept:
        i = int(r.request_id.removeprefix("r-"))
        np.testing.assert_array_equal(tensor(sampled(r).request, 0), x[i : i + 1])


def test_the_uncertain_rows_are_the_ones_v1_gets_wrong_more_often(digits: ModelRepository, outbox: Outbox) -> None:
    x, labels = digits_holdout()
    x, labels = x[:256], labels[:256]  # the model's largest request
    digits.infer(InferRequest("digits", {"pixels": x}))
    p = v1_answers(digits, x)
    uncertain = MARGIN.uncertain(uncertainty_scores("margin", p, len(x)))
    right = p.argmax(1) == labels
    # What makes them worth labelling: v1 is far less accurate on them than on the rest.
    assert right[uncertain].mean() + 0.3 < right[~uncertain].mean()


def test_a_random_sample_is_not_kept_twice(
    make_repo: Callable[..., ModelRepository], model_packages: dict[str, Path], outbox: Outbox
) -> None:
    repo = make_repo(sample_rate=1.0)
    repo.install(model_packages["digits:1"])
    x = digits_holdout()[0][:64]
    repo.infer(InferRequest("digits", {"pixels": x}))
    (record,) = records(outbox)
    assert sampled(record).reason == ""  # the random sample, with all 64 rows: it holds the inputs already
    assert repo.model("digits").hard.counter.snapshot().kept_total == 0


def test_a_kept_result_that_was_uncertain_is_a_hard_example_too(
    make_repo: Callable[..., ModelRepository], model_packages: dict[str, Path], outbox: Outbox
) -> None:
    """A kept result holds only the answer; the people who retrain need the inputs of an uncertain one."""
    repo = make_repo(sample_rate=0.0)
    repo.install(model_packages["digits:1"])
    x = digits_holdout()[0][:64]
    repo.infer(InferRequest("digits", {"pixels": x}, parameters={KEEP_PARAMETER: True}))
    kinds = sorted(r.kind for r in records(outbox))
    assert kinds == [results_pb2.RECORD_KIND_RESULT, results_pb2.RECORD_KIND_SAMPLED_INPUT], kinds
    (hard,) = [r for r in records(outbox) if r.kind == results_pb2.RECORD_KIND_SAMPLED_INPUT]
    assert sampled(hard).reason == "uncertain"
    assert repo.model("digits").hard.counter.snapshot().kept_total == 1


def test_past_the_budget_nothing_is_produced_and_it_is_counted(
    digits: ModelRepository, hard: HardExamples, outbox: Outbox
) -> None:
    x = digits_holdout()[0]
    one = one_row(digits)
    hard.apply(SamplesPolicy(hard_bytes_per_window=3 * one, hard_window_s=3600))
    outbox.flush().result(timeout=10)  # the model's activation event
    before = outbox.counters().produced_total
    for i in range(len(x)):
        digits.infer(InferRequest("digits", {"pixels": x[i : i + 1]}))
    uncertain = int(MARGIN.uncertain(uncertainty_scores("margin", v1_answers(digits, x), len(x))).sum())
    assert len(records(outbox)) == 3
    counts = digits.model("digits").hard.counter.snapshot()
    assert (counts.kept_total, counts.bytes, counts.over_budget) == (3, 3 * one, uncertain - 3)
    c = outbox.counters()
    # Left out, never produced: the ledger is untouched by them and balances.
    assert c.produced_total == before + 3
    assert c.produced_total == c.depth + c.quarantined + c.delivered_total + c.evicted_total + c.rejected_total


def test_the_policy_turns_it_on_off_and_changes_the_measure_live(
    digits: ModelRepository, hard: HardExamples, outbox: Outbox
) -> None:
    x = digits_holdout()[0][:64]
    hard.apply(SamplesPolicy())  # off: 0 bytes
    digits.infer(InferRequest("digits", {"pixels": x}))
    assert records(outbox) == []
    hard.apply(SamplesPolicy(hard_bytes_per_window=1 << 24, measure="top1", threshold=0.9))
    digits.infer(InferRequest("digits", {"pixels": x}))
    (record,) = records(outbox)
    kept = sampled(record)
    top1 = uncertainty_scores("top1", v1_answers(digits, x), 64)
    assert kept.measure == "top1" and len(tensor(kept.request, 0)) == int((top1 < 0.9).sum())
    hard.apply(ON)
    digits.infer(InferRequest("digits", {"pixels": x}))
    assert [sampled(r).measure for r in records(outbox)] == ["top1", "margin"]


def test_telemetry_and_the_metrics_page_count_them_per_version(digits: ModelRepository, hard: HardExamples) -> None:
    collector = TelemetryCollector("cam-1", digits)
    x = digits_holdout()[0][:64]
    digits.infer(InferRequest("digits", {"pixels": x}))
    served = digits.model("digits")
    size = served.hard.counter.snapshot().bytes
    hard.apply(SamplesPolicy(hard_bytes_per_window=size, hard_window_s=3600))
    digits.infer(InferRequest("digits", {"pixels": x}))  # the same rows again: past the window's budget now
    (m,) = collector.collect().models
    assert (m.hard_examples_kept, m.hard_examples_bytes, m.hard_examples_over_budget) == (1, size, 1)
    (m,) = collector.collect().models
    assert (m.hard_examples_kept, m.hard_examples_bytes, m.hard_examples_over_budget) == (0, 0, 0)  # a window

    samples = {
        (s.name, s.labels.get("reason", "")): s.value
        for family in text_string_to_metric_families(generate_latest(digits.metrics.registry).decode())
        for s in family.samples
        if s.labels.get("model") == "digits"
    }
    assert samples[("edgefleet_hard_examples_total", "uncertain")] == 1
    assert samples[("edgefleet_hard_examples_total", "disagreement")] == 0  # exported before the first
    assert samples[("edgefleet_hard_example_bytes_total", "")] == size
    assert samples[("edgefleet_hard_examples_over_budget_total", "")] == 1
    assert isinstance(digits.metrics, AgentMetrics)


def test_engine_threads_keep_concurrently_within_the_budget(digits: ModelRepository, hard: HardExamples) -> None:
    import threading

    x = digits_holdout()[0]
    one = one_row(digits)
    hard.apply(SamplesPolicy(hard_bytes_per_window=10 * one, hard_window_s=3600))
    digits.apply_policy(digits.model("digits").policy.__class__(instances=4, adaptive=False, max_batch_size=1))

    def app(start: int) -> None:
        for i in range(start, len(x), 4):
            digits.infer(InferRequest("digits", {"pixels": x[i : i + 1]}))

    threads = [threading.Thread(target=app, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    counts = digits.model("digits").hard.counter.snapshot()
    uncertain = int(MARGIN.uncertain(uncertainty_scores("margin", v1_answers(digits, x), len(x))).sum())
    assert counts.kept_total == 10 and counts.bytes == 10 * one == hard.budget.used
    assert counts.kept_total + counts.over_budget == uncertain
