"""Triton's own client works against edge-agent unchanged: our `inference` protos are a wire-identical subset
of Triton's, and tritonclient.grpc talks to a running server.

tritonclient registers the same `inference.*` names in protobuf's default descriptor pool as
edgefleet.proto does, so it runs in a subprocess (triton_probe.py) and hands back bytes and JSON.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from google.protobuf import descriptor_pb2

from edge_runtime.inference.types import InferRequest
from edgefleet.proto.inference import grpc_service_pb2
from tests.edge_runtime.kserve.conftest import Serve, digits_inputs

PROBE = Path(__file__).with_name("triton_probe.py")

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("tritonclient") is None,
    # Not tritonclient[grpc]: that extra pins protobuf<7; tritonclient.grpc itself runs on our protobuf 7.
    reason='tritonclient is not installed (pip install "tritonclient>=2.73")',
)


def probe(*args: str) -> bytes:
    done = subprocess.run([sys.executable, str(PROBE), *args], capture_output=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    return done.stdout


Messages = dict[str, descriptor_pb2.DescriptorProto]


def index_messages(file: descriptor_pb2.FileDescriptorProto) -> Messages:
    found: Messages = {}

    def walk(prefix: str, messages: Any) -> None:
        for message in messages:
            name = f"{prefix}.{message.name}"
            found[name] = message
            walk(name, message.nested_type)

    walk(f".{file.package}", file.message_type)
    return found


def field_shape(
    message: descriptor_pb2.DescriptorProto, field: descriptor_pb2.FieldDescriptorProto
) -> tuple[object, ...]:
    """Everything about a field that decides its wire encoding and its generated accessors."""
    oneof = message.oneof_decl[field.oneof_index].name if field.HasField("oneof_index") else None
    packed = field.options.packed if field.options.HasField("packed") else None
    return (field.name, field.number, field.type, field.label, field.type_name, oneof, field.proto3_optional, packed)


def message_differences(ours: Messages, theirs: Messages) -> list[str]:
    problems = []
    for name, message in ours.items():
        other = theirs.get(name)
        if other is None:
            problems.append(f"{name}: Triton has no such message")
            continue
        if message.options.map_entry != other.options.map_entry:
            problems.append(f"{name}: map_entry differs")
        their_fields = {f.number: f for f in other.field}
        for field in message.field:
            twin = their_fields.get(field.number)
            if twin is None:
                problems.append(f"{name}.{field.name} = {field.number}: Triton has no field {field.number}")
            elif field_shape(message, field) != field_shape(other, twin):
                problems.append(f"{name}: ours {field_shape(message, field)} != Triton's {field_shape(other, twin)}")
        their_enums = {e.name: {v.name: v.number for v in e.value} for e in other.enum_type}
        for enum in message.enum_type:
            if their_enums.get(enum.name) != {v.name: v.number for v in enum.value}:
                problems.append(f"{name}.{enum.name}: enum values differ")
    return problems


def our_file() -> descriptor_pb2.FileDescriptorProto:
    file = descriptor_pb2.FileDescriptorProto()
    grpc_service_pb2.DESCRIPTOR.CopyToProto(file)
    return file


def test_our_messages_and_rpcs_are_a_wire_identical_subset_of_tritons() -> None:
    theirs_set = descriptor_pb2.FileDescriptorSet.FromString(probe("descriptors"))
    (triton,) = [f for f in theirs_set.file if f.package == "inference" and f.service]
    ours = our_file()
    assert ours.package == triton.package == "inference"

    our_messages = index_messages(ours)
    their_messages: Messages = {}
    for file in theirs_set.file:
        their_messages.update(index_messages(file))
    assert len(our_messages) >= 25  # the walk reached the nested messages too
    assert message_differences(our_messages, their_messages) == []
    # Enums by name with their values (DataType lives in Triton's model_config.proto).
    their_enums = {e.name: {(v.name, v.number) for v in e.value} for file in theirs_set.file for e in file.enum_type}
    for enum in ours.enum_type:
        assert {(v.name, v.number) for v in enum.value} <= their_enums.get(enum.name, set()), enum.name

    (our_service,) = ours.service
    their_service = {s.name: s for s in triton.service}[our_service.name]
    their_methods = {m.name: m for m in their_service.method}
    for method in our_service.method:
        twin = their_methods.get(method.name)
        assert twin is not None, f"Triton has no rpc {method.name}"
        shape = (method.input_type, method.output_type, method.client_streaming, method.server_streaming)
        assert shape == (twin.input_type, twin.output_type, twin.client_streaming, twin.server_streaming)
    assert {
        "ServerLive",
        "ServerReady",
        "ModelReady",
        "ServerMetadata",
        "ModelMetadata",
        "ModelInfer",
        "ModelStatistics",
        "ModelConfig",
        "RepositoryIndex",
        "RepositoryModelLoad",
        "RepositoryModelUnload",
        "SystemSharedMemoryStatus",
        "SystemSharedMemoryRegister",
        "SystemSharedMemoryUnregister",
        "CudaSharedMemoryStatus",
        "CudaSharedMemoryRegister",
        "CudaSharedMemoryUnregister",
    } <= {m.name for m in our_service.method}
    # The shared-memory messages, nested RegionStatus and map entries included, were compared above.
    assert {
        ".inference.SystemSharedMemoryStatusResponse.RegionStatus",
        ".inference.SystemSharedMemoryStatusResponse.RegionsEntry",
        ".inference.SystemSharedMemoryRegisterRequest",
        ".inference.CudaSharedMemoryStatusResponse.RegionStatus",
        ".inference.CudaSharedMemoryRegisterRequest",
    } <= set(our_messages)


def test_the_comparison_notices_a_changed_field() -> None:
    ours = index_messages(our_file())
    theirs = index_messages(our_file())
    assert message_differences(ours, theirs) == []
    request = theirs[".inference.ModelInferRequest"]
    next(f for f in request.field if f.name == "raw_input_contents").number = 99
    problems = message_differences(ours, theirs)
    assert len(problems) == 1 and "raw_input_contents = 7" in problems[0]


def test_tritonclient_grpc_works_against_our_server_unchanged(serve: Serve, tmp_path: Path) -> None:
    served = serve("digits:1")
    pixels = digits_inputs(6, offset=20)
    np.save(tmp_path / "in.npy", pixels)
    report = json.loads(probe("client", served.tcp, str(tmp_path / "in.npy"), str(tmp_path / "out.npy")))

    assert report["live"] and report["ready"] and report["model_ready"] and report["model_ready_v1"]
    assert report["unknown_ready"] is False
    assert report["server_metadata"]["name"] == "edgefleet-edge-agent"
    meta = report["metadata"]
    assert (meta["name"], meta["versions"], meta["platform"]) == ("digits", ["1"], "onnxruntime_onnx")
    assert meta["inputs"] == [{"name": "pixels", "datatype": "FP32", "shape": ["-1", "64"]}]
    assert meta["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": ["-1", "10"]}]

    expected = served.repo.infer(InferRequest("digits", {"pixels": pixels})).outputs["probabilities"]
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), expected)
    response = report["response"]
    assert (response["model_name"], response["model_version"], response["id"]) == ("digits", "1", "triton-1")

    (stats,) = report["statistics"]["model_stats"]
    assert int(stats["inference_count"]) == 6

    assert report["unknown_model"]["status"] == "StatusCode.NOT_FOUND"
    assert "unknown model 'nope'" in report["unknown_model"]["message"]
    assert report["wrong_shape"]["status"] == "StatusCode.INVALID_ARGUMENT"
    assert "'pixels'" in report["wrong_shape"]["message"]
    assert report["live_after"]


def test_tritonclient_reads_the_repository_index_and_model_config(
    serve: Serve, tmp_path: Path, model_packages: dict[str, Path]
) -> None:
    # Version 2 installed beside the active 1: Triton lists a version it has not loaded as UNAVAILABLE.
    served = serve("digits:1")
    served.repo.store.install(model_packages["digits:2"])
    np.save(tmp_path / "in.npy", digits_inputs(1))
    report = json.loads(probe("client", served.tcp, str(tmp_path / "in.npy"), str(tmp_path / "out.npy")))

    models = report["index"]["models"]
    assert [(m["name"], m["version"], m["state"]) for m in models] == [
        ("digits", "1", "READY"),
        ("digits", "2", "UNAVAILABLE"),
    ]
    assert "not loaded" in models[1]["reason"]
    config = report["config"]["config"]
    assert (config["name"], config["platform"], config["backend"]) == ("digits", "onnxruntime_onnx", "onnxruntime")
    assert config["max_batch_size"] == served.repo.model("digits").manifest.max_batch_size > 1
    # dims without the batch axis, as Triton's config.pbtxt has them
    assert config["input"] == [{"name": "pixels", "data_type": "TYPE_FP32", "dims": ["64"]}]
    assert config["output"] == [{"name": "probabilities", "data_type": "TYPE_FP32", "dims": ["10"]}]
    assert config["dynamic_batching"]["preferred_batch_size"]
    assert report["config_unknown"]["status"] == "StatusCode.NOT_FOUND"
    for call in ("load", "unload"):
        assert report[call]["status"] == "StatusCode.UNIMPLEMENTED"
        assert "fleetctl models assign" in report[call]["message"]
        assert "edge-agent install" in report[call]["message"]
