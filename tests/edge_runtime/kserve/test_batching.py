"""The dynamic batcher seen through gRPC: batch-mates get their own answers, the queue bound sheds with
RESOURCE_EXHAUSTED, and a request whose deadline passes while queued never runs."""

from __future__ import annotations

import random
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort

from edge_runtime.inference.types import InferRequest, InferResponse
from edge_runtime.kserve.client import build_request, decode_response
from edgefleet.proto.inference import grpc_service_pb2 as pb
from tests.edge_runtime.kserve.conftest import Serve, digits_inputs
from tests.waiting import wait_for


def outcome(future: Future[Any]) -> Any:
    """The result, or the grpc.RpcError, of a finished call."""
    try:
        return future.result(60)
    except grpc.RpcError as error:
        return error


def malformed(i: int) -> pb.ModelInferRequest:
    """Four kinds of bad request, each of which validation must catch before it joins a batch."""
    pixels = digits_inputs(2)
    kind = i % 4
    if kind == 0:  # wrong shape
        return build_request("digits", {"pixels": pixels[:, :32].copy()}, request_id=f"bad-{i}")
    if kind == 1:  # wrong datatype
        return build_request("digits", {"pixels": pixels.astype(np.float64)}, request_id=f"bad-{i}")
    request = build_request("digits", {"pixels": pixels}, request_id=f"bad-{i}")
    if kind == 2:  # raw contents one value short
        request.raw_input_contents[0] = request.raw_input_contents[0][:-4]
    else:  # unknown requested output
        request.outputs.add(name="logits")
    return request


def test_concurrent_good_and_bad_requests_each_get_their_own_answer_in_shared_batches(
    serve: Serve, model_packages: dict[str, Path]
) -> None:
    served = serve(
        "digits:1",
        inference={"adaptive": False, "max_batch_size": 64, "max_queue_delay_ms": 20.0, "instances": 1},
    )
    session = ort.InferenceSession(str(model_packages["digits:1"] / "model.onnx"), providers=["CPUExecutionProvider"])
    rng = random.Random(7)
    requests: list[tuple[str, pb.ModelInferRequest, np.ndarray | None]] = []
    offset = 0
    for i in range(64):
        if i % 5 == 3:
            requests.append((f"bad-{i}", malformed(i), None))
            continue
        rows = rng.randint(1, 4)
        pixels = digits_inputs(rows, offset)
        offset += rows
        (expected,) = session.run(["probabilities"], {"pixels": pixels})  # each alone, unbatched
        requests.append((f"good-{i}", build_request("digits", {"pixels": pixels}, request_id=f"good-{i}"), expected))
    stub = served.stub()
    with ThreadPoolExecutor(len(requests)) as pool:
        futures = [pool.submit(stub.ModelInfer, request, timeout=30) for _, request, _ in requests]
        results = [outcome(f) for f in futures]

    good_rows = 0
    for (request_id, _, expected), result in zip(requests, results, strict=True):
        if expected is None:
            assert isinstance(result, grpc.RpcError), request_id
            assert result.code() == grpc.StatusCode.INVALID_ARGUMENT, (request_id, result.details())
            continue
        assert isinstance(result, pb.ModelInferResponse), (request_id, result)
        response = decode_response(result)
        assert response.id == request_id
        got = response.outputs["probabilities"]
        assert got.shape == expected.shape
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6, err_msg=request_id)
        good_rows += expected.shape[0]

    good = sum(1 for _, _, e in requests if e is not None)
    stats = served.stats("digits")
    assert stats.inference_count == good_rows
    assert stats.inference_stats.success.count == good
    sizes = {b.batch_size: b.compute_infer.count for b in stats.batch_stats}
    assert sum(sizes.values()) == stats.execution_count
    # Batched: fewer executions than good requests, and a batch larger than any one request (4 rows).
    assert stats.execution_count < good, sizes
    assert max(sizes) > 4, sizes


def mobilenet_input(rows: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, 3, 224, 224)).astype(np.float32)


SLOW = {"adaptive": False, "instances": 1, "max_batch_size": 32}


