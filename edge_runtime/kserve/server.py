"""The KServe v2 gRPC server of edge-agent: a grpc.aio server on a Unix socket and/or loopback TCP.

Beside KServe it serves grpc.health.v1 (kserve/health.py), server reflection (so grpcurl needs no .proto
files) and, when the agent gives one, its local admin service (edgefleet.v1.AgentAdmin: `edge-agent status`).

Plaintext is allowed on loopback and Unix sockets only (DESIGN.md "Security"): a non-loopback TCP address
is a config error. Message size limits are set just above server.max_request_bytes, so gRPC itself turns
away an oversized message with RESOURCE_EXHAUSTED before it is buffered whole.
"""

from __future__ import annotations

import asyncio
import os
import socket
import stat
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from edge_runtime.config import ServerSection
from edge_runtime.errors import ConfigError
from edge_runtime.kserve.health import INFERENCE_SERVICE, AgentHealth
from edge_runtime.kserve.servicer import KServeServicer, add_to_server
from edge_runtime.kserve.shm import SystemSharedMemory
from edge_runtime.models.repository import ModelRepository
from edgefleet.addresses import AddressError, is_loopback, parse_host_port
from edgefleet.durable import hold_lock
from edgefleet.proto.edgefleet.v1 import admin_pb2
from edgefleet.rpc import add_service

__all__ = [
    "InferenceServer",
    "check_addresses",
    "check_loopback",
    "claim_socket_path",
    "on_file_thread",
    "parse_tcp_address",
    "release_socket_path",
]

log = structlog.get_logger(__name__)
T = TypeVar("T")

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


def check_loopback(host: str, key: str = "server.tcp_address") -> None:
    """ConfigError naming the config key `key` unless `host` is a loopback address."""
    if not is_loopback(host):
        raise ConfigError(
            f"{key} host {host!r} is not a loopback address; the inference API is plaintext and "
            "local-only: serve apps on this device over the Unix socket or 127.0.0.1"
        )


def check_addresses(config: ServerSection) -> tuple[Path | None, tuple[str, int] | None]:
    """The Unix socket path and loopback (host, port) the server section asks for; ConfigError naming the key
    for one the server could not or must not listen on (edge_runtime/agent/preflight.py runs this too)."""
    path = Path(config.unix_socket) if config.unix_socket else None
    if path is not None and len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise ConfigError(
            f"server.unix_socket {path} is longer than the {MAX_SOCKET_PATH} bytes a Unix socket path may have"
        )
    tcp = parse_tcp_address(config.tcp_address) if config.tcp_address else None
    if tcp is not None:
        check_loopback(tcp[0])
    if path is None and tcp is None:
        raise ConfigError("neither server.unix_socket nor server.tcp_address is set: apps could not connect")
    return path, tcp


