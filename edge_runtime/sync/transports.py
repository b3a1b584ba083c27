"""Which control transport a config asks for: MQTT through a broker, the gRPC stream to cloud-sync, or none.

The interface is edge_runtime/sync/control.py's; the two transports are mqtt.py and grpc_control.py.
"""

from __future__ import annotations

from edge_runtime.config import AgentConfig
from edge_runtime.errors import ConfigError
from edge_runtime.sync.control import ControlTransport
from edge_runtime.sync.grpc_control import GrpcControl
from edge_runtime.sync.mqtt import MqttLink
from edge_runtime.sync.uplink import CloudChannel

__all__ = ["open_control"]


def open_control(
    config: AgentConfig, token: str | None, channel: CloudChannel | None = None
) -> ControlTransport | None:
    """The transport `config` asks for, not started: MQTT when mqtt.url is set, else the gRPC stream to
    cloud.grpc_target, else None (a standalone agent). Reads certificate files: call it off the loop.

    `token` is the device token (None when cloud.token_file is not set): the gRPC stream's credential, and
    the broker password. `channel`: cloud.grpc_target and its CA as the agent read them already (read here
    otherwise).
    """
    device_id = config.cloud.device_id
    if config.mqtt.url:
        if not device_id:
            raise ConfigError("mqtt.url is set but cloud.device_id is not: topics are named after the device")
        return MqttLink.from_config(config, token=token)
    if config.cloud.grpc_target:
        if not device_id:
            raise ConfigError(
                "cloud.grpc_target is set but cloud.device_id is not: telemetry and reported state name the device"
            )
        if not token:
            raise ConfigError("cloud.token_file is not set: the control stream needs the device token")
        return GrpcControl(config.cloud, device_id, token, channel=channel)
    return None
