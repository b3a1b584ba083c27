"""Keeping results: what goes to the outbox, answered once durable, and a refusal reported, not hidden."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from edge_runtime import InferRequest, ModelRepository
from edge_runtime.config import AgentConfig
from edge_runtime.inference.keeping import (
    KEEP_ASYNC_PARAMETER,
    KEPT_PARAMETER,
    NONE,
    RESULT,
    SAMPLE,
    Keeper,
    keep_decision,
)
from edge_runtime.kserve.codec import KEEP_PARAMETER
from edge_runtime.outbox import Outbox
from edgefleet.proto.edgefleet.v1 import results_pb2
from edgefleet.proto.inference import grpc_service_pb2
from models.build import digits_holdout


def test_the_keep_decision() -> None:
    assert keep_decision({KEEP_PARAMETER: True}, 0.0, 0.99) == RESULT
    assert keep_decision({KEEP_PARAMETER: "yes"}, 0.0, 0.5) == NONE  # a bool parameter, not any value
    assert keep_decision({}, 0.1, 0.05) == SAMPLE
    assert keep_decision({}, 0.1, 0.5) == NONE


@pytest.fixture
def outbox(tmp_path: Path) -> Iterator[Outbox]:
    box = Outbox.open(tmp_path / "outbox.db", max_bytes=1 << 24, max_age_s=0)
    yield box
    box.close()


@pytest.fixture
def repo(
    make_config: Callable[..., AgentConfig], model_packages: dict[str, Path], outbox: Outbox
) -> Iterator[ModelRepository]:
    repository = ModelRepository(make_config(upload={"sample_rate": 0.0}), keeper=Keeper(outbox, 0.0))
    repository.install(model_packages["digits:1"])
    yield repository
    repository.close()


def test_a_kept_result_is_in_the_outbox_when_the_answer_comes(repo: ModelRepository, outbox: Outbox) -> None:
    x = digits_holdout()[0][:1]
    response = repo.infer(InferRequest("digits", {"pixels": x}, id="r-1", parameters={KEEP_PARAMETER: True}))
    assert response.parameters[KEPT_PARAMETER] is True
    assert outbox.counters().produced_total == 1  # committed before infer returned
    batch = outbox.read_batch(10, 1 << 20)
    (record,) = batch.records
    assert (record.model, record.version, record.kind, record.request_id) == ("digits", 1, RESULT, "r-1")
    kept = grpc_service_pb2.ModelInferResponse.FromString(record.payload)
    probabilities = np.frombuffer(kept.raw_output_contents[0], np.float32)
    np.testing.assert_array_equal(probabilities, response.outputs["probabilities"].ravel())


def test_results_not_asked_for_are_not_kept(repo: ModelRepository, outbox: Outbox) -> None:
    response = repo.infer(InferRequest("digits", {"pixels": digits_holdout()[0][:1]}))
    assert KEPT_PARAMETER not in response.parameters
    outbox.flush().result(timeout=10)
    assert outbox.counters().produced_total == 0


def test_async_keeping_answers_at_once(repo: ModelRepository, outbox: Outbox) -> None:
    params = {KEEP_PARAMETER: True, KEEP_ASYNC_PARAMETER: True}
    response = repo.infer(InferRequest("digits", {"pixels": digits_holdout()[0][:1]}, parameters=params))
    assert response.parameters[KEPT_PARAMETER] is True
    outbox.flush().result(timeout=10)
    assert outbox.counters().produced_total == 1


def test_a_sampled_request_keeps_its_inputs_too(
    make_config: Callable[..., AgentConfig], model_packages: dict[str, Path], outbox: Outbox
) -> None:
    repo = ModelRepository(make_config(), keeper=Keeper(outbox, sample_rate=1.0))
    try:
        repo.install(model_packages["digits:1"])
        x = digits_holdout()[0][:2]
        response = repo.infer(InferRequest("digits", {"pixels": x}))
        assert KEPT_PARAMETER not in response.parameters  # sampling is the agent's business
    finally:
        repo.close()
    outbox.flush().result(timeout=10)
    (record,) = outbox.read_batch(10, 1 << 20).records
    assert record.kind == SAMPLE and record.payload_type == "edgefleet.v1.SampledInference"
    sample = results_pb2.SampledInference.FromString(record.payload)
    np.testing.assert_array_equal(np.frombuffer(sample.request.raw_input_contents[0], np.float32).reshape(2, 64), x)


def test_a_refused_keep_is_reported_in_the_answer(repo: ModelRepository, outbox: Outbox) -> None:
    outbox.close()  # appends now raise ShuttingDown
    response = repo.infer(
        InferRequest("digits", {"pixels": digits_holdout()[0][:1]}, parameters={KEEP_PARAMETER: True})
    )
    assert response.parameters[KEPT_PARAMETER] is False
    assert "edgefleet.keep_error" in response.parameters
    assert response.outputs["probabilities"].shape == (1, 10)  # the answer itself still comes
