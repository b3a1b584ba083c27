"""Device downloads from a real cloud-sync over gRPC: signed manifest first, chunks by offset, resumable;
only what the device's desired state assigns it, only with a live credential."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest

from cloud_sync.registry import ModelRegistry
from cloud_sync.registry.artifacts import CHUNK_BYTES
from edgefleet.proto.edgefleet.v1 import services_pb2, services_pb2_grpc
from edgefleet.proto.edgefleet.v1.models_pb2 import ModelRef
from edgefleet.signing import verify_envelope
from tests.cloud_inprocess import InProcessCloud

from .conftest import assign
from .helpers import FAR_FUTURE_MS, package


@pytest.fixture
def channel(cloud: InProcessCloud) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(cloud.target) as ch:
        yield ch


def _download(
    channel: grpc.Channel, token: str | None, name: str, version: int, offset: int = 0, file: str = ""
) -> list[services_pb2.DownloadChunk]:
    stub = services_pb2_grpc.ArtifactsStub(channel)
    request = services_pb2.DownloadRequest(model=ModelRef(name=name, version=version), offset=offset, file=file)
    metadata = [("authorization", f"Bearer {token}")] if token is not None else None
    return list(stub.Download(request, metadata=metadata, timeout=20))


def _code(call: object) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as failed:
        call()  # type: ignore[operator]
    return failed.value.code(), failed.value.details()


def test_an_assigned_model_downloads_whole_and_its_manifest_verifies(
    cloud: InProcessCloud, registry: ModelRegistry, channel: grpc.Channel
) -> None:
    manifest, model, warmup = package(registry.blobs, "digits", 1, size=3 * CHUNK_BYTES + 5, warmup=1000)
    registry.register(manifest, FAR_FUTURE_MS)
    token = cloud.add_device("cam-1")
    assign(cloud, "cam-1", ("digits", 1))
    chunks = _download(channel, token, "digits", 1)
    first, data = chunks[0], chunks[1:]
    assert first.WhichOneof("body") == "manifest" and first.total_size == len(model)
    envelope = verify_envelope(
        registry.signer.public_key,
        first.manifest.manifest_json,
        first.manifest.signature,
        first.manifest.key_id,
        now_ms=0,
    )
    assert envelope.manifest == manifest
    assert [c.offset for c in data] == [0, CHUNK_BYTES, 2 * CHUNK_BYTES, 3 * CHUNK_BYTES]
    assert b"".join(c.data for c in data) == model
    assert warmup is not None
    warm = _download(channel, token, "digits", 1, file="warmup.npz")
    assert warm[0].total_size == len(warmup) and b"".join(c.data for c in warm[1:]) == warmup


def test_a_download_resumes_from_the_offset_the_device_holds(
    cloud: InProcessCloud, registry: ModelRegistry, channel: grpc.Channel
) -> None:
    manifest, model, _ = package(registry.blobs, "digits", 1, size=CHUNK_BYTES + 1000)
    registry.register(manifest, FAR_FUTURE_MS)
    token = cloud.add_device("cam-1")
    assign(cloud, "cam-1", ("digits", 1))
    rest = _download(channel, token, "digits", 1, offset=777)
    assert rest[0].offset == 777 and rest[1].offset == 777
    assert model[:777] + b"".join(c.data for c in rest[1:]) == model
    at_end = _download(channel, token, "digits", 1, offset=len(model))
    assert len(at_end) == 1 and at_end[0].WhichOneof("body") == "manifest"


def test_downloads_the_device_may_not_make_are_refused(
    cloud: InProcessCloud, registry: ModelRegistry, channel: grpc.Channel
) -> None:
    for version in (1, 2):
        registry.register(package(registry.blobs, "digits", version)[0], FAR_FUTURE_MS)
    token = cloud.add_device("cam-1")
    code, details = _code(lambda: _download(channel, token, "digits", 1))  # no desired state yet
    assert code == grpc.StatusCode.PERMISSION_DENIED and "digits:1 is not assigned" in details
    assign(cloud, "cam-1", ("digits", 1))
    assert _code(lambda: _download(channel, token, "digits", 2))[0] == grpc.StatusCode.PERMISSION_DENIED
    assert _code(lambda: _download(channel, None, "digits", 1))[0] == grpc.StatusCode.UNAUTHENTICATED
    assert _code(lambda: _download(channel, "efd_nobody", "digits", 1))[0] == grpc.StatusCode.UNAUTHENTICATED
    code, details = _code(lambda: _download(channel, token, "digits", 1, file="../cloud-sync.db"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "is not one of" in details
    code, details = _code(lambda: _download(channel, token, "digits", 1, file="warmup.npz"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "has no warmup.npz" in details
    assert _code(lambda: _download(channel, token, "Digits!", 1))[0] == grpc.StatusCode.INVALID_ARGUMENT
    code, details = _code(lambda: _download(channel, token, "digits", 1, offset=10**9))
    assert code == grpc.StatusCode.OUT_OF_RANGE and "past the end" in details


def test_a_blob_lost_from_the_store_is_not_found_not_an_internal_error(
    cloud: InProcessCloud, registry: ModelRegistry, channel: grpc.Channel
) -> None:
    manifest = registry.register(package(registry.blobs, "digits", 1)[0], FAR_FUTURE_MS)
    token = cloud.add_device("cam-1")
    assign(cloud, "cam-1", ("digits", 1))
    registry.blobs.delete(manifest.sha256)  # a shared blob directory someone cleaned by hand
    code, details = _code(lambda: _download(channel, token, "digits", 1))
    assert code == grpc.StatusCode.NOT_FOUND and manifest.sha256 in details


def test_a_revoked_device_cannot_download(
    cloud: InProcessCloud, registry: ModelRegistry, channel: grpc.Channel
) -> None:
    registry.register(package(registry.blobs, "digits", 1)[0], FAR_FUTURE_MS)
    token = cloud.add_device("cam-1")
    assign(cloud, "cam-1", ("digits", 1))
    cloud.revoke("cam-1")  # before the token was ever used: nothing cached
    # The shared authenticator's answer for a revoked credential (PERMISSION_DENIED "revoked" since stream E).
    code, _ = _code(lambda: _download(channel, token, "digits", 1))
    assert code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED)