def claim_socket_path(path: Path, key: str = "server.unix_socket") -> int:
    """Make the socket's directory, take {socket}.lock and clear a stale socket; returns the lock's fd.
    ConfigErrors name the config key `key`.

    The lock is held for the server's life: two agents starting at once cannot both pass the probe below
    (grpc would silently unbind the first one's socket). The kernel drops it on kill -9.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = hold_lock(Path(f"{path}.lock"))
    if fd is None:
        raise ConfigError(f"{key} {path} is in use by another process (another edge-agent?)")
    try:
        _clear_stale_socket(path, key)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _clear_stale_socket(path: Path, key: str) -> None:
    if path.exists() or path.is_symlink():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise ConfigError(f"{key} {path} exists and is not a socket; refusing to replace it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()  # stale: left by an agent that did not shut down cleanly
        else:
            raise ConfigError(f"{key} {path} is in use by another process (another edge-agent?)")
        finally:
            probe.close()


def release_socket_path(path: Path | None, lock_fd: int) -> None:
    """Remove the socket (when this server bound it), then let go of its lock: in this order, so the next
    agent finds the path free once it holds the lock."""
    try:
        if path is not None:
            path.unlink(missing_ok=True)
    finally:
        os.close(lock_fd)


async def on_file_thread(fn: Callable[..., T], *args: Any, undo: Callable[[T], object] | None = None) -> T:
    """fn(*args) on a thread of its own: the socket's file work at start and stop waits on the disk (a slow or
    full one too), and the loop meanwhile keeps every other conversation going.

    If the caller is cancelled meanwhile, the thread still finishes, and `undo` then takes back what it did.
    """
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kserve-socket")
    done = asyncio.get_running_loop().run_in_executor(pool, fn, *args)
    try:
        return await asyncio.shield(done)
    except asyncio.CancelledError:
        done.add_done_callback(lambda finished: _undo_after_cancel(finished, undo))
        raise
    finally:
        pool.shutdown(wait=False)  # its one job is done or running; joining the thread here would block


def _undo_after_cancel(finished: asyncio.Future[T], undo: Callable[[T], object] | None) -> None:
    if finished.cancelled() or finished.exception() is not None:  # retrieved: no "never retrieved" warning
        return
    if undo is not None:
        undo(finished.result())


@dataclass
class InferenceServer:
    """A started server and where it listens."""

    server: grpc.aio.Server
    unix_socket: str = ""
    tcp_port: int = 0
    targets: list[str] = field(default_factory=list)
    health: AgentHealth | None = None
    repository: ModelRepository | None = None
    # The regions apps registered (Triton's system shared-memory extension), unmapped at stop.
    shared_memory: SystemSharedMemory | None = None
    _lock_fd: int = -1

    @classmethod
    async def start(
        cls,
        repository: ModelRepository,
        config: ServerSection,
        version: str,
        *,
        health: AgentHealth | None = None,
        admin: object | None = None,
    ) -> InferenceServer:
        """Listen and serve KServe, health and reflection (and `admin`, an edgefleet.v1.AgentAdmin servicer).

        `health`: the agent's, fed by its readiness and health; by default one that follows ServerReady.
        """
        limit = config.max_request_bytes + MESSAGE_OVERHEAD
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", -1),
                ("grpc.so_reuseport", 0),
            ]
        )
        shared_memory = SystemSharedMemory()
        add_to_server(KServeServicer(repository, config.max_request_bytes, version, shared_memory), server)
        health = health or AgentHealth(repository.ready)
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
        services = [INFERENCE_SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name]
        if admin is not None:
            add_service(server, admin_pb2, "AgentAdmin", admin)
            name = admin_pb2.DESCRIPTOR.services_by_name["AgentAdmin"].full_name
            health.add_service(name)
            services.append(name)
        reflection.enable_server_reflection([*services, reflection.SERVICE_NAME], server)
        result = cls(server, health=health, shared_memory=shared_memory)
        try:
            await result._listen(config)
            if result.unix_socket:
                # Apps in the agent's group may connect; nobody else on the device. Set before the server
                # listens (grpc binds the path in add_insecure_port), so no connection ever sees wider modes.
                await on_file_thread(os.chmod, result.unix_socket, 0o660)
            await server.start()
        except BaseException:
            await result._let_go()  # nobody listens on what this start bound
            raise
        # Models whose batches cost less than a hop to an engine thread now run on this loop (batcher.py).
        repository.attach_loop(asyncio.get_running_loop())
        result.repository = repository
        health.started()
        await health.refresh()
        log.info("server.listening", targets=result.targets)
        return result

    async def _listen(self, config: ServerSection) -> None:
        # Every address is checked before any is claimed: a refused one then leaves no socket file behind.
        path, tcp = check_addresses(config)
        if path is not None:
            self._lock_fd = await on_file_thread(claim_socket_path, path, undo=os.close)
            try:
                self.server.add_insecure_port(f"unix:{path}")
            except RuntimeError as exc:
                raise ConfigError(f"cannot listen on server.unix_socket {path}: {exc}") from exc
            self.unix_socket = str(path)
            self.targets.append(f"unix:{path}")
        if tcp is not None:
            host, port = tcp
            try:
                self.tcp_port = self.server.add_insecure_port(f"{host}:{port}")
            except RuntimeError as exc:
                raise ConfigError(f"cannot listen on server.tcp_address {config.tcp_address}: {exc}") from exc
            self.targets.append(f"{host}:{self.tcp_port}")

    async def stop(self, grace_s: float, *, close_shared_memory: bool = True) -> None:
        """Refuse new calls at once; let calls in flight finish for up to `grace_s`.

        `close_shared_memory=False`: another server (HTTP/REST) shares the regions and may still be answering
        calls that use them; its owner closes `shared_memory` once both have stopped.
        """
        if self.health is not None:
            await self.health.stopping()
        await self.server.stop(grace_s)
        if self.shared_memory is not None and close_shared_memory:
            self.shared_memory.close()  # calls are done or cancelled: unmap what apps registered
        if self.repository is not None:  # what is still queued is the engine threads' to finish
            self.repository.attach_loop(None)
        await self._let_go()

    async def _let_go(self) -> None:
        """Remove the socket this server bound and drop its lock, once. Only the lock's holder removes the
        socket: a second call must not take the path from the next agent, which may have bound it since."""
        if self._lock_fd < 0:
            return
        lock_fd, self._lock_fd = self._lock_fd, -1
        bound = Path(self.unix_socket) if self.unix_socket else None
        await on_file_thread(release_socket_path, bound, lock_fd)
