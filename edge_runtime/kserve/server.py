"""The KServe v2 gRPC server of edge-agent: a grpc.aio server on a Unix socket and/or loopback TCP.

Plaintext is allowed on loopback and Unix sockets only (DESIGN.md "Security"): a non-loopback TCP address
is a config error. Message size limits are set just above server.max_request_bytes, so gRPC itself turns
away an oversized message with RESOURCE_EXHAUSTED before it is buffered whole.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import stat
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import structlog

from edge_runtime.config import ServerSection
from edge_runtime.errors import ConfigError
from edge_runtime.kserve.servicer import KServeServicer, add_to_server
from edge_runtime.models.repository import ModelRepository

__all__ = ["InferenceServer", "check_loopback", "parse_tcp_address"]

log = structlog.get_logger(__name__)

# Protobuf framing and tensor metadata on top of the tensor bytes themselves.
MESSAGE_OVERHEAD = 1 << 20


def parse_tcp_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(f"server.tcp_address {address!r} must be host:port")
    return host.strip("[]"), int(port)


def check_loopback(host: str) -> None:
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ConfigError(
            f"server.tcp_address host {host!r} is not a loopback address; the inference API is plaintext and "
            "local-only: serve apps on this device over the Unix socket or 127.0.0.1"
        )


def _prepare_socket_path(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() or path.is_symlink():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise ConfigError(f"server.unix_socket {path} exists and is not a socket; refusing to replace it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()  # stale: left by an agent that did not shut down cleanly
        else:
            raise ConfigError(f"server.unix_socket {path} is in use by another process (another edge-agent?)")
        finally:
            probe.close()


@dataclass
class InferenceServer:
    """A started server and where it listens."""

    server: grpc.aio.Server
    unix_socket: str = ""
    tcp_port: int = 0
    targets: list[str] = field(default_factory=list)

    @classmethod
    async def start(cls, repository: ModelRepository, config: ServerSection, version: str) -> InferenceServer:
        limit = config.max_request_bytes + MESSAGE_OVERHEAD
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", -1),
                ("grpc.so_reuseport", 0),
            ]
        )
        add_to_server(KServeServicer(repository, config.max_request_bytes, version), server)
        result = cls(server)
        if config.unix_socket:
            path = Path(config.unix_socket)
            _prepare_socket_path(path)
            server.add_insecure_port(f"unix:{path}")
            result.unix_socket = str(path)
            result.targets.append(f"unix:{path}")
        if config.tcp_address:
            host, port = parse_tcp_address(config.tcp_address)
            check_loopback(host)
            try:
                result.tcp_port = server.add_insecure_port(f"{host}:{port}")
            except RuntimeError as exc:
                raise ConfigError(f"cannot listen on server.tcp_address {config.tcp_address}: {exc}") from exc
            result.targets.append(f"{host}:{result.tcp_port}")
        if not result.targets:
            raise ConfigError("neither server.unix_socket nor server.tcp_address is set: apps could not connect")
        await server.start()
        if result.unix_socket:
            # Apps in the agent's group may connect; nobody else on the device.
            os.chmod(result.unix_socket, 0o660)
        log.info("server.listening", targets=result.targets)
        return result

    async def stop(self, grace_s: float) -> None:
        """Refuse new calls at once; let calls in flight finish for up to `grace_s`."""
        await self.server.stop(grace_s)
        if self.unix_socket:
            # Removing a directory entry: nothing to wait for, so not worth a thread hop.
            Path(self.unix_socket).unlink(missing_ok=True)  # noqa: ASYNC240
