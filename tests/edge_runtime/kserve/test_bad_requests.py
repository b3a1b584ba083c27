"""Malformed and unservable requests through a real gRPC server: each gets its own status and a reason that
names the problem, nothing runs for it, and the server goes on serving."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest

from edge_runtime.kserve.client import build_request
from edgefleet.proto.inference import grpc_service_pb2 as pb
from tests.edge_runtime.kserve.conftest import Serve, Served, digits_inputs, rpc_error

INVALID = grpc.StatusCode.INVALID_ARGUMENT
PIXELS = digits_inputs(2)


def good(model: str = "digits", **options: object) -> pb.ModelInferRequest:
    return build_request(model, {"pixels": PIXELS}, **options)  # type: ignore[arg-type]


def with_version(version: str) -> pb.ModelInferRequest:
    return good(version=version)


def raw_tensor(datatype: str, shape: list[int], data: bytes, name: str = "pixels") -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="digits")
    request.inputs.add(name=name, datatype=datatype, shape=shape)
    request.raw_input_contents.append(data)
    return request


def typed_fp32(shape: list[int], values: list[float]) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="digits")
    request.inputs.add(name="pixels", datatype="FP32", shape=shape).contents.fp32_contents.extend(values)
    return request


def extra_raw_entry() -> pb.ModelInferRequest:
    request = good()
    request.raw_input_contents.append(PIXELS.tobytes())
    return request


def raw_and_typed() -> pb.ModelInferRequest:
    request = good()
    request.inputs[0].contents.fp32_contents.extend(PIXELS.ravel().tolist())
    return request


def duplicate_input() -> pb.ModelInferRequest:
    request = good()
    request.inputs.add(name="pixels", datatype="FP32", shape=[2, 64])
    request.raw_input_contents.append(PIXELS.tobytes())
    return request


def fp16_typed() -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="digits")
    request.inputs.add(name="pixels", datatype="FP16", shape=[1, 64]).contents.fp32_contents.extend([0.0] * 64)
    return request


def with_parameter(key: str, kind: str, value: object) -> pb.ModelInferRequest:
    request = good()
    setattr(request.parameters[key], kind, value)
    return request


def mix_typed(a: list[int], b: list[int]) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="mix")
    request.inputs.add(name="a", datatype="INT8", shape=[1, 4]).contents.int_contents.extend(a)
    request.inputs.add(name="b", datatype="UINT16", shape=[1, 4]).contents.uint_contents.extend(b)
    return request


def mix_only_a() -> pb.ModelInferRequest:
    return build_request("mix", {"a": np.zeros((1, 4), np.int8)})


# (id, request, status, words the reason must contain)
CASES: list[tuple[str, Callable[[], pb.ModelInferRequest], grpc.StatusCode, list[str]]] = [
    ("unknown-model", lambda: good("nope"), grpc.StatusCode.NOT_FOUND, ["unknown model 'nope'", "digits"]),
    ("unknown-version", lambda: with_version("7"), grpc.StatusCode.NOT_FOUND, ["version 7", "loaded: [1]"]),
    ("non-numeric-version", lambda: with_version("latest"), INVALID, ["version 'latest'", "positive integer"]),
    ("unicode-digit-version", lambda: with_version("\u00b2"), INVALID, ["version '\u00b2'"]),
    (
        "wrong-datatype",
        lambda: raw_tensor("FP64", [2, 64], PIXELS.astype(np.float64).tobytes()),
        INVALID,
        ["'pixels'", "float64", "FP32"],
    ),
    (
        "wrong-shape",
        lambda: raw_tensor("FP32", [2, 32], PIXELS.tobytes()[: 2 * 32 * 4]),
        INVALID,
        ["'pixels'", "[2, 32]", "[N, 64]", "axis 1"],
    ),
    ("wrong-rank", lambda: raw_tensor("FP32", [128], PIXELS.tobytes()), INVALID, ["'pixels'", "rank 2"]),
    ("rank-over-16", lambda: raw_tensor("FP32", [1] * 17, bytes(4)), INVALID, ["rank 17", "at most 16"]),
    ("negative-dimension", lambda: raw_tensor("FP32", [-2, 64], b""), INVALID, ["negative dimension"]),
    (
        "raw-size-mismatch",
        lambda: raw_tensor("FP32", [2, 64], PIXELS.tobytes()[:-4]),
        INVALID,
        ["'pixels'", "508 bytes", "needs 512"],
    ),
    ("raw-count-mismatch", extra_raw_entry, INVALID, ["raw_input_contents has 2 entries for 1 inputs"]),
    ("raw-and-typed", raw_and_typed, INVALID, ["'pixels'", "both raw and typed"]),
    (
        "typed-count-mismatch",
        lambda: typed_fp32([1, 64], [0.0] * 63),
        INVALID,
        ["'pixels'", "63 values in fp32_contents", "needs 64"],
    ),
    (
        "int8-out-of-range",
        lambda: mix_typed([1, 2, 300, 4], [0, 0, 0, 0]),
        INVALID,
        ["'a'", "300", "INT8", "-128..127"],
    ),
    ("uint16-out-of-range", lambda: mix_typed([0, 0, 0, 0], [0, 70000, 0, 0]), INVALID, ["'b'", "70000", "UINT16"]),
    ("bytes-datatype", lambda: raw_tensor("BYTES", [1], b"\x01\x00\x00\x00x"), INVALID, ["'BYTES'"]),
    ("fp16-typed", fp16_typed, INVALID, ["FP16 has no typed contents", "raw_input_contents"]),
    ("duplicate-input", duplicate_input, INVALID, ["'pixels' appears twice"]),
    ("missing-input", mix_only_a, INVALID, ["missing input 'b'"]),
    (
        "unknown-input",
        lambda: raw_tensor("FP32", [2, 64], PIXELS.tobytes(), name="pixel"),
        INVALID,
        ["unknown input 'pixel'", "pixels"],
    ),
    ("unknown-output", lambda: good(outputs=["logits"]), INVALID, ["unknown output 'logits'", "probabilities"]),
    (
        "batch-over-model-max",
        lambda: build_request("digits", {"pixels": np.zeros((257, 64), np.float32)}),
        INVALID,
        ["batch of 257", "at most 256"],
    ),
    ("negative-priority", lambda: with_parameter("priority", "int64_param", -1), INVALID, ["'priority'", "-1"]),
    ("priority-beyond-levels", lambda: good(priority=3), INVALID, ["priority 3", "1..2"]),
    (
        "priority-not-a-number",
        lambda: with_parameter("priority", "string_param", "high"),
        INVALID,
        ["'priority'", "'high'"],
    ),
    ("negative-timeout", lambda: with_parameter("timeout", "int64_param", -5), INVALID, ["'timeout'", "-5"]),
]


def assert_still_serving(served: Served) -> None:
    response = served.client().infer("digits", {"pixels": PIXELS})
    assert response.outputs["probabilities"].shape == (2, 10)


@pytest.mark.parametrize(("make", "code", "words"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_request_gets_its_own_status_and_reason(
    serve: Serve,
    int_package: Path,
    make: Callable[[], pb.ModelInferRequest],
    code: grpc.StatusCode,
    words: list[str],
) -> None:
    served = serve("digits:1", int_package)
    stub = served.stub()
    error = rpc_error(lambda: stub.ModelInfer(make(), timeout=10))
    assert error.code() == code, error.details()
    for word in words:
        assert word in error.details()
    assert_still_serving(served)
    executed = {s.name: s.inference_count for s in served.client().statistics().model_stats}
    assert executed == {"digits": 2, "mix": 0}  # only the good request after it ran


def test_unknown_model_and_versions_in_metadata_and_statistics(serve: Serve) -> None:
    served = serve("digits:1")
    client = served.client()
    for call, code, words in [
        (lambda: client.model_metadata("nope"), grpc.StatusCode.NOT_FOUND, "unknown model 'nope'"),
        (lambda: client.model_metadata("digits", "3"), grpc.StatusCode.NOT_FOUND, "version 3"),
        (lambda: client.model_metadata("digits", "v1"), INVALID, "version 'v1'"),
        (lambda: client.statistics("nope"), grpc.StatusCode.NOT_FOUND, "unknown model 'nope'"),
        (lambda: client.statistics("", "1"), INVALID, "a version needs a model name"),
        (lambda: client.model_ready("digits", "\u0661"), INVALID, "version '\u0661'"),
    ]:
        error = rpc_error(call)
        assert (error.code(), words in error.details()) == (code, True), error.details()
    assert_still_serving(served)


LIMIT = 64 * 1024


def test_request_just_over_the_size_limit_is_resource_exhausted_with_the_limit(serve: Serve) -> None:
    served = serve("digits:1", server={"max_request_bytes": LIMIT})
    client = served.client()
    fits = np.zeros((LIMIT // 256, 64), np.float32)  # 256 rows of 256 bytes: exactly the limit
    assert client.infer("digits", {"pixels": fits}).outputs["probabilities"].shape == (256, 10)
    over = np.zeros((LIMIT // 256 + 1, 64), np.float32)
    error = rpc_error(lambda: client.infer("digits", {"pixels": over}))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert str(LIMIT) in error.details() and "max_request_bytes" in error.details()
    # The same tensor sent as typed contents is held to the same limit.
    typed = typed_fp32([LIMIT // 256 + 1, 64], [0.0] * over.size)
    error = rpc_error(lambda: served.stub().ModelInfer(typed, timeout=10))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert str(LIMIT) in error.details()
    assert_still_serving(served)


def test_request_far_over_the_limit_is_turned_away_by_grpc_itself(serve: Serve) -> None:
    served = serve("digits:1", server={"max_request_bytes": LIMIT})
    huge = raw_tensor("FP32", [4 * 1024, 1024], bytes(16 << 20))  # 16 MiB: past gRPC's receive limit
    error = rpc_error(lambda: served.stub().ModelInfer(huge, timeout=10))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
    assert_still_serving(served)
    assert served.stats("digits").inference_count == 2


def test_malformed_protobuf_body_gets_an_error_status_and_the_server_keeps_serving(serve: Serve) -> None:
    served = serve("digits:1")
    channel = grpc.insecure_channel(served.tcp)
    try:
        infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")  # bytes in, bytes out
        for body in (b"\xff\xff\xff\xff", b"\x0a\xff\xff\xff\xff\x0f", b"\x12\x05ab"):
            error = rpc_error(lambda body=body: infer(body, timeout=10))
            assert error.code() == INVALID, error
            assert "not a valid inference.ModelInferRequest" in error.details()
        unknown = channel.unary_unary("/inference.GRPCInferenceService/NoSuchMethod")
        assert rpc_error(lambda: unknown(b"", timeout=10)).code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        channel.close()
    assert served.client().live()
    assert_still_serving(served)


def test_very_long_names_in_errors_are_cut_short(serve: Serve) -> None:
    served = serve("digits:1")
    name = "n" * 200_000
    for request in (good(name), raw_tensor("FP32", [2, 64], PIXELS.tobytes(), name=name)):
        error = rpc_error(lambda request=request: served.stub().ModelInfer(request, timeout=10))
        # Uncut, the reason would exceed the client's 16 KiB metadata limit and arrive as RESOURCE_EXHAUSTED
        # "received metadata size exceeds hard limit" instead of the actual problem.
        assert error.code() in (grpc.StatusCode.NOT_FOUND, INVALID), error.details()
        assert len(error.details().encode()) < 1200
        assert error.details().startswith(("unknown model 'nnnn", "unknown input 'nnnn"))
        assert "bytes cut" in error.details()
    assert_still_serving(served)
