"""Decode KServe v2 ModelInferRequest messages into InferRequest and encode responses, validating all of it.

Raw contents are checked against datatype and shape byte for byte before numpy sees them; typed contents
must have exactly one value per element and values in range for the datatype.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from edge_runtime.errors import InvalidInput, RequestTooLarge
from edge_runtime.inference.tensors import DATATYPES, datatype_of, dtype_of
from edge_runtime.inference.types import InferRequest, InferResponse
from edgefleet.proto.inference import grpc_service_pb2 as pb

__all__ = ["check_version", "decode_request", "encode_response", "parameter_value"]

MAX_RANK = 16
MAX_INPUTS = 256
# The typed-contents field that carries each datatype (the protocol has none for FP16: raw only).
_TYPED_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}
KEEP_PARAMETER = "edgefleet.keep"
_VERSION = re.compile(r"[0-9]{1,10}")


def check_version(name: str, version: str) -> str:
    """A requested version: "" (the active one) or a decimal integer; InvalidInput otherwise.

    ASCII digits only: str.isdigit() is also true of "²", which int() then rejects with a ValueError.
    """
    if version and not _VERSION.fullmatch(version):
        raise InvalidInput(
            f"model {name!r}: version {version!r} is not a positive integer; leave it empty for the active version"
        )
    return version


def parameter_value(p: pb.InferParameter) -> Any:
    choice = p.WhichOneof("parameter_choice")
    return None if choice is None else getattr(p, choice)


def _shape(name: str, dims: Any) -> tuple[int, ...]:
    shape = tuple(int(d) for d in dims)
    if len(shape) > MAX_RANK:
        raise InvalidInput(f"input {name!r} has rank {len(shape)}; at most {MAX_RANK} is supported")
    if any(d < 0 for d in shape):
        raise InvalidInput(f"input {name!r} has a negative dimension in shape {list(shape)}")
    return shape


def _decode_tensor(
    t: pb.ModelInferRequest.InferInputTensor, raw: bytes | None, budget: int, limit: int
) -> np.ndarray[Any, Any]:
    dtype = DATATYPES.get(t.datatype)
    if dtype is None:
        raise InvalidInput(f"input {t.name!r} has datatype {t.datatype!r}; edge-agent serves {', '.join(DATATYPES)}")
    shape = _shape(t.name, t.shape)
    count = math.prod(shape)
    if count * dtype.itemsize > budget:
        raise RequestTooLarge(
            f"input {t.name!r} of shape {list(shape)} takes the request past its limit "
            f"of {limit} bytes (server.max_request_bytes)"
        )
    if raw is not None:
        if t.HasField("contents"):
            raise InvalidInput(f"input {t.name!r} has both raw and typed contents; send one of them")
        if len(raw) != count * dtype.itemsize:
            raise InvalidInput(
                f"input {t.name!r}: raw contents are {len(raw)} bytes, but {t.datatype} "
                f"{list(shape)} needs {count * dtype.itemsize}"
            )
        return np.frombuffer(raw, dtype=dtype).reshape(shape)
    field = _TYPED_FIELD.get(t.datatype)
    if field is None:
        raise InvalidInput(
            f"input {t.name!r}: {t.datatype} has no typed contents in the protocol; send it in raw_input_contents"
        )
    values = getattr(t.contents, field)
    if len(values) != count:
        raise InvalidInput(f"input {t.name!r}: {len(values)} values in {field}, but shape {list(shape)} needs {count}")
    return _typed_array(t, field, values, dtype).reshape(shape)


def _typed_array(
    t: pb.ModelInferRequest.InferInputTensor, field: str, values: Any, dtype: np.dtype[Any]
) -> np.ndarray[Any, Any]:
    if dtype.kind not in "iu":
        return np.asarray(values, dtype=dtype)
    # numpy casts a repeated field with C semantics: 300 in int_contents would become 44 in INT8, silently.
    # Read at the field's own width, then check the datatype's range before narrowing.
    wide = np.asarray(values, dtype=np.uint64 if field.startswith("uint") else np.int64)
    info = np.iinfo(dtype)
    outside = (wide < info.min) | (wide > info.max)
    if outside.any():
        raise InvalidInput(
            f"input {t.name!r}: value {wide[outside][0]} in {field} does not fit {t.datatype} ({info.min}..{info.max})"
        )
    return wide.astype(dtype)


def decode_request(msg: pb.ModelInferRequest, max_bytes: int) -> InferRequest:
    """An InferRequest with numpy inputs (zero-copy over raw contents); InvalidInput names what is wrong."""
    version = check_version(msg.model_name, msg.model_version)
    raw = msg.raw_input_contents
    if len(msg.inputs) > MAX_INPUTS:
        raise InvalidInput(f"request has {len(msg.inputs)} inputs; at most {MAX_INPUTS} are accepted")
    if raw and len(raw) != len(msg.inputs):
        raise InvalidInput(
            f"raw_input_contents has {len(raw)} entries for {len(msg.inputs)} inputs; send one per input, in order"
        )
    if sum(len(b) for b in raw) > max_bytes:
        raise RequestTooLarge(f"request carries more than {max_bytes} bytes of tensor data (server.max_request_bytes)")
    inputs: dict[str, np.ndarray[Any, Any]] = {}
    used = 0
    for i, tensor in enumerate(msg.inputs):
        if tensor.name in inputs:
            raise InvalidInput(f"input {tensor.name!r} appears twice")
        array = _decode_tensor(tensor, raw[i] if raw else None, max_bytes - used, max_bytes)
        inputs[tensor.name] = array
        used += array.nbytes
    params = {k: parameter_value(v) for k, v in msg.parameters.items()}
    return InferRequest(
        model_name=msg.model_name,
        inputs=inputs,
        model_version=version,
        id=msg.id,
        outputs=tuple(o.name for o in msg.outputs) or None,
        priority=_priority(params.get("priority")),
        timeout_s=_timeout(params.get("timeout")),
        parameters=params,
    )


def _priority(value: Any) -> int:
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0 or value > 1_000_000:
        raise InvalidInput(f"parameter 'priority' must be a non-negative integer, not {value!r}")
    return value


def _timeout(value: Any) -> float | None:
    """Triton's 'timeout' parameter: microseconds; 0 means none."""
    if value is None or value == 0:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidInput(f"parameter 'timeout' must be a non-negative integer of microseconds, not {value!r}")
    return value / 1e6


