"""ModelInferRequest off the wire with its tensor bytes left where gRPC put them (zero-copy raw contents).

protobuf copies every bytes field twice on the way to numpy: once when it parses the message, once more each
time Python reads `raw_input_contents[i]` (upb hands out a new bytes object per access). With 600 KB inputs
and the agent's pinned mmap threshold (edgefleet/heap.py) each copy is a fresh mmap, ~150 page faults and a
munmap: measured, those copies took ~60 % of the event loop's CPU serving a CNN (docs/performance.md).

So for a large request the top-level fields are walked once (a handful of varints); every
raw_input_contents entry (field 7) becomes a memoryview into the bytes gRPC received, and only the rest of the
message (names, shapes, parameters: small) is parsed by protobuf. Small requests are parsed whole: for them
the walk costs more than the copies it saves.
"""

from __future__ import annotations

from dataclasses import dataclass

from google.protobuf.message import DecodeError

from edgefleet.proto.inference import grpc_service_pb2 as pb

__all__ = ["ZERO_COPY_BYTES", "InferWire", "parse_infer_request"]

# Requests below this size are parsed by protobuf alone (measured: ~0.4 µs for a 300-byte request, where the
# walk costs several µs; at 600 KB the walk is ~3 µs against ~20-200 µs per avoided copy).
ZERO_COPY_BYTES = 64 * 1024
_RAW_INPUT_CONTENTS = 7
_LENGTH_DELIMITED = 2


@dataclass(frozen=True)
class InferWire:
    """A ModelInferRequest whose raw_input_contents are `raw` (views into the received bytes), not in `message`."""

    message: pb.ModelInferRequest
    raw: list[memoryview]


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data):
            raise DecodeError("truncated varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift >= 64:
            raise DecodeError("varint longer than 10 bytes")


def parse_infer_request(data: bytes) -> pb.ModelInferRequest | InferWire:
    """The request `data` holds; DecodeError when it is not a valid ModelInferRequest."""
    if len(data) < ZERO_COPY_BYTES:
        return pb.ModelInferRequest.FromString(data)
    view = memoryview(data)
    raw: list[memoryview] = []
    rest: list[memoryview] = []
    pos = kept_from = 0
    end = len(data)
    while pos < end:
        field_start = pos
        key, pos = _varint(data, pos)
        wire_type = key & 7
        if wire_type == 0:
            _, pos = _varint(data, pos)
        elif wire_type == 1:
            pos += 8
        elif wire_type == _LENGTH_DELIMITED:
            length, pos = _varint(data, pos)
            value_start, pos = pos, pos + length
        elif wire_type == 5:
            pos += 4
        elif wire_type in (3, 4):  # a (deprecated) group, which protobuf skips as an unknown field: let it
            return pb.ModelInferRequest.FromString(data)
        else:  # the undefined 6 and 7
            raise DecodeError(f"wire type {wire_type} at byte {field_start}")
        if pos > end:
            raise DecodeError(f"field at byte {field_start} runs past the end of the message")
        if key >> 3 == _RAW_INPUT_CONTENTS and wire_type == _LENGTH_DELIMITED:
            rest.append(view[kept_from:field_start])
            raw.append(view[value_start:pos])
            kept_from = pos
    if not raw:
        return pb.ModelInferRequest.FromString(data)
    rest.append(view[kept_from:])
    return InferWire(pb.ModelInferRequest.FromString(b"".join(rest)), raw)
