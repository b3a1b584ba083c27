"""The KServe v2 servicer through a real gRPC server: health, metadata, inference paths and statistics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from edge_runtime.inference.types import InferRequest
from edge_runtime.kserve.client import build_request, decode_response
from edge_runtime.kserve.servicer import SERVER_NAME
from edgefleet.proto.inference import grpc_service_pb2 as pb
from tests.edge_runtime.kserve.conftest import SERVER_VERSION, Serve, digits_inputs


def onnx_answer(package: Path, pixels: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(package / "model.onnx"), providers=["CPUExecutionProvider"])
    (probabilities,) = session.run(["probabilities"], {"pixels": pixels})
    return probabilities


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_live_ready_and_model_ready_on_both_transports(serve: Serve, transport: str) -> None:
    served = serve("digits:1")
    client = served.client(served.unix if transport == "unix" else served.tcp)
    assert client.live()
    assert client.ready()
    assert client.model_ready("digits")
    assert client.model_ready("digits", "1")
    assert not client.model_ready("digits", "2")
    assert not client.model_ready("nope")
    assert not client.model_ready("nope", "1")


def test_server_metadata_names_the_server_and_its_extensions(serve: Serve) -> None:
    meta = serve("digits:1").client().server_metadata()
    assert meta.name == SERVER_NAME
    assert meta.version == SERVER_VERSION
    assert set(meta.extensions) >= {"statistics", "parameters"}


def test_model_metadata_gives_platform_versions_and_shapes_with_variable_batch(serve: Serve) -> None:
    served = serve("digits:1")
    for version in ("", "1"):
        meta = served.client().model_metadata("digits", version)
        assert meta.name == "digits"
        assert list(meta.versions) == ["1"]
        assert meta.platform == "onnxruntime_onnx"
        assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("pixels", "FP32", [-1, 64])]
        assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [("probabilities", "FP32", [-1, 10])]


def test_infer_raw_contents_matches_onnxruntime_and_the_in_process_api(
    serve: Serve, model_packages: dict[str, Path]
) -> None:
    served = serve("digits:1")
    pixels = digits_inputs(5)
    expected = onnx_answer(model_packages["digits:1"], pixels)
    in_process = served.repo.infer(InferRequest("digits", {"pixels": pixels})).outputs["probabilities"]
    for target in (served.tcp, served.unix):
        response = served.client(target).infer("digits", {"pixels": pixels}, request_id="req-7")
        assert (response.model_name, response.model_version, response.id) == ("digits", "1", "req-7")
        got = response.outputs["probabilities"]
        assert got.shape == (5, 10) and got.dtype == np.float32
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)
        np.testing.assert_array_equal(got, in_process)


def test_infer_typed_fp32_contents(serve: Serve, model_packages: dict[str, Path]) -> None:
    served = serve("digits:1")
    pixels = digits_inputs(3, offset=10)
    request = pb.ModelInferRequest(model_name="digits", model_version="1", id="typed")
    tensor = request.inputs.add(name="pixels", datatype="FP32", shape=[3, 64])
    tensor.contents.fp32_contents.extend(pixels.ravel().tolist())
    response = served.client().infer_raw(request)
    assert response.id == "typed"
    np.testing.assert_allclose(
        response.outputs["probabilities"], onnx_answer(model_packages["digits:1"], pixels), rtol=1e-5, atol=1e-7
    )


def test_infer_typed_int_and_uint_contents_with_extreme_values(serve: Serve, int_package: Path) -> None:
    served = serve(int_package)
    a = np.array([[-128, -1, 0, 127], [5, 6, 7, 8]], dtype=np.int8)
    b = np.array([[0, 1, 65535, 300], [1, 2, 3, 4]], dtype=np.uint16)
    request = pb.ModelInferRequest(model_name="mix")
    request.inputs.add(name="a", datatype="INT8", shape=[2, 4]).contents.int_contents.extend(a.ravel().tolist())
    request.inputs.add(name="b", datatype="UINT16", shape=[2, 4]).contents.uint_contents.extend(b.ravel().tolist())
    out = served.client().infer_raw(request).outputs
    np.testing.assert_array_equal(out["sum"], a.astype(np.int32) + b.astype(np.int32))
    np.testing.assert_array_equal(out["diff"], a.astype(np.int32) - b.astype(np.int32))
    assert out["sum"].dtype == np.int32


def test_requested_outputs_subset_returns_only_those(serve: Serve, int_package: Path) -> None:
    served = serve(int_package)
    a = np.arange(4, dtype=np.int8).reshape(1, 4)
    b = np.full((1, 4), 10, dtype=np.uint16)
    response = served.client().infer("mix", {"a": a, "b": b}, outputs=["diff"])
    assert list(response.outputs) == ["diff"]
    np.testing.assert_array_equal(response.outputs["diff"], [[-10, -9, -8, -7]])
    both = served.client().infer("mix", {"a": a, "b": b})
    assert sorted(both.outputs) == ["diff", "sum"]


def test_priority_and_timeout_parameters_are_accepted(serve: Serve) -> None:
    served = serve("digits:1")
    pixels = digits_inputs(2)
    plain = served.client().infer("digits", {"pixels": pixels}).outputs["probabilities"]
    for priority in (1, 2):
        response = served.client().infer("digits", {"pixels": pixels}, priority=priority, timeout_s=5.0)
        np.testing.assert_array_equal(response.outputs["probabilities"], plain)
    # Triton's clients send priority as uint64 and timeout as microseconds; int64 is accepted too.
    request = build_request("digits", {"pixels": pixels})
    request.parameters["priority"].int64_param = 1
    request.parameters["timeout"].int64_param = 5_000_000
    np.testing.assert_array_equal(
        decode_response(served.stub().ModelInfer(request, timeout=10)).outputs["probabilities"], plain
    )


def test_model_statistics_count_inferences_executions_and_batch_sizes(serve: Serve) -> None:
    served = serve("digits:1", "mobilenet-bench:1", inference={"adaptive": False})
    rows = [1, 3, 3, 2, 1]
    client = served.client()
    for i, n in enumerate(rows):  # one at a time: each request is its own batch
        client.infer("digits", {"pixels": digits_inputs(n, offset=i * 4)})
    stats = served.stats("digits")
    assert (stats.name, stats.version) == ("digits", "1")
    assert stats.inference_count == sum(rows)
    assert stats.execution_count == len(rows)
    assert stats.last_inference > 0
    assert stats.inference_stats.success.count == len(rows)
    assert stats.inference_stats.fail.count == 0
    assert stats.inference_stats.compute_infer.count == len(rows)
    assert stats.inference_stats.compute_infer.ns > 0
    assert {b.batch_size: b.compute_infer.count for b in stats.batch_stats} == {1: 2, 2: 1, 3: 2}
    assert served.stats("digits", "1") == stats
    everything = client.statistics().model_stats
    assert [(s.name, s.version, s.inference_count) for s in everything] == [
        ("digits", "1", sum(rows)),
        ("mobilenet-bench", "1", 0),
    ]