def encode_response(response: InferResponse) -> pb.ModelInferResponse:
    """Outputs go in raw_output_contents, as Triton answers over gRPC."""
    msg = pb.ModelInferResponse(model_name=response.model_name, model_version=response.model_version, id=response.id)
    for name, array in response.outputs.items():
        msg.outputs.add(name=name, datatype=datatype_of(array.dtype), shape=array.shape)
        msg.raw_output_contents.append(np.ascontiguousarray(array).tobytes())
    for key, value in response.parameters.items():
        _set_parameter(msg.parameters[key], value)
    return msg


def _set_parameter(target: pb.InferParameter, value: Any) -> None:
    if isinstance(value, bool):
        target.bool_param = value
    elif isinstance(value, int):
        target.int64_param = value
    elif isinstance(value, float):
        target.double_param = value
    else:
        target.string_param = str(value)


def build_request(
    model: str,
    inputs: Mapping[str, np.ndarray[Any, Any]],
    *,
    version: str = "",
    outputs: Sequence[str] | None = None,
    priority: int = 0,
    timeout_s: float | None = None,
    keep: bool = False,
    request_id: str = "",
) -> pb.ModelInferRequest:
    """A ModelInferRequest with every input in raw_input_contents."""
    msg = pb.ModelInferRequest(model_name=model, model_version=version, id=request_id)
    for name, array in inputs.items():
        msg.inputs.add(name=name, datatype=datatype_of(array.dtype), shape=array.shape)
        msg.raw_input_contents.append(np.ascontiguousarray(array).tobytes())
    for name in outputs or ():
        msg.outputs.add(name=name)
    if priority:
        msg.parameters["priority"].uint64_param = priority
    if timeout_s is not None:
        msg.parameters["timeout"].uint64_param = int(timeout_s * 1e6)
    if keep:
        msg.parameters[KEEP_PARAMETER].bool_param = True
    return msg


def decode_response(msg: pb.ModelInferResponse) -> InferResponse:
    outputs = {}
    for i, t in enumerate(msg.outputs):
        outputs[t.name] = np.frombuffer(msg.raw_output_contents[i], dtype=dtype_of(t.datatype)).reshape(tuple(t.shape))
    return InferResponse(
        msg.model_name,
        msg.model_version,
        outputs,
        id=msg.id,
        parameters={k: parameter_value(v) for k, v in msg.parameters.items()},
    )
