"""KServe v2 REST bodies <-> InferRequest / InferResponse: JSON tensors and Triton's binary-data extension.

Pure functions over bytes and plain data; no I/O. Validation is the gRPC codec's (kserve/codec.py): the same
datatypes, rank and count checks, integer ranges and parameters, so both protocols refuse the same requests.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from edge_runtime.errors import InvalidInput
from edge_runtime.inference.tensors import DATATYPES, datatype_of
from edge_runtime.inference.types import InferRequest, InferResponse
from edge_runtime.kserve.codec import (
    MAX_INPUTS,
    TYPED_FIELD,
    check_version,
    priority_of,
    sized_shape,
    timeout_of,
    typed_array,
)
from edge_runtime.kserve.http_body import check_keys, parse_json
from edge_runtime.kserve.shm import REGION_PARAMETER, ShmRef, SystemSharedMemory, served_ref

__all__ = ["BINARY_HEADER", "EncodedResponse", "OutputPlan", "decode_infer", "encode_infer"]

# Triton's binary-data extension: the JSON part's length, in requests and responses.
BINARY_HEADER = "inference-header-content-length"
BINARY_SIZE = "binary_data_size"
BINARY_DATA = "binary_data"
BINARY_OUTPUT = "binary_data_output"
_REQUEST_KEYS = {"id", "parameters", "inputs", "outputs"}
_INPUT_KEYS = {"name", "shape", "datatype", "parameters", "data"}
_OUTPUT_KEYS = {"name", "parameters"}
Array = np.ndarray[Any, Any]


@dataclass(frozen=True)
class OutputPlan:
    """Where each output goes back: `binary` says binary or JSON per name (key "" = outputs the request did not
    name), `shm` names the outputs a request sent to a shared-memory region (not in the body at all)."""

    binary: Mapping[str, bool]
    shm: Mapping[str, ShmRef]


@dataclass(frozen=True)
class EncodedResponse:
    """A response body and, when it carries binary outputs, the length of its JSON part."""

    body: bytes
    json_length: int | None


def decode_infer(
    model: str,
    version: str,
    body: bytes | bytearray,
    json_length: int | None,
    max_bytes: int,
    shm: SystemSharedMemory | None = None,
) -> tuple[InferRequest, OutputPlan]:
    """The InferRequest of a REST infer body, and where its outputs go back.

    `json_length`: the Inference-Header-Content-Length header (None: the whole body is JSON). Binary inputs
    become arrays over `body`, inputs in a region of `shm` arrays over its mapping, both without a copy; an
    output sent to a region is checked against it before the model runs. InvalidInput / RequestTooLarge
    name what is wrong.
    """
    check_version(model, version)
    if json_length is not None and not 0 < json_length <= len(body):
        raise InvalidInput(
            f"Inference-Header-Content-Length is {json_length}, but the body has {len(body)} bytes; "
            "it must give the length of the JSON part"
        )
    doc = parse_json(body if json_length is None else bytes(memoryview(body)[:json_length]))
    request = check_keys(doc, "request body", _REQUEST_KEYS)
    request_id = request.get("id", "")
    if not isinstance(request_id, str):
        raise InvalidInput(f"'id' must be a string, not {request_id!r}")
    params = dict(_parameters(request.get("parameters"), "request"))
    binary_default = params.pop(BINARY_OUTPUT, False)
    if not isinstance(binary_default, bool):
        raise InvalidInput(f"parameter {BINARY_OUTPUT!r} must be true or false, not {binary_default!r}")
    inputs = _decode_inputs(request.get("inputs"), body, json_length, max_bytes, shm)
    wishes, refs = _outputs(request.get("outputs"), binary_default, shm)
    infer = InferRequest(
        model_name=model,
        inputs=inputs,
        model_version=version,
        id=request_id,
        outputs=tuple(wishes) if request.get("outputs") else None,
        priority=priority_of(params.get("priority")),
        timeout_s=timeout_of(params.get("timeout")),
        parameters=params,
    )
    return infer, OutputPlan(({} if request.get("outputs") else {"": binary_default}) | wishes, refs)


def _parameters(value: Any, what: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidInput(f"{what} 'parameters' must be a JSON object")
    for key, item in value.items():
        if not isinstance(item, (bool, int, float, str)):
            raise InvalidInput(f"{what} parameter {key!r} must be a boolean, number or string, not {item!r}")
    return value


def _decode_inputs(
    value: Any, body: bytes | bytearray, json_length: int | None, max_bytes: int, shm: SystemSharedMemory | None
) -> dict[str, Array]:
    if not isinstance(value, list) or not value:
        raise InvalidInput("'inputs' must be a non-empty list of tensors")
    if len(value) > MAX_INPUTS:
        raise InvalidInput(f"request has {len(value)} inputs; at most {MAX_INPUTS} are accepted")
    offset = json_length if json_length is not None else len(body)
    inputs: dict[str, Array] = {}
    used = 0
    for item in value:
        tensor = check_keys(item, "each input", _INPUT_KEYS)
        name = tensor.get("name")
        if not isinstance(name, str):
            raise InvalidInput(f"an input's 'name' must be a string, not {name!r}")
        if name in inputs:
            raise InvalidInput(f"input {name!r} appears twice")
        array, offset = _decode_tensor(name, tensor, body, json_length, offset, max_bytes - used, max_bytes, shm)
        inputs[name] = array
        used += array.nbytes
    if offset != len(body):
        raise InvalidInput(
            f"the body has {len(body) - offset} bytes after the inputs' binary data; "
            f"{BINARY_SIZE} of the inputs must add up to the body's binary part"
        )
    return inputs


def _decode_tensor(
    name: str,
    tensor: Mapping[str, Any],
    body: bytes | bytearray,
    json_length: int | None,
    offset: int,
    budget: int,
    limit: int,
    shm: SystemSharedMemory | None,
) -> tuple[Array, int]:
    datatype = tensor.get("datatype")
    dtype = DATATYPES.get(datatype) if isinstance(datatype, str) else None
    if dtype is None or not isinstance(datatype, str):
        raise InvalidInput(f"input {name!r} has datatype {datatype!r}; edge-agent serves {', '.join(DATATYPES)}")
    dims = tensor.get("shape")
    if not isinstance(dims, list) or not all(type(d) is int for d in dims):
        raise InvalidInput(f"input {name!r}: 'shape' must be a list of integers, not {dims!r}")
    shape, count = sized_shape(name, dims, dtype, budget, limit)
    params = _parameters(tensor.get("parameters"), f"input {name!r}")
    size = params.get(BINARY_SIZE)
    ref = served_ref(name, params, shm) if params else None
    if ref is not None and shm is not None:  # Triton's shared-memory extension: the bytes are in a region
        if "data" in tensor or size is not None:
            carried = "'data'" if "data" in tensor else f"'{BINARY_SIZE}'"
            raise InvalidInput(
                f"input {name!r} names a shared memory region and also sets {carried}; set only one of 'data', "
                f"'{BINARY_SIZE}' and '{REGION_PARAMETER}'"
            )
        view = shm.input_view(name, ref, count * dtype.itemsize)
        return np.frombuffer(view, dtype=dtype).reshape(shape), offset
    if size is None:
        if "data" not in tensor:
            raise InvalidInput(f"input {name!r} has neither 'data' nor a {BINARY_SIZE} or {REGION_PARAMETER} parameter")
        return _json_array(name, datatype, tensor["data"], count, dtype).reshape(shape), offset
    if "data" in tensor:
        raise InvalidInput(f"input {name!r} has both 'data' and binary data; send one of them")
    if type(size) is not int or size < 0:
        raise InvalidInput(f"input {name!r}: {BINARY_SIZE} must be a non-negative integer, not {size!r}")
    if size != count * dtype.itemsize:
        raise InvalidInput(
            f"input {name!r}: binary data is {size} bytes, but {datatype} {list(shape)} needs {count * dtype.itemsize}"
        )
    if json_length is None:
        raise InvalidInput(
            f"input {name!r} has a {BINARY_SIZE} parameter, but the request has no Inference-Header-Content-Length "
            "header to say where its JSON part ends"
        )
    if offset + size > len(body):
        raise InvalidInput(f"input {name!r}: {BINARY_SIZE} {size} runs past the end of the body")
    return np.frombuffer(body, dtype=dtype, count=count, offset=offset).reshape(shape), offset + size


def _json_array(name: str, datatype: str, data: Any, count: int, dtype: np.dtype[Any]) -> Array:
    if not isinstance(data, list):
        raise InvalidInput(f"input {name!r}: 'data' must be a list")
    values = _flat(data) if data and isinstance(data[0], list) else data
    if len(values) != count:
        raise InvalidInput(f"input {name!r}: {len(values)} values in 'data', but its shape needs {count}")
    if dtype.kind == "b":
        if not all(type(v) is bool for v in values):
            raise InvalidInput(f"input {name!r}: BOOL data must be true or false")
        return np.array(values, dtype=dtype)
    if dtype.kind in "iu":
        if not all(type(v) is int for v in values):
            raise InvalidInput(f"input {name!r}: {datatype} data must be integers")
        try:
            return typed_array(name, datatype, TYPED_FIELD[datatype], values, dtype)
        except OverflowError:  # past the field's 64 bits: numpy refuses it before the range check can
            info = np.iinfo(dtype)
            bad = next((v for v in values if not info.min <= v <= info.max), "?")
            message = f"input {name!r}: value {bad} does not fit {datatype} ({info.min}..{info.max})"
            raise InvalidInput(message) from None
    if datatype == "FP16":
        raise InvalidInput(f"input {name!r}: FP16 has no JSON form; send it as binary data ({BINARY_SIZE})")
    if not all(type(v) is float or type(v) is int for v in values):
        raise InvalidInput(f"input {name!r}: {datatype} data must be numbers")
    try:
        with np.errstate(over="ignore"):  # a value past the datatype's range is refused just below
            array = np.array(values, dtype=dtype)
    except OverflowError:
        raise InvalidInput(f"input {name!r}: a value is out of the range of {datatype}") from None
    if dtype.itemsize < 8 and np.isinf(array).any() and not np.isinf(np.array(values, dtype=np.float64)).any():
        raise InvalidInput(f"input {name!r}: a value is out of the range of {datatype}")
    return array


def _flat(data: list[Any]) -> list[Any]:
    """Nested lists, row-major, flattened (the REST protocol takes `data` flat or nested)."""
    out: list[Any] = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            out.append(item)
        else:
            stack.pop()
    return out


def _outputs(
    value: Any, binary_default: bool, shm: SystemSharedMemory | None
) -> tuple[dict[str, bool], dict[str, ShmRef]]:
    """Each named output's binary_data wish, and the shared-memory region of those sent to one."""
    if value is None:
        return {}, {}
    if not isinstance(value, list):
        raise InvalidInput("'outputs' must be a list")
    wishes: dict[str, bool] = {}
    refs: dict[str, ShmRef] = {}
    for item in value:
        output = check_keys(item, "each output", _OUTPUT_KEYS)
        name = output.get("name")
        if not isinstance(name, str) or not name:
            raise InvalidInput(f"an output's 'name' must be a non-empty string, not {name!r}")
        params = _parameters(output.get("parameters"), f"output {name!r}")
        if "classification" in params:
            raise InvalidInput(f"output {name!r}: the classification extension is not served")
        binary = params.get(BINARY_DATA, binary_default)
        if not isinstance(binary, bool):
            raise InvalidInput(f"output {name!r}: {BINARY_DATA} must be true or false, not {binary!r}")
        ref = served_ref(name, params, shm) if params else None
        if ref is not None and shm is not None:
            if params.get(BINARY_DATA) is True:
                raise InvalidInput(f"output {name!r} can't set both '{REGION_PARAMETER}' and '{BINARY_DATA}'")
            shm.check_output(name, ref)  # before the model runs, as Triton checks its output buffers
            refs[name] = ref
            binary = False
        wishes[name] = binary
    return wishes, refs


