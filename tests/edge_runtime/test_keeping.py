"""Keeping results: what goes to the outbox, answered once durable, a refusal reported (with why), not hidden.

The repository also keeps model events (model.activated...) in the outbox; these tests look at results only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import pytest

from edge_runtime import InferRequest, ModelRepository
from edge_runtime.config import AgentConfig
from edge_runtime.inference.keeping import (
    KEEP_ASYNC_PARAMETER,
    KEEP_ERROR_PARAMETER,
    KEPT_PARAMETER,
    NONE,
    RESULT,
    SAMPLE,
    Keeper,
    keep_decision,
)
from edge_runtime.kserve.codec import KEEP_PARAMETER
from edge_runtime.outbox import DeferredPayload, Outbox, OutboxRecord
from edgefleet.proto.edgefleet.v1 import results_pb2
from edgefleet.proto.inference import grpc_service_pb2
from models.build import digits_holdout


def test_the_keep_decision() -> None:
    assert keep_decision({KEEP_PARAMETER: True}, 0.0, 0.99) == RESULT
    assert keep_decision({KEEP_PARAMETER: "yes"}, 0.0, 0.5) == NONE  # a bool parameter, not any value
    assert keep_decision({}, 0.1, 0.05) == SAMPLE
    assert keep_decision({}, 0.1, 0.5) == NONE


def kept(outbox: Outbox) -> list[results_pb2.ResultRecord]:
    """The results and samples in the outbox (not the repository's model events), read now."""
    batch = outbox.read_batch(100, 1 << 24)
    return [r for r in batch.records if r.kind != results_pb2.RECORD_KIND_EVENT]


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
    (record,) = kept(outbox)  # committed before infer returned
    assert (record.model, record.version, record.kind, record.request_id) == ("digits", 1, RESULT, "r-1")
    message = grpc_service_pb2.ModelInferResponse.FromString(record.payload)
    probabilities = np.frombuffer(message.raw_output_contents[0], np.float32)
    np.testing.assert_array_equal(probabilities, response.outputs["probabilities"].ravel())


def test_results_not_asked_for_are_not_kept(repo: ModelRepository, outbox: Outbox) -> None:
    response = repo.infer(InferRequest("digits", {"pixels": digits_holdout()[0][:1]}))
    assert KEPT_PARAMETER not in response.parameters
    outbox.flush().result(timeout=10)
    assert kept(outbox) == []


def test_async_keeping_answers_at_once(repo: ModelRepository, outbox: Outbox) -> None:
    params = {KEEP_PARAMETER: True, KEEP_ASYNC_PARAMETER: True}
    response = repo.infer(InferRequest("digits", {"pixels": digits_holdout()[0][:1]}, parameters=params))
    assert response.parameters[KEPT_PARAMETER] is True
    outbox.flush().result(timeout=10)
    assert len(kept(outbox)) == 1


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
    (record,) = kept(outbox)
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


class _Sink:
    """Takes what the keeper appends (to look at the record itself; the outbox's queue is tested with the outbox)."""

    def __init__(self) -> None:
        self.records: list[OutboxRecord] = []

    def append(self, record: OutboxRecord) -> Future[int]:
        self.records.append(record)
        done: Future[int] = Future()
        done.set_result(len(self.records))
        return done


def test_a_deferred_payload_declares_the_bytes_of_the_arrays_it_holds(
    make_config: Callable[..., AgentConfig], model_packages: dict[str, Path]
) -> None:
    """The outside report: closures counted 0 bytes against the outbox queue's byte bound."""
    sink = _Sink()
    repo = ModelRepository(make_config(), keeper=Keeper(sink, sample_rate=1.0))
    try:
        repo.install(model_packages["digits:1"])
        x = digits_holdout()[0][:8]
        response = repo.infer(InferRequest("digits", {"pixels": x}, parameters={KEEP_PARAMETER: True}))
    finally:
        repo.close()
    [record] = [r for r in sink.records if r.kind != results_pb2.RECORD_KIND_EVENT]
    assert type(record.payload) is DeferredPayload
    held = x.nbytes + response.outputs["probabilities"].nbytes
    assert record.payload.size >= response.outputs["probabilities"].nbytes
    assert len(record.payload.encode()) <= record.payload.size  # an estimate that does not understate it
    sampled = Keeper(sink, 1.0)
    sampled.keep(SAMPLE, response, 1, {"pixels": x}, {})
    assert type(sink.records[-1].payload) is DeferredPayload
    assert (
        held <= sink.records[-1].payload.size
        and len(sink.records[-1].payload.encode()) <= sink.records[-1].payload.size
    )


@pytest.fixture
def small_outbox(tmp_path: Path) -> Iterator[Outbox]:
    """An outbox whose per-record limit a digits result exceeds (its payload is a few hundred bytes)."""
    box = Outbox.open(tmp_path / "small.db", max_bytes=1 << 24, max_age_s=0, max_record_bytes=100)
    yield box
    box.close()


def test_a_result_past_the_per_record_limit_is_not_kept_and_the_answer_says_why(
    make_config: Callable[..., AgentConfig], model_packages: dict[str, Path], small_outbox: Outbox
) -> None:
    keeper = Keeper(small_outbox, 0.0)
    repo = ModelRepository(make_config(upload={"sample_rate": 0.0}), keeper=keeper)
    try:
        repo.install(model_packages["digits:1"])
        x = digits_holdout()[0][:1]
        response = repo.infer(InferRequest("digits", {"pixels": x}, parameters={KEEP_PARAMETER: True}))
        assert response.parameters[KEPT_PARAMETER] is False
        assert (
            "past the limit of 100 bytes per record that cloud-sync accepts"
            in response.parameters[KEEP_ERROR_PARAMETER]
        )
        assert response.outputs["probabilities"].shape == (1, 10)  # the answer itself still comes
        params = {KEEP_PARAMETER: True, KEEP_ASYNC_PARAMETER: True}
        answered_at_once = repo.infer(InferRequest("digits", {"pixels": x}, parameters=params))
        assert answered_at_once.parameters[KEPT_PARAMETER] is False
        # Not waiting for the commit does not mean not saying why the outbox refused it at once.
        assert "per record that cloud-sync accepts" in answered_at_once.parameters[KEEP_ERROR_PARAMETER]
    finally:
        repo.close()
    assert keeper.dropped == 2
    small_outbox.flush().result(timeout=10)
    assert kept(small_outbox) == []
