"""The KServe v2 HTTP/REST server of edge-agent: uvicorn serving kserve/http_app.py on the agent's own event loop.

Listens beside the gRPC server (server.py) on a Unix socket and/or loopback TCP, with the same rules: plaintext
on loopback and Unix sockets only, the socket file 0660 behind its lock, a stale socket cleared. The agent
owns the process's signals: uvicorn's own handlers are never installed.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import structlog
import uvicorn

from edge_runtime.config import ServerSection
from edge_runtime.errors import ConfigError
from edge_runtime.kserve.http_app import KServeHttpApp
from edge_runtime.kserve.server import (
    MAX_SOCKET_PATH,
    check_loopback,
    claim_socket_path,
    on_file_thread,
    parse_tcp_address,
    release_socket_path,
)
from edge_runtime.kserve.shm import SystemSharedMemory
from edge_runtime.models.repository import ModelRepository
from edgefleet.embedded_http import EmbeddedServer

__all__ = ["HttpInferenceServer", "check_http_addresses"]

log = structlog.get_logger(__name__)

START_TIMEOUT_S = 10.0
# Decoding and encoding of large bodies; two, so one 64 MiB JSON body does not hold up every other one.
CODEC_THREADS = 2


def check_http_addresses(config: ServerSection) -> tuple[Path | None, tuple[str, int] | None]:
    """The HTTP Unix socket path and loopback (host, port) the server section asks for (either may be off);
    ConfigError naming the key for one the server could not or must not listen on."""
    path = Path(config.http_unix_socket) if config.http_unix_socket else None
    if path is not None:
        if len(os.fsencode(path)) > MAX_SOCKET_PATH:
            raise ConfigError(
                f"server.http_unix_socket {path} is longer than the {MAX_SOCKET_PATH} bytes a Unix socket path may have"
            )
        if config.unix_socket and Path(config.unix_socket) == path:
            raise ConfigError(f"server.http_unix_socket {path} is server.unix_socket too; give HTTP its own socket")
    tcp = parse_tcp_address(config.http_tcp_address, "server.http_tcp_address") if config.http_tcp_address else None
    if tcp is not None:
        check_loopback(tcp[0], "server.http_tcp_address")
        if tcp[1] and config.tcp_address and parse_tcp_address(config.tcp_address)[1] == tcp[1]:
            raise ConfigError(f"server.http_tcp_address {config.http_tcp_address} takes server.tcp_address's port")
    return path, tcp


def _bind_unix(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        # Apps in the agent's group may connect; nobody else. Set before listen: no connection sees wider modes.
        os.chmod(path, 0o660)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on server.http_unix_socket {path}: {exc}") from exc
    return sock


def _bind_tcp(host: str, port: int, address: str) -> socket.socket:
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.create_server((host, port), family=family, backlog=2048)
    except OSError as exc:
        raise ConfigError(f"cannot listen on server.http_tcp_address {address}: {exc}") from exc
    # Accepted sockets inherit it. asyncio sets it only on sockets made with proto=IPPROTO_TCP (create_server's
    # are proto 0): without it a response's headers and body wait out the client's delayed ACK, 40 ms a request.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


@dataclass
class HttpInferenceServer:
    """A started HTTP server and where it listens; `targets` are URLs (http+unix:// for the socket)."""

    server: uvicorn.Server
    pool: ThreadPoolExecutor
    unix_socket: str = ""
    tcp_port: int = 0
    targets: list[str] = field(default_factory=list)
    _sockets: list[socket.socket] = field(default_factory=list)
    _serving: asyncio.Task[None] | None = None
    _lock_fd: int = -1

    @classmethod
    async def start(
        cls,
        repository: ModelRepository,
        config: ServerSection,
        version: str,
        *,
        shm: SystemSharedMemory | None = None,
    ) -> HttpInferenceServer | None:
        """Listen and serve; None when the config turns HTTP off (both addresses empty).

        `shm`: the shared-memory registry (kserve/shm.py) of Triton's shared-memory extension, the gRPC
        server's (InferenceServer.shared_memory) so both protocols see the same regions; None: refused.
        The gRPC server closes it at its stop.
        """
        path, tcp = check_http_addresses(config)
        if path is None and tcp is None:
            return None
        pool = ThreadPoolExecutor(max_workers=CODEC_THREADS, thread_name_prefix="kserve-http-codec")
        app = KServeHttpApp(repository, config.max_request_bytes, version, pool, shm=shm)
        uv_config = uvicorn.Config(
            app,
            interface="asgi3",
            lifespan="off",
            ws="none",
            log_config=None,
            access_log=False,  # no log line per request: per-request facts are Prometheus metrics
            proxy_headers=False,
            server_header=False,
            date_header=False,
            timeout_keep_alive=30,
        )
        result = cls(EmbeddedServer(uv_config), pool)
        try:
            await result._listen(config, path, tcp)
            result._serving = asyncio.ensure_future(result.server.serve(sockets=result._sockets))
            await result._started()
        except BaseException:
            await result._let_go()
            raise
        log.info("server.http_listening", targets=result.targets)
        return result

    async def _listen(self, config: ServerSection, path: Path | None, tcp: tuple[str, int] | None) -> None:
        if path is not None:
            self._lock_fd = await on_file_thread(claim_socket_path, path, "server.http_unix_socket", undo=os.close)
            self.unix_socket = str(path)  # ours while we hold its lock: _let_go removes what bind leaves
            self._sockets.append(await on_file_thread(_bind_unix, path, undo=socket.socket.close))
            self.targets.append(f"http+unix://{path}")
        if tcp is not None:
            host, port = tcp
            sock = _bind_tcp(host, port, config.http_tcp_address)
            self._sockets.append(sock)
            self.tcp_port = sock.getsockname()[1]
            shown = f"[{host}]" if ":" in host else host
            self.targets.append(f"http://{shown}:{self.tcp_port}")

    async def _started(self) -> None:
        """Wait until uvicorn accepts on the sockets (they already listen: a client meanwhile waits in the backlog)."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.server.started:
            assert self._serving is not None
            if self._serving.done():
                self._serving.result()  # its error, if it failed
                raise ConfigError("the HTTP server stopped while starting")
            if time.monotonic() > deadline:
                raise ConfigError(f"the HTTP server did not start within {START_TIMEOUT_S} s")
            await asyncio.sleep(0.005)

    async def stop(self, grace_s: float) -> None:
        """Refuse new connections at once; let requests in flight finish for up to `grace_s`."""
        self.server.config.timeout_graceful_shutdown = max(1, round(grace_s))
        self.server.should_exit = True
        if self._serving is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._serving), grace_s + 2.0)
            except asyncio.TimeoutError:
                self.server.force_exit = True
                self._serving.cancel()
                await asyncio.gather(self._serving, return_exceptions=True)
        await self._let_go()

    async def _let_go(self) -> None:
        """Close the sockets, remove the socket file this server bound and drop its lock, once."""
        for sock in self._sockets:
            sock.close()
        self._sockets.clear()
        self.pool.shutdown(wait=False)
        if self._lock_fd < 0:
            return
        lock_fd, self._lock_fd = self._lock_fd, -1
        bound = Path(self.unix_socket) if self.unix_socket else None
        await on_file_thread(release_socket_path, bound, lock_fd)
