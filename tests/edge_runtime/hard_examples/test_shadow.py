"""Shadow disagreements as hard examples: digits v2 answers, the bad v3 shadows it (its labels shifted); the
rows where v3 disagrees are kept with both answers, once, and not when the policy says no."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from edge_runtime import InferRequest, ModelRepository
from edge_runtime.inference.hard import HardExamples, UncertaintyRule, uncertainty_scores
from edge_runtime.outbox import Outbox
from edgefleet.policy import SamplesPolicy
from models.build import digits_holdout
from tests.edge_runtime.hard_examples.conftest import records, sampled, tensor
from tests.waiting import wait_for

# top1 below 0.001 never happens for 10 classes: with this rule only disagreements are kept.
NO_UNCERTAINTY = SamplesPolicy(hard_bytes_per_window=1 << 24, measure="top1", threshold=0.001)


def shadowed(make_repo: Callable[..., ModelRepository], packages: dict[str, Path], active: int) -> ModelRepository:
    repo = make_repo()
    repo.install(packages[f"digits:{active}"])
    repo.install(packages["digits:3"], activate=False)
    repo.prepare("digits", 3)
    repo.set_shadow("digits", 3, 1.0)
    return repo


def compared(repo: ModelRepository, rows: int) -> None:
    def done() -> bool:
        (_, counts), *_ = repo.shadow_counts().values()
        return counts.compared + counts.failed >= rows

    wait_for(done, 20, f"{rows} rows compared")


def answers(repo: ModelRepository, version: int, x: np.ndarray) -> np.ndarray:
    return repo.model("digits", str(version)).engine.run({"pixels": x})["probabilities"]


def test_the_disagreeing_rows_are_kept_with_both_answers(
    make_repo: Callable[..., ModelRepository], model_packages: dict[str, Path], hard: HardExamples, outbox: Outbox
) -> None:
    hard.apply(NO_UNCERTAINTY)
    repo = shadowed(make_repo, model_packages, active=2)
    x = digits_holdout()[0][:40]
    for i in range(0, 40, 4):  # requests of 4 rows, gathered into shadow runs of up to 16
        repo.infer(InferRequest("digits", {"pixels": x[i : i + 4]}, id=f"r-{i // 4}"))
    compared(repo, 40)
    v2, v3 = answers(repo, 2, x), answers(repo, 3, x)
    differ = v2.argmax(1) != v3.argmax(1)
    assert differ.sum() > 20  # v3 is the bad candidate
    kept = records(outbox)
    by_request = {r.request_id: r for r in kept}
    for k in range(10):
        rows = np.flatnonzero(differ[4 * k : 4 * k + 4]) + 4 * k
        record = by_request.get(f"r-{k}")
        if rows.size == 0:
            assert record is None
            continue
        assert record is not None and (record.model, record.version) == ("digits", 2)
        message = sampled(record)
        assert (message.reason, message.measure, message.shadow_version) == (
            "disagreement",
            "top-1 of probabilities",
            3,
        )
        np.testing.assert_array_equal(tensor(message.request, 0), x[rows])
        np.testing.assert_allclose(tensor(message.response, 0), v2[rows], rtol=1e-5)
        np.testing.assert_allclose(tensor(message.shadow_response, 0), v3[rows], rtol=1e-5)
        assert message.score == pytest.approx(float(np.abs(v2[rows] - v3[rows]).max()), rel=1e-4)
    assert len(kept) == sum(1 for k in range(10) if differ[4 * k : 4 * k + 4].any())
    # Counted on the ACTIVE version, whose answer the records carry.
    assert repo.model("digits", "2").hard.counter.snapshot().kept == {"disagreement": len(kept)}
    assert repo.model("digits", "3").hard.counter.snapshot().kept_total == 0


def test_a_row_kept_as_uncertain_is_not_kept_again_as_a_disagreement(
    make_repo: Callable[..., ModelRepository], model_packages: dict[str, Path], outbox: Outbox
) -> None:
    repo = shadowed(make_repo, model_packages, active=1)  # v1 is unsure of some rows; margin < 0.2
    x = digits_holdout()[0][:64]
    repo.infer(InferRequest("digits", {"pixels": x}, id="b"))
    compared(repo, 64)
    v1, v3 = answers(repo, 1, x), answers(repo, 3, x)
    uncertain = UncertaintyRule("margin", 0.2).uncertain(uncertainty_scores("margin", v1, 64))
    differ = v1.argmax(1) != v3.argmax(1)
    assert (uncertain & differ).any()  # the overlap this test is about
    reasons = {sampled(r).reason: sampled(r) for r in records(outbox)}
    assert set(reasons) == {"uncertain", "disagreement"}
    np.testing.assert_array_equal(tensor(reasons["uncertain"].request, 0), x[uncertain])
    np.testing.assert_array_equal(tensor(reasons["disagreement"].request, 0), x[differ & ~uncertain])


def test_disagreements_are_not_kept_when_the_policy_says_so(
    make_repo: Callable[..., ModelRepository], model_packages: dict[str, Path], hard: HardExamples, outbox: Outbox
) -> None:
    hard.apply(SamplesPolicy(hard_bytes_per_window=1 << 24, measure="top1", threshold=0.001, keep_disagreements=False))
    repo = shadowed(make_repo, model_packages, active=2)
    repo.infer(InferRequest("digits", {"pixels": digits_holdout()[0][:32]}))
    compared(repo, 32)
    (_, counts), *_ = repo.shadow_counts().values()
    assert counts.agreed < counts.compared  # they disagreed, and nothing was kept
    assert records(outbox) == []


def test_a_request_kept_as_a_sample_is_not_kept_again_as_a_disagreement(
    make_repo: Callable[..., ModelRepository], model_packages: dict[str, Path], hard: HardExamples, outbox: Outbox
) -> None:
    hard.apply(NO_UNCERTAINTY)
    repo = make_repo(sample_rate=1.0)
    repo.install(model_packages["digits:2"])
    repo.install(model_packages["digits:3"], activate=False)
    repo.prepare("digits", 3)
    repo.set_shadow("digits", 3, 1.0)
    _, future = repo.submit(InferRequest("digits", {"pixels": digits_holdout()[0][:16]}))
    future.result(10)
    compared(repo, 16)
    assert [sampled(r).reason for r in records(outbox)] == [""]  # the random sample only