def encode_infer(response: InferResponse, plan: OutputPlan, shm: SystemSharedMemory | None = None) -> EncodedResponse:
    """The REST body of `response`; outputs in binary where `plan` asks (key "" = every output), FP16 always.

    An output `plan` sends to a region of `shm` is written there; its entry has no data (as Triton answers).
    """
    wishes, refs = plan.binary, plan.shm
    default = wishes.get("", False)
    outputs: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for name, array in response.outputs.items():
        datatype = datatype_of(array.dtype)
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        ref = refs.get(name) if refs else None
        if ref is not None and shm is not None:
            shm.write_output(name, ref, array)
        elif wishes.get(name, default) or datatype == "FP16":
            blob = array.tobytes()  # row-major, whatever the array's own layout
            entry["parameters"] = {BINARY_SIZE: len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = array.ravel().tolist()
        outputs.append(entry)
    doc: dict[str, Any] = {"model_name": response.model_name, "model_version": response.model_version}
    if response.id:
        doc["id"] = response.id
    if response.parameters:
        doc["parameters"] = response.parameters
    doc["outputs"] = outputs
    head = json.dumps(doc, separators=(",", ":")).encode()
    if not blobs:
        return EncodedResponse(head, None)
    return EncodedResponse(b"".join([head, *blobs]), len(head))
