"""grpc.health.v1 on cloud-sync's device port, which also tells the caller cloud-sync's clock.

Load balancers and Kubernetes probe it the standard way; `edge-agent doctor` reads the clock from the answer's
initial metadata (`edgefleet-server-time-ms`, milliseconds since the epoch) to measure the device's skew,
since no other answer cloud-sync gives carries its time.
"""

from __future__ import annotations

import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

__all__ = ["SERVER_TIME_KEY", "add_health"]

SERVER_TIME_KEY = "edgefleet-server-time-ms"


class _ClockedHealth(health_aio.HealthServicer):  # type: ignore[misc]
    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> health_pb2.HealthCheckResponse:
        await context.send_initial_metadata(((SERVER_TIME_KEY, str(time.time_ns() // 1_000_000)),))
        return await super().Check(request, context)


def add_health(server: grpc.aio.Server) -> None:
    """Serve grpc.health.v1: the whole server ("") SERVING for as long as it runs."""
    servicer = _ClockedHealth()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
