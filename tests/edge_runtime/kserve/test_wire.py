"""kserve/wire.py: a large ModelInferRequest parsed with its raw contents left in the received bytes.

The oracle is protobuf itself: for any body, parse_infer_request must give what ModelInferRequest.FromString
gives (the message less raw_input_contents, and those contents byte for byte, in order), or raise DecodeError
where FromString does. Then the same through a real gRPC server: a large request answers exactly what the
in-process API answers, and a body that does not parse gets INVALID_ARGUMENT with a reason.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_runtime.inference.types import InferRequest
from edge_runtime.kserve.client import build_request, decode_response
from edge_runtime.kserve.wire import ZERO_COPY_BYTES, InferWire, parse_infer_request
from edgefleet.proto.inference import grpc_service_pb2 as pb
from tests.edge_runtime.kserve.conftest import Serve, digits_inputs, rpc_error

INFER_METHOD = "/inference.GRPCInferenceService/ModelInfer"


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def raw_field(body: bytes) -> bytes:
    """One raw_input_contents entry (field 7, length-delimited) as it travels."""
    return varint(7 << 3 | 2) + varint(len(body)) + body


def pattern(size: int, seed: int) -> bytes:
    """`size` bytes that differ from entry to entry (cheap to make at hundreds of KB)."""
    return ((np.arange(size, dtype=np.uint32) * (2 * seed + 1) + seed) % 251).astype(np.uint8).tobytes()


def check_against_protobuf(data: bytes) -> pb.ModelInferRequest | InferWire:
    """parse_infer_request(data) equals FromString(data); returns the parse."""
    expected = pb.ModelInferRequest.FromString(data)
    got = parse_infer_request(data)
    if isinstance(got, InferWire):
        raw = list(expected.raw_input_contents)
        del expected.raw_input_contents[:]
        assert got.message == expected
        assert len(got.message.raw_input_contents) == 0
        assert [bytes(view) for view in got.raw] == raw
    else:
        assert got == expected
    return got


def check_zero_copy(wire: InferWire, data: bytes) -> None:
    whole = np.frombuffer(data, np.uint8)
    for view in wire.raw:
        assert view.obj is data
        if view.nbytes:
            assert np.shares_memory(np.frombuffer(view, np.uint8), whole)


# -- messages ----------------------------------------------------------------------------------------------

names = st.text(max_size=12)
parameter = st.one_of(
    st.builds(lambda v: pb.InferParameter(bool_param=v), st.booleans()),
    st.builds(lambda v: pb.InferParameter(int64_param=v), st.integers(-(2**63), 2**63 - 1)),
    st.builds(lambda v: pb.InferParameter(string_param=v), st.text(max_size=20)),
)
parameters = st.dictionaries(names, parameter, max_size=3)
shapes = st.lists(st.integers(-1, 2**40), max_size=4)


@st.composite
def unknown_field(draw: st.DrawFn) -> bytes:
    """A field this schema does not define (numbers 20..5000), of wire type varint, 64-bit, bytes or 32-bit."""
    number = draw(st.integers(20, 5000))
    wire_type = draw(st.sampled_from([0, 1, 2, 5]))
    key = varint(number << 3 | wire_type)
    if wire_type == 0:
        return key + varint(draw(st.integers(0, 2**64 - 1)))
    if wire_type == 1:
        return key + draw(st.binary(min_size=8, max_size=8))
    if wire_type == 5:
        return key + draw(st.binary(min_size=4, max_size=4))
    body = draw(st.binary(max_size=40))
    return key + varint(len(body)) + body


@st.composite
def infer_bodies(draw: st.DrawFn, large: bool) -> tuple[bytes, list[bytes]]:
    """A serialized ModelInferRequest, its fields in random order with unknown ones among them; and its raw
    contents as sent. `large`: at least ZERO_COPY_BYTES (one raw entry of 64..200 KB), else any size."""
    head = pb.ModelInferRequest(model_name=draw(names), model_version=draw(names), id=draw(names))
    for key, value in draw(parameters).items():
        head.parameters[key].CopyFrom(value)
    tensors = pb.ModelInferRequest()
    for _ in range(draw(st.integers(0, 4))):
        tensor = tensors.inputs.add(name=draw(names), datatype=draw(st.sampled_from(["FP32", "UINT8", "BYTES"])))
        tensor.shape.extend(draw(shapes))
        for key, value in draw(parameters).items():
            tensor.parameters[key].CopyFrom(value)
    wanted = pb.ModelInferRequest()
    for _ in range(draw(st.integers(0, 3))):
        wanted.outputs.add(name=draw(names))
    sizes = draw(st.lists(st.sampled_from([0, 1, 7, 300, 5000]) | st.integers(0, 2000), max_size=5))
    if large:
        sizes.insert(draw(st.integers(0, len(sizes))), draw(st.integers(ZERO_COPY_BYTES, 200_000)))
    raw = [pattern(size, seed) for seed, size in enumerate(sizes)]
    # Concatenated messages merge: splitting the fields over several lets them arrive in any order.
    segments = [
        head.SerializeToString(),
        tensors.SerializeToString(),
        wanted.SerializeToString(),
        *draw(st.lists(unknown_field(), max_size=4)),
    ]
    order = draw(st.permutations(range(len(segments) + len(raw))))
    pieces = [*segments, *(raw_field(body) for body in raw)]
    # Raw entries keep their relative order (their order is what maps them to inputs).
    raw_slots = iter(sorted(i for i in order if i >= len(segments)))
    data = b"".join(pieces[next(raw_slots)] if i >= len(segments) else pieces[i] for i in order)
    return data, raw


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(infer_bodies(large=True))
def test_large_request_parses_as_protobuf_does_with_raw_contents_left_in_place(body: tuple[bytes, list[bytes]]) -> None:
    data, raw = body
    assert len(data) >= ZERO_COPY_BYTES
    got = check_against_protobuf(data)
    assert isinstance(got, InferWire)
    assert [bytes(view) for view in got.raw] == raw
    check_zero_copy(got, data)


@settings(max_examples=150, deadline=None)
@given(infer_bodies(large=False))
def test_any_request_parses_as_protobuf_does(body: tuple[bytes, list[bytes]]) -> None:
    data, raw = body
    got = check_against_protobuf(data)
    if len(data) < ZERO_COPY_BYTES:
        assert isinstance(got, pb.ModelInferRequest)
        assert list(got.raw_input_contents) == raw


def test_large_request_without_raw_contents_is_a_plain_message() -> None:
    request = pb.ModelInferRequest(model_name="m", id="x" * ZERO_COPY_BYTES)
    request.inputs.add(name="a", datatype="FP32", shape=[1]).contents.fp32_contents.append(1.5)
    data = request.SerializeToString()
    got = parse_infer_request(data)
    assert isinstance(got, pb.ModelInferRequest)
    assert got == request


def test_zero_byte_and_repeated_raw_entries_keep_their_order_at_the_threshold() -> None:
    raw = [b"", pattern(ZERO_COPY_BYTES, 1), b"", b"\x00", pattern(3, 2), b""]
    request = pb.ModelInferRequest(model_name="m")
    request.raw_input_contents.extend(raw)
    data = request.SerializeToString()
    got = check_against_protobuf(data)
    assert isinstance(got, InferWire)
    assert [bytes(view) for view in got.raw] == raw
    check_zero_copy(got, data)
    # One byte under the threshold: protobuf parses it whole.
    small = data[: ZERO_COPY_BYTES - 1]
    with pytest.raises(DecodeError):
        pb.ModelInferRequest.FromString(small)
    with pytest.raises(DecodeError):
        parse_infer_request(small)


def large_body(extras: bool = True) -> bytes:
    """A large digits request; `extras`: with a parameter and a second raw entry (not servable then)."""
    request = build_request("digits", {"pixels": digits_inputs(256)}, request_id="big")
    if extras:
        request.parameters["p"].string_param = "v"
        request.raw_input_contents.append(pattern(999, 3))
    data = request.SerializeToString()
    assert len(data) >= ZERO_COPY_BYTES
    return data


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_truncated_large_request_fails_exactly_where_protobuf_fails(draw: st.DataObject) -> None:
    data = large_body()
    # Mostly cuts near the ends, where the fields other than the big raw entry lie.
    cut = draw.draw(
        st.integers(ZERO_COPY_BYTES, ZERO_COPY_BYTES + 200)
        | st.integers(len(data) - 1200, len(data) - 1)
        | st.integers(ZERO_COPY_BYTES, len(data) - 1)
    )
    truncated = data[:cut]
    try:
        expected: pb.ModelInferRequest | None = pb.ModelInferRequest.FromString(truncated)
    except DecodeError:
        expected = None
    if expected is None:
        with pytest.raises(DecodeError):
            parse_infer_request(truncated)
    else:  # cut at a field boundary: still a message
        check_against_protobuf(truncated)


@settings(max_examples=60, deadline=None)
@given(st.binary(min_size=1, max_size=64), st.integers(0, 2**32), st.sampled_from([b"", b"\xff" * 11, b"\x0b"]))
def test_garbage_large_bodies_raise_decode_error_as_protobuf_does(head: bytes, seed: int, tail: bytes) -> None:
    data = head + pattern(ZERO_COPY_BYTES, seed % 997) + tail
    try:
        pb.ModelInferRequest.FromString(data)
    except DecodeError:
        with pytest.raises(DecodeError):
            parse_infer_request(data)
    else:
        check_against_protobuf(data)


@pytest.mark.parametrize(
    "tail",
    [
        varint(7 << 3 | 2) + varint(10),  # raw entry whose length runs past the end
        varint(7 << 3 | 2),  # raw key with no length
        varint(5 << 3 | 1) + b"\x00" * 7,  # 64-bit field one byte short
        varint(5 << 3 | 5) + b"\x00" * 3,  # 32-bit field one byte short
        varint(30 << 3 | 0) + b"\x80" * 5,  # varint that never ends
        b"\xff" * 10 + b"\x01",  # key longer than 10 bytes
        varint(30 << 3 | 6),  # wire type 6 does not exist
        varint(30 << 3 | 7),
    ],
)
def test_large_request_with_a_broken_field_raises_decode_error(tail: bytes) -> None:
    data = large_body() + tail
    with pytest.raises(DecodeError):
        pb.ModelInferRequest.FromString(data)
    with pytest.raises(DecodeError):
        parse_infer_request(data)


def test_large_request_with_an_unknown_group_field_parses_as_protobuf_does() -> None:
    group = varint(99 << 3 | 3) + varint(1 << 3 | 0) + b"\x05" + varint(99 << 3 | 4)
    data = large_body() + group
    pb.ModelInferRequest.FromString(data)  # protobuf skips it
    check_against_protobuf(data)


# -- through a real server ---------------------------------------------------------------------------------


def test_large_digits_batch_over_grpc_answers_what_the_in_process_api_answers(serve: Serve) -> None:
    served = serve("digits:1")
    pixels = digits_inputs(256)
    request = build_request("digits", {"pixels": pixels}, request_id="big")
    assert request.ByteSize() >= ZERO_COPY_BYTES
    expected = served.repo.infer(InferRequest("digits", {"pixels": pixels})).outputs["probabilities"]
    for target in (served.tcp, served.unix):
        response = served.client(target).infer_raw(request)
        assert response.id == "big"
        np.testing.assert_array_equal(response.outputs["probabilities"], expected)
    # A small request of the same rows answers the same (the whole-parse path).
    small = served.client().infer("digits", {"pixels": pixels[:3]}).outputs["probabilities"]
    np.testing.assert_array_equal(small, expected[:3])


def test_mobilenet_600kb_input_over_grpc_answers_what_the_in_process_api_answers(
    serve: Serve, model_packages: dict[str, Path]
) -> None:
    served = serve("mobilenet-bench:1", inference={"adaptive": False})
    image = np.random.default_rng(7).standard_normal((1, 3, 224, 224)).astype(np.float32)
    request = build_request("mobilenet-bench", {"input": image})
    assert request.ByteSize() >= 600_000
    expected = served.repo.infer(InferRequest("mobilenet-bench", {"input": image})).outputs["logits"]
    # Bytes in, bytes out: the server's own parser sees exactly what this client serialized.
    channel = grpc.insecure_channel(served.tcp)
    try:
        infer = channel.unary_unary(INFER_METHOD)
        answer = infer(request.SerializeToString(), timeout=60)
    finally:
        channel.close()
    response = decode_response(pb.ModelInferResponse.FromString(answer))
    assert response.outputs["logits"].shape == (1, 1000)
    np.testing.assert_array_equal(response.outputs["logits"], expected)


def test_broken_large_bodies_over_grpc_get_invalid_argument_with_a_reason(serve: Serve) -> None:
    served = serve("digits:1")
    data = large_body(extras=False)
    bodies = [
        data[: len(data) - 5],  # the last raw entry cut short
        data + varint(7 << 3 | 2) + varint(1 << 20),  # a raw entry longer than the message
        data + b"\xff" * 11,  # a key that never ends
        data + varint(30 << 3 | 6),  # no such wire type
    ]
    channel = grpc.insecure_channel(served.tcp)
    try:
        infer = channel.unary_unary(INFER_METHOD)
        for body in bodies:
            assert len(body) >= ZERO_COPY_BYTES

            def call(body: bytes = body) -> Any:
                return infer(body, timeout=10)

            error = rpc_error(call)
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (error.code(), error.details())
            assert "not a valid inference.ModelInferRequest" in (error.details() or "")
        # The intact body is served on the same channel afterwards.
        answer = decode_response(pb.ModelInferResponse.FromString(infer(data, timeout=30)))
        assert answer.outputs["probabilities"].shape == (256, 10)
    finally:
        channel.close()
    assert served.stats("digits").inference_stats.success.count == 1
