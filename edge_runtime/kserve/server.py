"""The KServe v2 gRPC server of edge-agent: a grpc.aio server on a Unix socket and/or loopback TCP.

Plaintext is allowed on loopback and Unix sockets only (DESIGN.md "Security"): a non-loopback TCP address
is a config error. Message size limits are set just above server.max_request_bytes, so gRPC itself turns
away an oversized message with RESOURCE_EXHAUSTED before it is buffered whole.
"""

from __future__ import annotations

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
from edgefleet.addresses import AddressError, is_loopback, parse_host_port
from edgefleet.durable import hold_lock

__all__ = ["InferenceServer", "check_loopback", "parse_tcp_address"]

log = structlog.get_logger(__name__)

# sockaddr_un.sun_path holds 108 bytes, one of them the terminating NUL.
MAX_SOCKET_PATH = 107
# Protobuf framing and tensor metadata on top of the tensor bytes themselves.
MESSAGE_OVERHEAD = 1 << 20


def parse_tcp_address(address: str, key: str = "server.tcp_address") -> tuple[str, int]:
    """host:port of the config key `key`; ConfigError naming the key otherwise."""
    try:
        return parse_host_port(address)
    except AddressError as exc:
        raise ConfigError(f"{key}: {exc}") from None


def check_loopback(host: str) -> None:
    if not is_loopback(host):
        raise ConfigError(
            f"server.tcp_address host {host!r} is not a loopback address; the inference API is plaintext and "
            "local-only: serve apps on this device over the Unix socket or 127.0.0.1"
        )


def _lock_socket_path(path: Path) -> int:
    """Hold {socket}.lock for the server's life: two agents starting at once cannot both pass the probe
    below (grpc would silently unbind the first one's socket). The kernel drops the lock on kill -9."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = hold_lock(Path(f"{path}.lock"))
    if fd is None:
        raise ConfigError(f"server.unix_socket {path} is in use by another process (another edge-agent?)")
    return fd


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
    _lock_fd: int = -1

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
        try:
            result._listen(config)
            await server.start()
        except BaseException:
            result._release_lock()
            raise
        if result.unix_socket:
            # Apps in the agent's group may connect; nobody else on the device.
            os.chmod(result.unix_socket, 0o660)
        log.info("server.listening", targets=result.targets)
        return result

    def _listen(self, config: ServerSection) -> None:
        if config.unix_socket:
            path = Path(config.unix_socket)
            if len(os.fsencode(path)) > MAX_SOCKET_PATH:
                raise ConfigError(
                    f"server.unix_socket {path} is longer than the {MAX_SOCKET_PATH} bytes a Unix socket path may have"
                )
            self._lock_fd = _lock_socket_path(path)
            _prepare_socket_path(path)
            try:
                self.server.add_insecure_port(f"unix:{path}")
            except RuntimeError as exc:
                raise ConfigError(f"cannot listen on server.unix_socket {path}: {exc}") from exc
            self.unix_socket = str(path)
            self.targets.append(f"unix:{path}")
        if config.tcp_address:
            host, port = parse_tcp_address(config.tcp_address)
            check_loopback(host)
            try:
                self.tcp_port = self.server.add_insecure_port(f"{host}:{port}")
            except RuntimeError as exc:
                raise ConfigError(f"cannot listen on server.tcp_address {config.tcp_address}: {exc}") from exc
            self.targets.append(f"{host}:{self.tcp_port}")
        if not self.targets:
            raise ConfigError("neither server.unix_socket nor server.tcp_address is set: apps could not connect")

    async def stop(self, grace_s: float) -> None:
        """Refuse new calls at once; let calls in flight finish for up to `grace_s`."""
        await self.server.stop(grace_s)
        if self.unix_socket:
            # Removing a directory entry: nothing to wait for, so not worth a thread hop.
            Path(self.unix_socket).unlink(missing_ok=True)  # noqa: ASYNC240
        self._release_lock()

    def _release_lock(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1
