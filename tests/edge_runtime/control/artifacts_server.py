"""A scripted Artifacts server for the device's download tests: a real grpc.aio server on a loopback port,
serving packages from memory and making, on cue, the faults a registry cannot produce on demand (a stream cut
after N bytes, a stall, a wrong offset, more bytes than the manifest says).

Until cloud-sync's registry (cloud_sync/registry/artifacts.py) is the server of these tests, this one keeps
its contract: a bearer token, the signed manifest first with the file's total size, then chunks from the offset.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_runtime.inference.tensors import TensorSpec
from edge_runtime.models.package import MODEL_FILE, WARMUP_FILE, ModelManifest, Warmup
from edgefleet import rpc
from edgefleet.proto.edgefleet.v1 import services_pb2
from edgefleet.proto.edgefleet.v1.models_pb2 import SignedManifest
from edgefleet.signing import public_key_bytes, sign_manifest
from tests.loopcheck import LoopThread

CHUNK = 64 * 1024
FAR_FUTURE_MS = 4_102_444_800_000  # 2100-01-01
TOKEN = "device-token-1"


def manifest_for(name: str, version: int, model: bytes, warmup: bytes | None = None) -> dict[str, Any]:
    """A valid package manifest describing these bytes (the ONNX is not parsed on the download path)."""
    spec = TensorSpec("x", "FP32", (1, 4))
    return ModelManifest(
        name=name,
        version=version,
        inputs=(spec,),
        outputs=(TensorSpec("y", "FP32", (1, 2)),),
        sha256=hashlib.sha256(model).hexdigest(),
        size=len(model),
        created="2026-01-01T00:00:00Z",
        warmup=Warmup({"x": (1, 4)}, WARMUP_FILE, hashlib.sha256(warmup).hexdigest(), len(warmup))
        if warmup is not None
        else None,
    ).to_dict()


class Signer:
    """The fleet's signing key, as the registry holds it."""

    def __init__(self) -> None:
        self.key = Ed25519PrivateKey.generate()
        self.public_key = public_key_bytes(self.key)
        self.serial = 0

    def sign(
        self, manifest: dict[str, Any], *, serial: int | None = None, expires_at_ms: int = FAR_FUTURE_MS
    ) -> SignedManifest:
        if serial is None:
            self.serial += 1
            serial = self.serial
        body, signature, kid = sign_manifest(
            self.key, manifest, serial=serial, signed_at_ms=1_700_000_000_000, expires_at_ms=expires_at_ms
        )
        return SignedManifest(manifest_json=body, signature=signature, key_id=kid)


@dataclass
class Package:
    signed: SignedManifest
    files: dict[str, bytes]


@dataclass
class Faults:
    """What the next calls do wrong. Lists are consumed one entry per call."""

    cut_after: list[int] = field(default_factory=list)  # abort UNAVAILABLE after this many data bytes
    stall_after: list[int] = field(default_factory=list)  # stop sending (stream left open) after this many
    wrong_offset: bool = False  # each chunk claims an offset one byte later than it is
    announce_size: int | None = None  # total_size to announce instead of the file's
    data_first: bool = False  # send a data chunk before the manifest
    refuse: grpc.StatusCode | None = None  # abort every call with this code


class ScriptedArtifacts:
    """edgefleet.v1.Artifacts over packages held in memory, with Faults."""

    def __init__(self, token: str = TOKEN) -> None:
        self.token = token
        self.packages: dict[tuple[str, int], Package] = {}
        self.faults = Faults()
        self.requests: list[tuple[str, int, str, int]] = []  # (name, version, file, offset)
        self.data_bytes_sent = 0
        self._stalled = asyncio.Event()  # never set: a stall lasts until the client gives up

    def add(self, name: str, version: int, signed: SignedManifest, files: dict[str, bytes]) -> None:
        self.packages[(name, version)] = Package(signed, files)

    async def Download(
        self, request: services_pb2.DownloadRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[services_pb2.DownloadChunk]:
        name, version, file = request.model.name, request.model.version, request.file or MODEL_FILE
        self.requests.append((name, version, file, request.offset))
        if dict(context.invocation_metadata()).get("authorization") != f"Bearer {self.token}":
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "unknown device token")
        if self.faults.refuse is not None:
            await context.abort(self.faults.refuse, "refused by the test")
        package = self.packages.get((name, version))
        if package is None:
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED, f"model {name}:{version} is not assigned to this device"
            )
        assert package is not None
        if file not in package.files:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"no file {file!r} in {name}:{version}")
        data = package.files[file]
        if request.offset > len(data):
            await context.abort(
                grpc.StatusCode.OUT_OF_RANGE, f"offset {request.offset} is past the file's {len(data)} bytes"
            )
        total = self.faults.announce_size if self.faults.announce_size is not None else len(data)
        cut = self.faults.cut_after.pop(0) if self.faults.cut_after else None
        stall = self.faults.stall_after.pop(0) if self.faults.stall_after else None
        if self.faults.data_first:
            yield services_pb2.DownloadChunk(data=b"x", offset=request.offset, total_size=total)
        yield services_pb2.DownloadChunk(manifest=package.signed, total_size=total)
        sent = 0
        for at in range(request.offset, len(data), CHUNK):
            piece = data[at : at + CHUNK]
            if cut is not None and sent + len(piece) > cut:
                piece = piece[: cut - sent]
                if piece:
                    yield self._chunk(piece, at)
                await context.abort(grpc.StatusCode.UNAVAILABLE, "connection cut by the test")
            if stall is not None and sent + len(piece) > stall:
                await self._stalled.wait()
            yield self._chunk(piece, at)
            sent += len(piece)

    def _chunk(self, piece: bytes, at: int) -> services_pb2.DownloadChunk:
        self.data_bytes_sent += len(piece)
        offset = at + 1 if self.faults.wrong_offset else at
        return services_pb2.DownloadChunk(data=piece, offset=offset)


class ArtifactsServer:
    """ScriptedArtifacts on a real grpc.aio server, on its own loop thread, on a free loopback port."""

    def __init__(self, artifacts: ScriptedArtifacts) -> None:
        self.artifacts = artifacts
        self.loop = LoopThread("test-artifacts-server")
        self.server: grpc.aio.Server | None = None
        self.port = 0

    def start(self) -> ArtifactsServer:
        async def start() -> None:
            self.server = grpc.aio.server()
            rpc.add_service(self.server, services_pb2, "Artifacts", self.artifacts)
            self.port = self.server.add_insecure_port("127.0.0.1:0")
            await self.server.start()

        self.loop.run(start())
        return self

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def close(self) -> None:
        if self.server is not None:
            self.loop.run(self.server.stop(grace=None))
        self.loop.close()


def random_bytes(size: int) -> bytes:
    return os.urandom(size)
