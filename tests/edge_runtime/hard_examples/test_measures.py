"""The uncertainty measures (pure): probabilities from logits, each measure's bounds and direction, the rule a
model declares in its manifest, and what the policy overrides."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from edge_runtime.errors import PackageError
from edge_runtime.inference.hard import (
    DEFAULT_THRESHOLDS,
    HardCounter,
    HardExamples,
    HardModel,
    UncertaintyRule,
    manifest_uncertainty,
    probabilities,
    uncertainty_scores,
)
from edgefleet.policy import SamplesPolicy

Array = np.ndarray[Any, Any]

finite = st.floats(-30, 30, allow_nan=False, width=32)


def logits(rows: int = 8, classes: int = 10) -> st.SearchStrategy[Array]:
    return arrays(np.float32, (rows, classes), elements=finite)


def softmax(x: Array) -> Array:
    e = np.exp(x.astype(np.float64) - x.max(axis=-1, keepdims=True))
    out: Array = e / e.sum(axis=-1, keepdims=True)
    return out


def expected_probabilities(x: Array) -> Array:
    """A row that already reads as probabilities (none negative, summing to 1 within 1e-3) stays as it is."""
    looks_like_probabilities = (x.min(1) >= 0) & (np.abs(x.sum(1) - 1) <= 1e-3)
    return np.where(looks_like_probabilities[:, None], x, softmax(x))


@given(logits())
def test_logits_become_probabilities_that_sum_to_one(x: Array) -> None:
    p = probabilities(x)
    assert p.shape == x.shape and p.dtype == np.float32
    assert np.all(p >= 0) and np.allclose(p.sum(axis=1), 1, atol=1e-3)
    np.testing.assert_allclose(p, expected_probabilities(x), atol=1e-5)


@given(logits())
def test_probabilities_pass_unchanged_and_scores_do_not_change_when_logits_shift(x: Array) -> None:
    p = softmax(x).astype(np.float32)
    np.testing.assert_array_equal(probabilities(p), p)
    # Negative rows are logits for sure (a row of [1, 0, ...] is read as probabilities: the heuristic's limit).
    negative = x - np.float32(40)
    for measure in ("margin", "top1", "entropy"):
        np.testing.assert_allclose(
            uncertainty_scores(measure, negative, 8),
            uncertainty_scores(measure, negative + np.float32(3.5), 8),
            atol=1e-4,
        )


@settings(max_examples=200)
@given(st.integers(1, 16), st.integers(2, 40), st.data())
def test_every_score_is_within_0_and_1_with_its_known_bounds(rows: int, k: int, data: st.DataObject) -> None:
    x = data.draw(logits(rows, k))
    top1 = uncertainty_scores("top1", x, len(x))
    margin = uncertainty_scores("margin", x, len(x))
    entropy = uncertainty_scores("entropy", x, len(x))
    assert np.all(top1 >= 1 / k - 1e-6) and np.all(top1 <= 1 + 1e-6)
    assert np.all(margin >= -1e-6) and np.all(margin <= top1 + 1e-6)
    assert np.all(entropy >= -1e-6) and np.all(entropy <= 1 + 1e-6)
    p = expected_probabilities(x)
    expected = -(p * np.log(np.where(p > 0, p, 1))).sum(1) / math.log(k)
    np.testing.assert_allclose(entropy, expected, atol=1e-4)


@given(st.integers(3, 50))
def test_a_certain_row_and_a_uniform_row_are_the_two_extremes(k: int) -> None:
    certain, uniform = np.eye(1, k, dtype=np.float32), np.full((1, k), 1 / k, np.float32)
    rows = np.concatenate([certain, uniform])
    np.testing.assert_allclose(uncertainty_scores("top1", rows, 2), [1, 1 / k], atol=1e-6)
    np.testing.assert_allclose(uncertainty_scores("margin", rows, 2), [1, 0], atol=1e-6)
    np.testing.assert_allclose(uncertainty_scores("entropy", rows, 2), [0, 1], atol=1e-5)
    for measure in ("top1", "margin", "entropy"):
        mask = UncertaintyRule(measure, DEFAULT_THRESHOLDS[measure]).uncertain(uncertainty_scores(measure, rows, 2))
        assert mask.tolist() == [False, True], measure


def test_a_row_of_several_predictions_scores_its_most_uncertain_one() -> None:
    # Two rows of three positions each (rows x positions x classes): row 1 has one uniform position.
    out = np.zeros((2, 3, 4), np.float32)
    out[..., 0] = 1
    out[1, 2] = 0.25
    assert uncertainty_scores("margin", out, 2).tolist() == [1.0, 0.0]
    assert uncertainty_scores("entropy", out, 2).tolist() == pytest.approx([0.0, 1.0])


def test_a_nan_answer_is_uncertain_and_the_record_says_nan() -> None:
    rows = np.array([[np.nan, 0.5, 0.5], [0.9, 0.05, 0.05]], np.float32)
    for measure in ("top1", "margin", "entropy"):
        rule = UncertaintyRule(measure, DEFAULT_THRESHOLDS[measure])
        scores = uncertainty_scores(measure, rows, 2)
        assert rule.uncertain(scores).tolist() == [True, False], measure
        assert math.isnan(rule.most_uncertain(scores))


# -- the manifest's rule and the policy's -------------------------------------------------------------------------


def test_a_manifest_declares_its_measure_and_threshold() -> None:
    rule = manifest_uncertainty({"uncertainty": {"measure": "entropy", "threshold": 0.7}}, "p", "m:1")
    assert rule == UncertaintyRule("entropy", 0.7)
    assert manifest_uncertainty({"uncertainty": {"measure": "top1"}}, "p", "m:1") == UncertaintyRule("top1", 0.5)
    assert manifest_uncertainty({}, "p", "m:1") is None
    assert manifest_uncertainty({}, None, "m:1") is None  # not a classifier, and it declares nothing: fine


@pytest.mark.parametrize(
    ("value", "error"),
    [
        ("margin", "extra.uncertainty must be an object"),
        ({"threshold": 0.2}, "extra.uncertainty must be an object"),
        ({"measure": "margin", "limit": 0.2}, "extra.uncertainty must be an object"),
        ({"measure": "gini"}, "extra.uncertainty.measure must be one of margin, top1, entropy, not 'gini'"),
        ({"measure": "margin", "threshold": 1.5}, "extra.uncertainty.threshold must be a number within 0..1"),
        ({"measure": "margin", "threshold": -0.1}, "extra.uncertainty.threshold must be a number within 0..1"),
        ({"measure": "margin", "threshold": float("nan")}, "extra.uncertainty.threshold must be a number"),
        ({"measure": "margin", "threshold": True}, "extra.uncertainty.threshold must be a number"),
        ({"measure": "margin", "threshold": "0.2"}, "extra.uncertainty.threshold must be a number"),
    ],
)
def test_a_bad_manifest_rule_is_refused_naming_the_key(value: Any, error: str) -> None:
    with pytest.raises(PackageError, match=r"^m:1: " + error.replace("(", r"\(").replace(".", r"\.")):
        manifest_uncertainty({"uncertainty": value}, "p", "m:1")


def test_a_model_that_is_not_a_classifier_cannot_declare_a_measure() -> None:
    with pytest.raises(PackageError, match="the model is not a classifier"):
        manifest_uncertainty({"uncertainty": {"measure": "margin"}}, None, "m:1")


def model(declared: UncertaintyRule | None, classes: str | None = "p") -> HardModel:
    return HardModel("m", 1, "onnxruntime/CPUExecutionProvider", "fp32", True, classes, declared, HardCounter())


class _Sink:
    def append(self, record: Any) -> Any:
        raise AssertionError("nothing is appended here")


def test_the_policy_overrides_the_manifest_and_margin_is_the_default() -> None:
    hard = HardExamples(_Sink(), SamplesPolicy(hard_bytes_per_window=1000))
    declared = UncertaintyRule("entropy", 0.7)
    assert hard.rule_for(model(declared)) == declared
    assert hard.rule_for(model(None)) == UncertaintyRule("margin", 0.2)
    assert hard.rule_for(model(declared, classes=None)) is None  # not a classifier: disagreements only
    hard.apply(SamplesPolicy(hard_bytes_per_window=1000, measure="top1"))
    assert hard.rule_for(model(declared)) == UncertaintyRule("top1", 0.5)
    hard.apply(SamplesPolicy(hard_bytes_per_window=1000, measure="entropy"))
    assert hard.rule_for(model(declared)) == declared  # the same measure: the model's own threshold
    hard.apply(SamplesPolicy(hard_bytes_per_window=1000, measure="entropy", threshold=0.9))
    assert hard.rule_for(model(declared)) == UncertaintyRule("entropy", 0.9)


def test_off_by_default_nothing_is_judged() -> None:
    hard = HardExamples(_Sink())
    assert not hard.enabled
    out = {"p": np.full((4, 10), 0.1, np.float32)}
    assert hard.uncertain_rows(model(None), out) is None
    assert hard.judge(model(None), {"x": np.zeros((4, 2), np.float32)}, out, "r") is None
    assert not HardExamples(None, SamplesPolicy(hard_bytes_per_window=1000)).enabled  # no outbox: off


@settings(max_examples=300)
@given(st.integers(1, 8), st.integers(1, 30), st.data(), st.sampled_from(["margin", "top1", "entropy"]))
def test_small_answers_scored_in_python_match_numpy(rows: int, k: int, data: st.DataObject, measure: str) -> None:
    from edge_runtime.inference.hard import _scores_numpy, _scores_python

    x = data.draw(logits(rows, k))
    if data.draw(st.booleans()):
        x = expected_probabilities(x).astype(np.float32)  # already probabilities
    np.testing.assert_allclose(_scores_python(measure, x.tolist()), _scores_numpy(measure, x, rows), atol=1e-5)
