"""grpc.health.v1 on the agent's gRPC server, so grpc_health_probe, Kubernetes gRPC probes and grpcurl work.

The overall status ("") is SERVING while the agent is ready (ServerReady) and healthy, NOT_SERVING while it
starts, loads, is unhealthy or drains; `inference.GRPCInferenceService` follows ServerReady alone. A Check
reads the truth at once; Watch streams see it within the agent's health tick (grpcio's servicer keeps them).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from grpc_health.v1 import health_pb2
from grpc_health.v1.health import aio as health_aio

__all__ = ["INFERENCE_SERVICE", "AgentHealth"]

INFERENCE_SERVICE = "inference.GRPCInferenceService"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class AgentHealth(health_aio.HealthServicer):  # type: ignore[misc,unused-ignore]  # grpcio ships no stubs
    """The health servicer, fed by `ready()` (ServerReady) and `healthy()` ("" or why not); on the loop only."""

    def __init__(self, ready: Callable[[], bool], healthy: Callable[[], str] = lambda: "") -> None:
        super().__init__()
        self._ready = ready
        self._healthy = healthy
        self._server_status[""] = NOT_SERVING
        self._server_status[INFERENCE_SERVICE] = NOT_SERVING
        self._started = False

    def started(self) -> None:
        """The server listens: from now on the status follows readiness and health."""
        self._started = True

    async def refresh(self) -> None:
        """Set every status from the agent's current readiness and health (wakes Watch streams on change)."""
        if self._gracefully_shutting_down:
            return
        ready = self._started and self._ready()
        overall = SERVING if ready and not self._healthy() else NOT_SERVING
        for service, status in (("", overall), (INFERENCE_SERVICE, SERVING if ready else NOT_SERVING)):
            if self._server_status.get(service) != status:
                await self.set(service, status)

    def add_service(self, name: str) -> None:
        """A service that is SERVING while the server runs (the admin service): probes may name it."""
        self._server_status[name] = SERVING

    async def Check(self, request: health_pb2.HealthCheckRequest, context: Any) -> Any:
        await self.refresh()
        return await super().Check(request, context)

    async def stopping(self) -> None:
        """Draining: NOT_SERVING for every service, for good."""
        await self.enter_graceful_shutdown()
