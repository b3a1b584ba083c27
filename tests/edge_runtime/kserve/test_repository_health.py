"""Triton's repository and model-config calls, grpc.health.v1 and server reflection on the agent's gRPC server,
through real channels and the standard clients (the health stub, grpc_reflection's descriptor database)."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from edge_runtime.kserve.health import INFERENCE_SERVICE
from edge_runtime.kserve.repository import DATA_TYPES
from edgefleet.proto.inference import grpc_service_pb2 as pb
from tests.edge_runtime.kserve.conftest import Serve, Served, rpc_error
from tests.edge_runtime.kserve.test_failed_models import broken

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def health(served: Served, service: str = "") -> int:
    channel = grpc.insecure_channel(served.tcp)
    served.channels.append(channel)
    answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
    return int(answer.status)


def test_repository_index_lists_versions_with_tritons_states(
    serve: Serve, tmp_path: Path, model_packages: dict[str, Path]
) -> None:
    served = serve("digits:1")
    served.repo.store.install(model_packages["digits:2"])  # installed, not loaded
    broken(served, tmp_path)
    stub = served.stub()

    rows = [(m.name, m.version, m.state) for m in stub.RepositoryIndex(pb.RepositoryIndexRequest()).models]
    assert rows == [("broken", "1", "UNAVAILABLE"), ("digits", "1", "READY"), ("digits", "2", "UNAVAILABLE")]
    index = {(m.name, m.version): m.reason for m in stub.RepositoryIndex(pb.RepositoryIndexRequest()).models}
    assert "onnxruntime cannot load" in index[("broken", "1")]
    assert "not loaded" in index[("digits", "2")]
    ready = stub.RepositoryIndex(pb.RepositoryIndexRequest(ready=True)).models
    assert [(m.name, m.version) for m in ready] == [("digits", "1")]

    error = rpc_error(lambda: stub.RepositoryIndex(pb.RepositoryIndexRequest(repository_name="other")))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "one model repository" in error.details()


def test_model_config_describes_tensors_without_the_batch_axis(serve: Serve, int_package: Path) -> None:
    served = serve("digits:1", int_package)
    stub = served.stub()
    config = stub.ModelConfig(pb.ModelConfigRequest(name="mix")).config
    assert (config.name, config.platform, config.backend, config.max_batch_size) == (
        "mix",
        "onnxruntime_onnx",
        "onnxruntime",
        16,
    )
    assert [(t.name, t.data_type, list(t.dims)) for t in config.input] == [
        ("a", pb.TYPE_INT8, [4]),
        ("b", pb.TYPE_UINT16, [4]),
    ]
    assert [(t.name, t.data_type) for t in config.output] == [("sum", pb.TYPE_INT32), ("diff", pb.TYPE_INT32)]
    assert config.WhichOneof("scheduling_choice") == "dynamic_batching"
    assert config.dynamic_batching.priority_levels == served.config.inference.priority_levels

    for request, code in (
        (pb.ModelConfigRequest(name="nope"), grpc.StatusCode.NOT_FOUND),
        (pb.ModelConfigRequest(name="mix", version="x"), grpc.StatusCode.INVALID_ARGUMENT),
    ):
        assert rpc_error(lambda r=request: stub.ModelConfig(r)).code() == code  # type: ignore[misc]


def test_every_kserve_datatype_has_a_triton_data_type() -> None:
    from edge_runtime.inference.tensors import DATATYPES

    assert set(DATATYPES) <= set(DATA_TYPES)


@pytest.mark.parametrize("call", ["RepositoryModelLoad", "RepositoryModelUnload"])
def test_load_and_unload_are_unimplemented_naming_the_alternative(serve: Serve, call: str) -> None:
    stub = serve("digits:1").stub()
    request = getattr(pb, f"{call}Request")(model_name="digits")
    error = rpc_error(lambda: getattr(stub, call)(request))
    assert error.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "fleetctl models assign" in error.details() and "edge-agent install" in error.details()
    assert stub.ServerLive(pb.ServerLiveRequest()).live  # the server is unharmed


def test_health_follows_server_ready(serve: Serve, tmp_path: Path) -> None:
    served = serve("digits:1")
    assert health(served) == SERVING
    assert health(served, INFERENCE_SERVICE) == SERVING
    broken(served, tmp_path)  # strict readiness: a model that should serve serves nothing
    assert health(served) == NOT_SERVING
    assert health(served, INFERENCE_SERVICE) == NOT_SERVING
    error = rpc_error(lambda: health(served, "no.such.Service"))
    assert error.code() == grpc.StatusCode.NOT_FOUND


def test_health_is_not_serving_once_the_server_stops(serve: Serve) -> None:
    served = serve("digits:1")
    assert served.server.health is not None
    served.loop.run(served.server.health.stopping())
    assert health(served) == NOT_SERVING
    assert health(served, INFERENCE_SERVICE) == NOT_SERVING


def test_reflection_lists_and_describes_the_services(serve: Serve) -> None:
    served = serve("digits:1")
    channel = grpc.insecure_channel(served.tcp)
    served.channels.append(channel)
    database = ProtoReflectionDescriptorDatabase(channel)
    services = set(database.get_services())
    assert {INFERENCE_SERVICE, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= services
    # A separate pool: the default one already holds our descriptors and would answer without the server.
    pool = DescriptorPool(database)
    kserve = pool.FindServiceByName(INFERENCE_SERVICE)
    assert {"ModelInfer", "RepositoryIndex", "ModelConfig"} <= {m.name for m in kserve.methods}
    infer = pool.FindMessageTypeByName("inference.ModelInferRequest")
    assert "raw_input_contents" in infer.fields_by_name