def start_blocker(served: Any, rows: int) -> Future[InferResponse]:
    """Occupy mobilenet's one engine worker with `rows` rows (hundreds of ms on a CPU); return once it runs.

    Submitted in-process so that the test knows when it left the queue: pending() is 0 only once a worker
    took it (it was queued before submit returned).
    """
    served_model, future = served.repo.submit(InferRequest("mobilenet-bench", {"input": mobilenet_input(rows)}))
    wait_for(lambda: served_model.batcher.pending() == 0, 10, "the blocker to start")
    assert not future.done()
    return future


def test_a_full_queue_sheds_with_resource_exhausted_and_the_rest_succeed(serve: Serve) -> None:
    served = serve("mobilenet-bench:1", inference={**SLOW, "max_queue_depth": 2})
    blocker = start_blocker(served, 32)
    stub = served.stub()
    flood = [
        build_request("mobilenet-bench", {"input": mobilenet_input(1, seed=i)}, request_id=f"r{i}") for i in range(10)
    ]
    with ThreadPoolExecutor(len(flood)) as pool:
        futures = [pool.submit(stub.ModelInfer, request, timeout=60) for request in flood]
        results = [outcome(f) for f in futures]  # every call ends: nothing hangs
    blocker.result(60)

    rejected = [r for r in results if isinstance(r, grpc.RpcError)]
    accepted = [r for r in results if isinstance(r, pb.ModelInferResponse)]
    assert len(rejected) + len(accepted) == len(flood)
    assert rejected, "a queue of depth 2 behind a busy worker took 10 requests"
    for error in rejected:
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
        assert "queue is full" in error.details() and "max_queue_depth" in error.details()
    assert len(accepted) >= 2  # the queue's two places
    for response in accepted:
        assert decode_response(response).outputs["logits"].shape == (1, 1000)
    stats = served.stats("mobilenet-bench")
    assert stats.inference_count == 32 + len(accepted)
    assert served.client().live()


def test_a_request_whose_deadline_passes_in_the_queue_gets_deadline_exceeded_and_never_runs(
    serve: Serve,
) -> None:
    served = serve("mobilenet-bench:1", inference=SLOW)
    batcher = served.repo.model("mobilenet-bench").batcher
    running = start_blocker(served, 32)
    # A second full batch queued behind the first: `late` waits behind both (0.5-1.3 s of CPU), so its deadline
    # passes in the queue with room to spare, yet is long enough for its 600 KB to reach the agent on a loaded box
    # (a 50 ms deadline once ran out before the agent ever saw the request, which then was, rightly, not counted).
    _, queued = served.repo.submit(InferRequest("mobilenet-bench", {"input": mobilenet_input(32, seed=1)}))
    assert batcher.pending() == 1
    stub = served.stub()
    late = build_request("mobilenet-bench", {"input": mobilenet_input(1, seed=2)}, request_id="late")
    call = stub.ModelInfer.future(late, timeout=0.3)
    wait_for(lambda: batcher.pending() == 2 or call.done(), 10, "the late request to be queued")
    assert batcher.pending() == 2, f"the late request ended before it was queued: {outcome(call)}"
    result = outcome(call)
    assert isinstance(result, grpc.RpcError), "the request behind two batches finished within its deadline"
    assert result.code() == grpc.StatusCode.DEADLINE_EXCEEDED, result.details()
    assert not queued.done(), "the batches ahead finished before the deadline: the test proves nothing"
    running.result(60)
    queued.result(60)
    # Queued behind where `late` was, at the same priority: had `late` been left in the queue, it would
    # have run before this one (or in its batch) and the counts below would include its row.
    after = stub.ModelInfer(build_request("mobilenet-bench", {"input": mobilenet_input(1)}), timeout=60)
    assert decode_response(after).outputs["logits"].shape == (1, 1000)

    stats = served.stats("mobilenet-bench")
    assert stats.inference_count == 32 + 32 + 1
    assert stats.inference_stats.fail.count == 1  # counted once as failed, not lost from the figures
    assert {b.batch_size: b.compute_infer.count for b in stats.batch_stats} == {32: 2, 1: 1}
    assert batcher.pending() == 0
