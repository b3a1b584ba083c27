"""Every check `edge-agent run` makes of a config before it opens anything, in one place.

`check-config` and `doctor` call `preflight` too, so a config they accept is one `run` accepts: the listen
addresses (loopback-only plaintext inference API, the Unix socket path's length, metrics host:port), the
device token, cloud-sync's address and CA, and the control transport's settings. Reads the files the
config names (token, CA, client certificate); opens no socket and writes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

from edge_runtime.config import AgentConfig
from edge_runtime.kserve.http import check_http_addresses
from edge_runtime.kserve.server import check_addresses, parse_tcp_address
from edge_runtime.sync.control import ControlTransport
from edge_runtime.sync.transports import open_control
from edge_runtime.sync.uplink import CloudChannel, read_token

__all__ = ["Preflight", "preflight"]


@dataclass(frozen=True)
class Preflight:
    """What the checks read, for the agent to use rather than read twice."""

    token: str | None
    cloud: CloudChannel | None
    control: ControlTransport | None  # built, not started


def preflight(config: AgentConfig) -> Preflight:
    """Raise ConfigError naming the key for anything `run` would refuse; the token and channel read otherwise."""
    check_addresses(config.server)
    check_http_addresses(config.server)
    if config.server.metrics_address:
        parse_tcp_address(config.server.metrics_address, "server.metrics_address")
    token = read_token(config.cloud) if config.cloud.grpc_target or config.cloud.token_file else None
    cloud = CloudChannel.read(config.cloud) if config.cloud.grpc_target else None
    control = open_control(config, token, cloud)  # not started: building it checks the transport's settings
    return Preflight(token, cloud, control)
