"""The gRPC edge of Triton's system and CUDA shared-memory extensions: the RPCs KServeServicer inherits.

Registration opens and maps files, so it runs on a worker thread; status and unregister only touch the
registry (and unregister never blocks on a request that still reads a region: its unmap is deferred).
"""

from __future__ import annotations

import asyncio
from typing import Any

from edge_runtime.kserve.shm import SystemSharedMemory
from edge_runtime.kserve.status import guarded
from edgefleet.proto.inference import grpc_service_pb2 as pb

__all__ = ["SharedMemoryServicer"]


class SharedMemoryServicer:
    """Mixin of KServeServicer, which sets `_shm`: the registry its ModelInfer hands to the codec."""

    _shm: SystemSharedMemory

    async def SystemSharedMemoryStatus(
        self, request: pb.SystemSharedMemoryStatusRequest, context: Any
    ) -> pb.SystemSharedMemoryStatusResponse:
        async def call() -> pb.SystemSharedMemoryStatusResponse:
            response = pb.SystemSharedMemoryStatusResponse()
            for region in self._shm.status(request.name):
                response.regions[region.name].CopyFrom(
                    pb.SystemSharedMemoryStatusResponse.RegionStatus(
                        name=region.name, key=region.key, offset=region.offset, byte_size=region.byte_size
                    )
                )
            return response

        return await guarded(context, call)

    async def SystemSharedMemoryRegister(
        self, request: pb.SystemSharedMemoryRegisterRequest, context: Any
    ) -> pb.SystemSharedMemoryRegisterResponse:
        async def call() -> pb.SystemSharedMemoryRegisterResponse:
            await asyncio.to_thread(self._shm.register, request.name, request.key, request.offset, request.byte_size)
            return pb.SystemSharedMemoryRegisterResponse()

        return await guarded(context, call)

    async def SystemSharedMemoryUnregister(
        self, request: pb.SystemSharedMemoryUnregisterRequest, context: Any
    ) -> pb.SystemSharedMemoryUnregisterResponse:
        async def call() -> pb.SystemSharedMemoryUnregisterResponse:
            self._shm.unregister(request.name)
            return pb.SystemSharedMemoryUnregisterResponse()

        return await guarded(context, call)

    async def CudaSharedMemoryStatus(
        self, request: pb.CudaSharedMemoryStatusRequest, context: Any
    ) -> pb.CudaSharedMemoryStatusResponse:
        async def call() -> pb.CudaSharedMemoryStatusResponse:
            response = pb.CudaSharedMemoryStatusResponse()
            for region in self._shm.cuda_status(request.name):
                response.regions[region.name].CopyFrom(
                    pb.CudaSharedMemoryStatusResponse.RegionStatus(
                        name=region.name, device_id=region.device_id, byte_size=region.byte_size
                    )
                )
            return response

        return await guarded(context, call)

    async def CudaSharedMemoryRegister(
        self, request: pb.CudaSharedMemoryRegisterRequest, context: Any
    ) -> pb.CudaSharedMemoryRegisterResponse:
        async def call() -> pb.CudaSharedMemoryRegisterResponse:
            await asyncio.to_thread(
                self._shm.register_cuda, request.name, request.raw_handle, request.device_id, request.byte_size
            )
            return pb.CudaSharedMemoryRegisterResponse()

        return await guarded(context, call)

    async def CudaSharedMemoryUnregister(
        self, request: pb.CudaSharedMemoryUnregisterRequest, context: Any
    ) -> pb.CudaSharedMemoryUnregisterResponse:
        async def call() -> pb.CudaSharedMemoryUnregisterResponse:
            await asyncio.to_thread(self._shm.unregister, request.name, True)
            return pb.CudaSharedMemoryUnregisterResponse()

        return await guarded(context, call)
