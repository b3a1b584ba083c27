"""Fixtures of the hard-example tests: a real outbox, and a repository serving digits with hard examples on."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_runtime import ModelRepository
from edge_runtime.config import AgentConfig
from edge_runtime.inference.hard import HardExamples
from edge_runtime.inference.keeping import Keeper
from edge_runtime.outbox import Outbox
from edgefleet.policy import SamplesPolicy
from edgefleet.proto.edgefleet.v1 import results_pb2
from edgefleet.proto.inference import grpc_service_pb2

Array = np.ndarray[Any, Any]
ON = SamplesPolicy(hard_bytes_per_window=1 << 24)


@pytest.fixture
def outbox(tmp_path: Path) -> Iterator[Outbox]:
    box = Outbox.open(tmp_path / "outbox.db", max_bytes=1 << 26, max_age_s=0)
    yield box
    box.close()


@pytest.fixture
def hard(outbox: Outbox) -> HardExamples:
    return HardExamples(outbox, ON)


@pytest.fixture
def make_repo(
    make_config: Callable[..., AgentConfig], outbox: Outbox, hard: HardExamples
) -> Iterator[Callable[..., ModelRepository]]:
    made: list[ModelRepository] = []

    def make(sample_rate: float = 0.0, **sections: Any) -> ModelRepository:
        config = make_config(upload={"sample_rate": sample_rate}, **sections)
        repo = ModelRepository(config, keeper=Keeper(outbox, sample_rate), hard=hard)
        made.append(repo)
        return repo

    yield make
    for repo in made:
        repo.close(timeout=5)


def records(outbox: Outbox) -> list[results_pb2.ResultRecord]:
    """Every record but the model events, once what was appended is committed."""
    outbox.flush().result(timeout=10)
    batch = outbox.read_batch(100_000, 1 << 28)
    return [r for r in batch.records if r.kind != results_pb2.RECORD_KIND_EVENT]


def sampled(record: results_pb2.ResultRecord) -> results_pb2.SampledInference:
    assert record.kind == results_pb2.RECORD_KIND_SAMPLED_INPUT
    assert record.payload_type == "edgefleet.v1.SampledInference"
    return results_pb2.SampledInference.FromString(record.payload)


def tensor(message: grpc_service_pb2.ModelInferRequest | grpc_service_pb2.ModelInferResponse, i: int) -> Array:
    """The i-th raw tensor of a request or response, float32, in its declared shape."""
    if isinstance(message, grpc_service_pb2.ModelInferRequest):
        raw, shape = message.raw_input_contents[i], message.inputs[i].shape
    else:
        raw, shape = message.raw_output_contents[i], message.outputs[i].shape
    return np.frombuffer(raw, np.float32).reshape(tuple(shape))
