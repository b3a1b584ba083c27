"""Every zoo model as a user brings it: `edge-agent package`, `edge-agent install`, then served over a real
KServe gRPC channel with the answers a bare onnxruntime session gives, one at a time and concurrently."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from edge_runtime.agent.cli import main
from edge_runtime.kserve.client import build_request, decode_response
from tests.edge_runtime.kserve.conftest import Serve, Served
from tests.models.zoo import CASES, ZooCase
from tests.processes import toml_text

Install = Callable[..., Served]


@pytest.fixture
def installed(serve: Serve, zoo_packages: dict[str, Path], config_data: dict[str, Any], tmp_path: Path) -> Install:
    """installed(name, **sections): `edge-agent install` the zoo package, then a server over that data dir."""

    def start(name: str, **sections: dict[str, Any]) -> Served:
        config = tmp_path / "agent.toml"
        config.write_text(toml_text({"agent": config_data["agent"], "engine": config_data["engine"]}))
        assert main(["install", str(zoo_packages[name]), "--config", str(config)]) == 0
        served = serve(**sections)
        (status,) = served.repo.load_active()
        assert status.active and status.state.value == "READY", status.reason
        return served

    return start


def reference(package: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(package / "model.onnx"), providers=["CPUExecutionProvider"])


def assert_same(got: dict[str, np.ndarray], expected: dict[str, np.ndarray], what: str) -> None:
    assert sorted(got) == sorted(expected), what
    for name, want in expected.items():
        assert got[name].dtype == want.dtype and got[name].shape == want.shape, (what, name)
        if want.dtype.kind == "f":
            # A batch of several requests may run other kernels than one alone: equal up to float rounding.
            np.testing.assert_allclose(got[name], want, rtol=1e-5, atol=1e-6, err_msg=f"{what}: {name}")
        else:
            np.testing.assert_array_equal(got[name], want, err_msg=f"{what}: {name}")


def expected_answer(session: ort.InferenceSession, case: ZooCase, inputs: dict[str, np.ndarray]) -> dict[str, Any]:
    return dict(zip(case.outputs, session.run(list(case.outputs), inputs), strict=True))


@pytest.mark.parametrize("name", list(CASES))
def test_a_zoo_model_serves_what_onnxruntime_answers(
    installed: Install, zoo_packages: dict[str, Path], name: str
) -> None:
    case = CASES[name]
    served = installed(name)
    client = served.client()
    assert client.ready() and client.model_ready(name)
    meta = client.model_metadata(name)
    manifest = served.repo.model(name).manifest
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [
        (t.name, t.datatype, list(t.shape)) for t in manifest.inputs
    ]
    assert [t.name for t in meta.outputs] == list(case.outputs)  # a ZipMap beside them is left out
    session = reference(zoo_packages[name])
    for i in range(6):  # sizes vary with i: image sizes, sequence lengths, time steps, batch rows
        inputs = case.request(i)
        response = client.infer(name, inputs, request_id=f"{name}-{i}")
        assert response.id == f"{name}-{i}"
        assert_same(response.outputs, expected_answer(session, case, inputs), f"{name} request {i}")


@pytest.mark.parametrize("name", list(CASES))
def test_concurrent_requests_each_get_their_own_answer(
    installed: Install, zoo_packages: dict[str, Path], name: str
) -> None:
    case = CASES[name]
    # 24 threads must reach the queue within one delay for batches to form: 20 ms was once too short for 3 test
    # processes on 2 cores (24 executions of 24 requests); a batch waits at most this long, here only.
    served = installed(name, inference={"adaptive": False, "max_batch_size": 8, "max_queue_delay_ms": 250.0})
    session = reference(zoo_packages[name])
    requests = [case.request(i) for i in range(24)]
    stub = served.stub()
    with ThreadPoolExecutor(len(requests)) as pool:
        futures = [
            pool.submit(stub.ModelInfer, build_request(name, inputs, request_id=str(i)), timeout=60)
            for i, inputs in enumerate(requests)
        ]
        responses = [decode_response(f.result(60)) for f in futures]
    for i, (inputs, response) in enumerate(zip(requests, responses, strict=True)):
        assert response.id == str(i)
        assert_same(response.outputs, expected_answer(session, case, inputs), f"{name} request {i}")
    stats = served.stats(name)
    assert stats.inference_stats.success.count == len(requests)
    sizes = {b.batch_size: b.compute_infer.count for b in stats.batch_stats}
    if case.batched:
        assert stats.execution_count < len(requests), sizes  # requests were merged, and still answered apart
    else:
        # Axis 0 is not a batch axis (time, a CTC sequence, a recurrent state): one request per run, always.
        assert sizes == {1: len(requests)}, sizes


def test_a_model_whose_axis_0_is_time_never_mixes_requests(installed: Install) -> None:
    served = installed("timeline", inference={"adaptive": False, "max_batch_size": 32, "max_queue_delay_ms": 50.0})
    # Same length, so a batcher that ignored the manifest could concatenate them; each running sum must
    # still start from its own first frame.
    frames = [np.full((5, 4), float(i + 1), dtype=np.float32) for i in range(12)]
    stub = served.stub()
    with ThreadPoolExecutor(len(frames)) as pool:
        futures = [pool.submit(stub.ModelInfer, build_request("timeline", {"frames": f}), timeout=60) for f in frames]
        answers = [decode_response(f.result(60)).outputs["running"] for f in futures]
    for f, running in zip(frames, answers, strict=True):
        np.testing.assert_array_equal(running, np.cumsum(f, axis=0))
    assert served.stats("timeline").execution_count == len(frames)


def test_a_scalar_input_travels_as_raw_and_as_typed_contents(installed: Install, zoo_packages: dict[str, Path]) -> None:
    from edgefleet.proto.inference import grpc_service_pb2 as pb

    served = installed("vad")
    inputs = CASES["vad"].request(0)
    expected = expected_answer(reference(zoo_packages["vad"]), CASES["vad"], inputs)
    request = pb.ModelInferRequest(model_name="vad")
    request.inputs.add(name="input", datatype="FP32", shape=[1, 512]).contents.fp32_contents.extend(
        inputs["input"].ravel().tolist()
    )
    request.inputs.add(name="sr", datatype="INT64", shape=[]).contents.int64_contents.append(int(inputs["sr"]))
    request.inputs.add(name="state", datatype="FP32", shape=[2, 1, 128]).contents.fp32_contents.extend(
        inputs["state"].ravel().tolist()
    )
    assert_same(decode_response(served.stub().ModelInfer(request, timeout=10)).outputs, expected, "typed contents")
    bad = build_request("vad", {**inputs, "sr": np.array([16000], np.int64)})
    with pytest.raises(grpc.RpcError) as info:
        served.stub().ModelInfer(bad, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "input 'sr' has shape [1], the model expects rank 0" in info.value.details()
