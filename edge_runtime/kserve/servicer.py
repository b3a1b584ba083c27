"""The grpc.aio servicer of inference.GRPCInferenceService over a ModelRepository.

Runs on the agent's event loop: it decodes, validates and queues on the loop (microseconds), and awaits
the batcher's future, so a waiting request holds no thread (DESIGN.md "Concurrency on the device").
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc

from edge_runtime.errors import EdgeRuntimeError, InvalidInput, ModelNotFound, ModelNotReady
from edge_runtime.inference import keeping
from edge_runtime.inference.stats import Duration
from edge_runtime.kserve.codec import check_version, decode_request, encode_response
from edge_runtime.kserve.repository import LOAD_UNIMPLEMENTED, model_config, repository_index
from edge_runtime.kserve.shm import SystemSharedMemory
from edge_runtime.kserve.shm_service import SharedMemoryServicer
from edge_runtime.kserve.status import abort_with, guarded
from edge_runtime.kserve.wire import InferWire, parse_infer_request
from edge_runtime.loop_bridge import LoopBridge
from edge_runtime.models.repository import KEEP_WAIT_S, ModelRepository
from edge_runtime.models.served import ServedModel
from edgefleet.proto.inference import grpc_service_pb2 as pb
from edgefleet.proto.inference import grpc_service_pb2_grpc as pb_grpc
from edgefleet.rpc import add_service

__all__ = ["SERVER_NAME", "KServeServicer", "add_to_server"]

SERVER_NAME = "edgefleet-edge-agent"
EXTENSIONS = ["statistics", "parameters", "model_configuration", "model_repository", "shared_memory"]


def add_to_server(servicer: KServeServicer, server: grpc.aio.Server) -> None:
    """Register `servicer` for every RPC of inference.GRPCInferenceService; a body that does not parse
    gets INVALID_ARGUMENT (the generated add_GRPCInferenceServiceServicer_to_server would answer UNKNOWN)."""
    add_service(server, pb, "GRPCInferenceService", servicer, {"ModelInfer": parse_infer_request})


def _duration(target: pb.StatisticDuration, source: Duration) -> None:
    target.count, target.ns = source.count, source.ns


class KServeServicer(SharedMemoryServicer, pb_grpc.GRPCInferenceServiceServicer):
    def __init__(
        self,
        repository: ModelRepository,
        max_request_bytes: int,
        version: str,
        shared_memory: SystemSharedMemory | None = None,
    ) -> None:
        self._repo = repository
        # Regions local apps registered (shm_service.py): the server that passes it in closes it at shutdown.
        self._shm = shared_memory or SystemSharedMemory()
        self._max_bytes = max_request_bytes
        self._version = version
        self._loop_bridge: LoopBridge | None = None

    def _bridge(self) -> LoopBridge:
        if self._loop_bridge is None:  # the servicer is built before the server's loop runs it
            self._loop_bridge = LoopBridge(asyncio.get_running_loop())
        return self._loop_bridge

    async def ServerLive(self, request: pb.ServerLiveRequest, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self._repo.ready())

    async def ModelReady(self, request: pb.ModelReadyRequest, context: Any) -> pb.ModelReadyResponse:
        async def call() -> pb.ModelReadyResponse:
            version = check_version(request.name, request.version)
            try:
                served = self._repo.model(request.name, version)
            except (ModelNotFound, ModelNotReady):
                return pb.ModelReadyResponse(ready=False)  # as Triton: not ready, not an error
            return pb.ModelReadyResponse(ready=served.ready)

        return await guarded(context, call)

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: Any) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=self._version, extensions=EXTENSIONS)

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Any) -> pb.ModelMetadataResponse:
        async def call() -> pb.ModelMetadataResponse:
            served = self._repo.model(request.name, check_version(request.name, request.version))
            m = served.manifest
            versions = sorted(s.version for s in self._repo.models() if s.name == m.name)
            T = pb.ModelMetadataResponse.TensorMetadata
            return pb.ModelMetadataResponse(
                name=m.name,
                versions=[str(v) for v in versions],
                platform=served.engine.info.platform,
                inputs=[T(name=t.name, datatype=t.datatype, shape=t.shape) for t in m.inputs],
                outputs=[T(name=t.name, datatype=t.datatype, shape=t.shape) for t in m.outputs],
            )

        return await guarded(context, call)

    async def ModelInfer(
        self, request: pb.ModelInferRequest | InferWire, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        # Every request's path: written out (no closure, no extra coroutine), see codec.decode_request.
        try:
            # A large request's tensor bytes stay where gRPC put them (kserve/wire.py).
            message, raw = (request.message, request.raw) if isinstance(request, InferWire) else (request, None)
            infer = decode_request(message, self._max_bytes, self._shm, raw)
            remaining = context.time_remaining()
            if remaining is not None:  # a request the client stopped waiting for must not run
                infer.timeout_s = remaining if infer.timeout_s is None else min(infer.timeout_s, remaining)
            _served, future = self._repo.submit_awaitable(infer)
            # Cancelling this await (client gone, deadline) cancels the queued request too.
            bridge = self._loop_bridge or self._bridge()
            response = await bridge.wrap(future)
            if response.kept is not None:  # answer once the kept result is on disk
                try:
                    await asyncio.wait_for(bridge.wrap(response.kept), KEEP_WAIT_S)
                except (EdgeRuntimeError, asyncio.TimeoutError) as exc:
                    keeping.settle_kept(response, exc)
                else:
                    keeping.settle_kept(response, None)
            return encode_response(response, self._shm, message)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await abort_with(context, exc)
            raise AssertionError("unreachable: abort raises") from None  # pragma: no cover

    async def ModelStatistics(self, request: pb.ModelStatisticsRequest, context: Any) -> pb.ModelStatisticsResponse:
        async def call() -> pb.ModelStatisticsResponse:
            if request.name:
                selected = [self._repo.model(request.name, check_version(request.name, request.version))]
            elif request.version:
                raise InvalidInput("a version needs a model name")
            else:
                selected = sorted(self._repo.models(), key=lambda s: (s.name, s.version))
            return pb.ModelStatisticsResponse(model_stats=[self._statistics(s) for s in selected])

        return await guarded(context, call)

    async def ModelConfig(self, request: pb.ModelConfigRequest, context: Any) -> pb.ModelConfigResponse:
        async def call() -> pb.ModelConfigResponse:
            served = self._repo.model(request.name, check_version(request.name, request.version))
            return pb.ModelConfigResponse(config=model_config(served))

        return await guarded(context, call)

    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context: Any) -> pb.RepositoryIndexResponse:
        async def call() -> pb.RepositoryIndexResponse:
            if request.repository_name:
                raise InvalidInput(
                    f"edge-agent has one model repository; leave repository_name empty, not {request.repository_name!r}"
                )
            # The installed versions are directories on disk: listed off the loop.
            installed = await asyncio.to_thread(self._installed)
            rows = repository_index(self._repo.status(), installed, ready_only=request.ready)
            return pb.RepositoryIndexResponse(models=rows)

        return await guarded(context, call)

    def _installed(self) -> dict[str, list[int]]:
        store = self._repo.store
        return {name: store.versions(name) for name in store.names()}

    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryModelLoadResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, LOAD_UNIMPLEMENTED)
        raise AssertionError("unreachable: abort raises")  # pragma: no cover

    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryModelUnloadResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, LOAD_UNIMPLEMENTED)
        raise AssertionError("unreachable: abort raises")  # pragma: no cover

    @staticmethod
    def _statistics(served: ServedModel) -> pb.ModelStatistics:
        snap = served.stats.snapshot()
        msg = pb.ModelStatistics(
            name=served.name,
            version=served.version_str,
            last_inference=snap.last_inference_ms,
            inference_count=snap.inference_count,
            execution_count=snap.execution_count,
        )
        _duration(msg.inference_stats.success, snap.success)
        _duration(msg.inference_stats.fail, snap.fail)
        _duration(msg.inference_stats.queue, snap.queue)
        _duration(msg.inference_stats.compute_infer, snap.compute_infer)
        for size in sorted(snap.batches):
            batch = msg.batch_stats.add(batch_size=size)
            _duration(batch.compute_infer, snap.batches[size])
        return msg
