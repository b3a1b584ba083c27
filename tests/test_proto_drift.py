"""The checked-in generated code matches protos/: regenerate and compare, file by file."""

from __future__ import annotations

from pathlib import Path

from protos.generate import TARGET, differences, generate


def test_generated_code_matches_the_protos(tmp_path: Path) -> None:
    fresh = tmp_path / "proto"
    fresh.mkdir()
    generate(fresh)
    drift = differences(fresh, TARGET)
    assert drift == [], f"edgefleet/proto is stale in {drift}: run `make protos` and commit the result"


def test_both_packages_can_import_the_generated_messages() -> None:
    from edgefleet.proto.edgefleet.v1 import results_pb2, services_pb2_grpc, state_pb2
    from edgefleet.proto.inference import grpc_service_pb2

    batch = results_pb2.ResultBatch(records=[results_pb2.ResultRecord(seq=1, payload=b"x")])
    assert results_pb2.ResultBatch.FromString(batch.SerializeToString()) == batch
    assert state_pb2.ModelState.Name(state_pb2.MODEL_STATE_READY) == "MODEL_STATE_READY"
    assert hasattr(services_pb2_grpc, "UplinkStub")
    assert grpc_service_pb2.DESCRIPTOR.package == "inference"
