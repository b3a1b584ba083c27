"""The control transport: how the agent talks to the cloud's control plane (edge_runtime/sync/transports.py
picks the one a config asks for).

Two implementations: MQTT through a broker (`MqttLink`, edge_runtime/sync/mqtt.py) and a gRPC stream to
cloud-sync (`GrpcControl`, edge_runtime/sync/grpc_control.py), the embedded default when no broker is set.
Not what is done with a desired state (edge_runtime/agent/process.py) nor what telemetry says.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from edgefleet.proto.edgefleet.v1.state_pb2 import DesiredState, ReportedState

__all__ = ["ControlTransport", "DesiredHandler"]

DesiredHandler = Callable[[DesiredState], None]


class ControlTransport(Protocol):
    """The device's side of the control plane, whatever carries it.

    Every method is called on the agent's event loop and returns at once: publishing never waits on the
    network. While disconnected a transport keeps only the newest telemetry and the newest reported state
    (latest wins: an old window or an old state is worth nothing once a newer exists) and sends them when it
    is connected again; it reconnects by itself, with backoff, until closed.
    """

    @property
    def connected(self) -> bool:
        """Whether the cloud hears this device now (the broker connection, or the open WatchDesired stream)."""
        ...

    def start(self, on_desired: DesiredHandler | None = None) -> None:
        """Connect (in the background); `on_desired` is called on the loop with each DesiredState received."""
        ...

    def publish_telemetry(self, payload: bytes) -> None:
        """Send a serialized edgefleet.v1.Telemetry (the newest one only, if it cannot go now)."""
        ...

    def publish_reported(self, state: ReportedState) -> None:
        """Send the device's reported state (the newest one only, if it cannot go now)."""
        ...

    async def aclose(self) -> None:
        """Say goodbye where the transport can (status offline), disconnect, and stop its background work."""
        ...
