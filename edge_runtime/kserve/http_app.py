"""The KServe v2 REST protocol (with Triton's extensions) as a bare ASGI app over a ModelRepository.

The same semantics as the gRPC servicer (servicer.py): requests go through the same repository, batcher,
keeping and statistics. Bodies are read with a limit, never whole before their size is known; large ones are
decoded and encoded on the app's own codec threads so the event loop never waits on a 64 MiB JSON parse. The
HTTP plumbing (bodies, encodings, JSON checks) is http_body.py; tensors in JSON, http_codec.py.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

import grpc
import structlog

from edge_runtime.errors import EdgeRuntimeError, InvalidInput, ModelNotFound, ModelNotReady, RequestTooLarge
from edge_runtime.inference import keeping
from edge_runtime.inference.types import InferRequest, InferResponse
from edge_runtime.kserve.codec import check_version
from edge_runtime.kserve.http_body import (
    WBITS,
    ClientGone,
    Receive,
    Scope,
    Send,
    accepted_coding,
    check_keys,
    compress,
    count_field,
    decompress,
    hang_up,
    headers_of,
    parse_json,
    parse_json_length,
    raw_handle,
    read_body,
)
from edge_runtime.kserve.http_codec import BINARY_HEADER, EncodedResponse, OutputPlan, decode_infer, encode_infer
from edge_runtime.kserve.http_views import config_json, index_json, metadata_json, server_json, statistics_json
from edge_runtime.kserve.repository import LOAD_UNIMPLEMENTED, repository_index
from edge_runtime.kserve.servicer import EXTENSIONS, SERVER_NAME
from edge_runtime.kserve.shm import SystemSharedMemory
from edge_runtime.kserve.status import STATUS_CODES, status_for
from edge_runtime.loop_bridge import LoopBridge
from edge_runtime.models.repository import KEEP_WAIT_S, ModelRepository

__all__ = ["HTTP_STATUS", "KServeHttpApp", "Route", "http_status_for", "route"]

log = structlog.get_logger(__name__)

# The gRPC mapping (status.py) in HTTP terms; RESOURCE_EXHAUSTED splits into 413 (too large) and 503 (overloaded).
_HTTP_OF_GRPC = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 503,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.INTERNAL: 500,
}


def _http_status(cls: type[EdgeRuntimeError], code: grpc.StatusCode) -> int:
    return 413 if issubclass(cls, RequestTooLarge) else _HTTP_OF_GRPC[code]


HTTP_STATUS: dict[type[EdgeRuntimeError], int] = {cls: _http_status(cls, code) for cls, code in STATUS_CODES.items()}
# Protocol framing and tensor metadata on top of max_request_bytes of tensor data (as the gRPC server allows).
BODY_OVERHEAD = 1 << 20
# JSON past this is decoded or encoded (and bodies (de)compressed) on a codec thread, not on the loop: a
# thread hop costs little, but a 64 MiB JSON parse on the loop would stall every other conversation.
OFF_LOOP_BYTES = 256 * 1024
# Responses smaller than this go uncompressed whatever Accept-Encoding says.
COMPRESS_MIN_BYTES = 1024
SHM_UNAVAILABLE = (
    "shared memory is not available over HTTP on this server; send tensors in the request body "
    "(binary_data_size for raw bytes)"
)
_CONTENT_TYPES = {"", "application/json", "application/octet-stream"}


def http_status_for(exc: EdgeRuntimeError) -> int:
    """The HTTP status of `exc`: its gRPC status (status.py) in HTTP terms."""
    return _http_status(type(exc), status_for(exc))


class HttpError(Exception):
    """A protocol-level refusal (route, method, header) with its status."""

    def __init__(self, status: int, message: str, headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers


@dataclass(frozen=True)
class Route:
    """What a request path names: a handler, the methods it takes, and the model and version it is about (or
    the shared-memory region, "" = all, and whether it is CUDA's)."""

    handler: str
    methods: tuple[str, ...]
    model: str = ""
    version: str = ""
    region: str = ""
    cuda: bool = False


_MODEL_ROUTES = {
    (): ("metadata", ("GET",)),
    ("ready",): ("model_ready", ("GET",)),
    ("config",): ("config", ("GET",)),
    ("stats",): ("stats", ("GET",)),
    ("infer",): ("infer", ("POST",)),
}
_FIXED_ROUTES = {
    ("v2",): Route("server_metadata", ("GET",)),
    ("v2", "health", "live"): Route("live", ("GET",)),
    ("v2", "health", "ready"): Route("ready", ("GET",)),
    ("v2", "models", "stats"): Route("stats", ("GET",)),
    ("v2", "repository", "index"): Route("index", ("POST",)),
}
# Triton's shared-memory extension: /v2/{systemsharedmemory|cudasharedmemory}[/region/{name}]/{action}.
_SHM_KINDS = {"systemsharedmemory": False, "cudasharedmemory": True}
_SHM_ACTIONS = {"status": ("GET",), "register": ("POST",), "unregister": ("POST",)}


def route(path: str) -> Route | None:
    """The route of a request path (percent-decoded), or None for a path the protocol does not have."""
    parts = tuple(path.split("/")[1:])
    fixed = _FIXED_ROUTES.get(parts)
    if fixed is not None:
        return fixed
    if len(parts) in (3, 5) and parts[0] == "v2" and parts[1] in _SHM_KINDS and parts[-1] in _SHM_ACTIONS:
        region = ""
        if len(parts) == 5:
            if parts[2] != "region" or not parts[3]:
                return None
            region = parts[3]
        action = parts[-1]
        return Route(f"shm_{action}", _SHM_ACTIONS[action], region=region, cuda=_SHM_KINDS[parts[1]])
    if len(parts) == 5 and parts[:3] == ("v2", "repository", "models") and parts[4] in ("load", "unload") and parts[3]:
        return Route("load", ("POST",), parts[3])
    if len(parts) < 3 or parts[:2] != ("v2", "models") or not parts[2]:
        return None
    model, rest, version = parts[2], parts[3:], ""
    if rest[:1] == ("versions",) and len(rest) >= 2:
        version, rest = rest[1], rest[2:]
    found = _MODEL_ROUTES.get(rest)
    return None if found is None else Route(found[0], found[1], model, version)


@dataclass
class Reply:
    status: int
    body: bytes = b""
    content_type: bytes = b"application/json"
    json_length: int | None = None


def _json(doc: Any, status: int = 200) -> Reply:
    return Reply(status, json.dumps(doc, separators=(",", ":")).encode())


class KServeHttpApp:
    """The ASGI callable. `codec_pool` runs the work on large bodies; `shm` is the shared-memory registry
    (kserve/shm.py), the gRPC server's own, so a region registered over either protocol serves both; without
    one, shared-memory routes and parameters are refused."""

    def __init__(
        self,
        repository: ModelRepository,
        max_request_bytes: int,
        version: str,
        codec_pool: Executor,
        *,
        shm: SystemSharedMemory | None = None,
    ) -> None:
        self._repo = repository
        self._max_bytes = max_request_bytes
        self._max_body = max_request_bytes + BODY_OVERHEAD
        self._version = version
        self._pool = codec_pool
        self._shm = shm
        self._extensions = EXTENSIONS if shm is not None else [e for e in EXTENSIONS if e != "shared_memory"]
        self._loop_bridge: LoopBridge | None = None

    def _bridge(self) -> LoopBridge:
        if self._loop_bridge is None:  # built before the server's loop runs it
            self._loop_bridge = LoopBridge(asyncio.get_running_loop())
        return self._loop_bridge

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return  # lifespan is off; websockets are not served
        headers: tuple[tuple[bytes, bytes], ...] = ()
        try:
            reply = await self._dispatch(scope, receive)
        except HttpError as exc:
            reply, headers = _json({"error": str(exc)}, exc.status), exc.headers
        except EdgeRuntimeError as exc:
            reply = _json({"error": str(exc)}, http_status_for(exc))
        except ClientGone:
            return
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("kserve.http_internal_error", error=repr(exc))
            reply = _json({"error": "internal error in edge-agent; see its log"}, 500)
        await self._send(scope, send, reply, headers)

    async def _dispatch(self, scope: Scope, receive: Receive) -> Reply:
        found = route(scope["path"])
        if found is None:
            raise HttpError(404, f"no such route: {scope['method']} {scope['path']}")
        if scope["method"] not in found.methods:
            allow = ", ".join(found.methods).encode()
            raise HttpError(405, f"{scope['path']} takes {', '.join(found.methods)}", ((b"allow", allow),))
        if found.version:
            check_version(found.model, found.version)
        handler: Callable[[Route, Scope, Receive], Awaitable[Reply]] = getattr(self, f"_{found.handler}")
        return await handler(found, scope, receive)

    async def _live(self, found: Route, scope: Scope, receive: Receive) -> Reply:
        return Reply(200, content_type=b"")

    async def _ready(self, found: Route, scope: Scope, receive: Receive) -> Reply:
        # KServe's REST health: 200 is true, a 4xx is false, the body empty.
        return Reply(200 if self._repo.ready() else 400, content_type=b"")

    async def _model_ready(self, found: Route, scope: Scope, receive: Receive) -> Reply:
        try:
            ready = self._repo.model(found.model, found.version).ready
        except (ModelNotFound, ModelNotReady):
            ready = False  # as Triton: not ready, not an error
        return Reply(200 if ready else 400, content_type=b"")

    async def _server_metadata(self, found: Route, scope: Scope, receive: Receive) -> Reply:
        return _json(server_json(SERVER_NAME, self._version, self._extensions))

    async def _metadata(self, found: Route, scope: Scope, receive: Receive) -> Reply:
        served = self._repo.model(found.model, found.version)
        versions = [s.version for s in self._repo.models() if s.name == served.name]
        return _json(metadata_json(served, versions))

    async def _config(self, found: Route, scope: Scope, receive: Receive) -> Reply:
        return _json(config_json(self._repo.model(found.model, found.version)))

    async def _stats(self, found: Route, scope: Scope, receive: Receive) -> Reply:
        if found.model:
            selected = [self._repo.model(found.model, found.version)]
        else:
            selected = sorted(self._repo.models(), key=lambda s: (s.name, s.version))
        return _json(statistics_json(selected))

    async def _index(self, found: Route, scope: Scope, receive: Receive) -> Reply:
        body = await self._body(scope, receive)
        doc = parse_json(body) if body.strip() else {}
        if not isinstance(doc, dict) or set(doc) - {"ready"} or not isinstance(doc.get("ready", False), bool):
            raise InvalidInput('the index request body must be {} or {"ready": true|false}')
        store = self._repo.store
        installed = await asyncio.to_thread(lambda: {name: store.versions(name) for name in store.names()})
        return _json(index_json(repository_index(self._repo.status(), installed, ready_only=doc.get("ready", False))))

    async def _load(self, found: Route, scope: Scope, receive: Receive) -> Reply:
        return _json({"error": LOAD_UNIMPLEMENTED}, 501)

    def _registry(self) -> SystemSharedMemory:
        if self._shm is None:
            raise HttpError(501, SHM_UNAVAILABLE)
        return self._shm

    async def _shm_status(self, found: Route, scope: Scope, receive: Receive) -> Reply:
        """Triton's JSON: a list of regions ("" = every region of the kind)."""
        shm = self._registry()
        if found.cuda:
            cuda = shm.cuda_status(found.region)
            return _json([{"name": r.name, "device_id": r.device_id, "byte_size": r.byte_size} for r in cuda])
        regions = shm.status(found.region)
        return _json([{"name": r.name, "key": r.key, "offset": r.offset, "byte_size": r.byte_size} for r in regions])

    async def _shm_register(self, found: Route, scope: Scope, receive: Receive) -> Reply:
        """System: {"key", "offset" (default 0), "byte_size"}; CUDA: {"raw_handle": {"b64"}, "device_id",
        "byte_size"}. Opening and mapping a file (or an IPC handle) runs on a worker thread, as over gRPC."""
        shm = self._registry()
        kind = "cuda" if found.cuda else "system"
        if not found.region:
            raise InvalidInput(f"'region name' is necessary to register {kind} shared memory region")
        doc = parse_json(await self._body(scope, receive))
        what = f"the {kind} shared memory register request"
        if found.cuda:
            check_keys(doc, what, {"raw_handle", "device_id", "byte_size"}, {"raw_handle", "device_id", "byte_size"})
            raw = raw_handle(doc["raw_handle"])
            device_id, size = count_field(doc, "device_id", what), count_field(doc, "byte_size", what)
            await asyncio.to_thread(shm.register_cuda, found.region, raw, device_id, size)
        else:
            check_keys(doc, what, {"key", "offset", "byte_size"}, {"key", "byte_size"})
            key = doc["key"]
            if not isinstance(key, str):
                raise InvalidInput(f"'key' of {what} must be a string, not {key!r}")
            offset = count_field(doc, "offset", what) if "offset" in doc else 0
            size = count_field(doc, "byte_size", what)
            await asyncio.to_thread(shm.register, found.region, key, offset, size)
        return Reply(200, content_type=b"")

    async def _shm_unregister(self, found: Route, scope: Scope, receive: Receive) -> Reply:
        """Region `found.region` ("" = all of the kind); an unknown name is no error, as in Triton."""
        shm = self._registry()
        body = await self._body(scope, receive)
        if body.strip() and parse_json(body) != {}:
            raise InvalidInput("an unregister request takes no body (or {})")
        if found.cuda:  # unmapping a CUDA IPC handle calls the driver: off the loop, as over gRPC
            await asyncio.to_thread(shm.unregister, found.region, True)
        else:
            shm.unregister(found.region)
        return Reply(200, content_type=b"")

    async def _infer(self, found: Route, scope: Scope, receive: Receive) -> Reply:
        headers = headers_of(scope)
        content_type = headers.get(b"content-type", b"").split(b";")[0].strip().decode("latin-1").lower()
        if content_type not in _CONTENT_TYPES:
            raise InvalidInput(f"Content-Type {content_type!r}: send application/json or application/octet-stream")
        json_length = parse_json_length(headers.get(BINARY_HEADER.encode()))
        body = await self._body(scope, receive)
        # Only JSON costs time to decode or encode: binary tensors are a view and a memcpy, whatever their size.
        json_bytes = len(body) if json_length is None else json_length
        request, plan = await self._off_loop(
            json_bytes, decode_infer, found.model, found.version, body, json_length, self._max_bytes, self._shm
        )
        response = await self._run(request, receive)
        encoded: EncodedResponse = await self._off_loop(
            _json_output_bytes(response, plan), encode_infer, response, plan, self._shm
        )
        if encoded.json_length is None:
            return Reply(200, encoded.body)
        return Reply(200, encoded.body, b"application/octet-stream", encoded.json_length)

    async def _run(self, request: InferRequest, receive: Receive) -> InferResponse:
        """Submit through the repository and wait; a client that hangs up withdraws its queued request."""
        _served, future = self._repo.submit_awaitable(request)  # on this loop for a model that runs there
        waiter = self._bridge().wrap(future)
        watcher = asyncio.ensure_future(hang_up(receive, waiter))
        try:
            response = await waiter
        except asyncio.CancelledError:
            if watcher.done() and not watcher.cancelled():
                raise ClientGone() from None
            raise
        finally:
            watcher.cancel()
        if response.kept is not None:  # answer once the kept result is on disk, as the gRPC servicer does
            try:
                await asyncio.wait_for(self._bridge().wrap(response.kept), KEEP_WAIT_S)
            except (EdgeRuntimeError, asyncio.TimeoutError) as exc:
                keeping.settle_kept(response, exc)
            else:
                keeping.settle_kept(response, None)
        return response

    async def _off_loop(self, size: int, fn: Callable[..., Any], *args: Any) -> Any:
        if size < OFF_LOOP_BYTES:
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def _body(self, scope: Scope, receive: Receive) -> bytes | bytearray:
        """The request body, decompressed; 413 past the limit before it is read (or as soon as it passes it)."""
        headers = headers_of(scope)
        encoding = headers.get(b"content-encoding", b"identity").decode("latin-1").strip().lower()
        if encoding not in ("identity", *WBITS):
            raise InvalidInput(f"Content-Encoding {encoding!r}: send gzip, deflate or none")
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self._max_body):
            raise RequestTooLarge(
                f"request body of {declared.decode('latin-1')} bytes is past the limit of {self._max_body} "
                f"(server.max_request_bytes + {BODY_OVERHEAD})"
            )
        body = await read_body(receive, self._max_body)
        if encoding == "identity":
            return body
        inflated: bytes = await self._off_loop(OFF_LOOP_BYTES, decompress, body, encoding, self._max_body)
        return inflated

    async def _send(self, scope: Scope, send: Send, reply: Reply, extra: tuple[tuple[bytes, bytes], ...]) -> None:
        body = reply.body
        headers = [*extra]
        if reply.content_type:
            headers.append((b"content-type", reply.content_type))
        if reply.json_length is not None:
            headers.append((BINARY_HEADER.encode(), str(reply.json_length).encode()))
        if len(body) >= COMPRESS_MIN_BYTES:
            coding = accepted_coding(headers_of(scope).get(b"accept-encoding", b""))
            if coding is not None:
                body = await self._off_loop(len(body), compress, body, coding)
                headers.append((b"content-encoding", coding.encode()))
        headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": reply.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _json_output_bytes(response: InferResponse, plan: OutputPlan) -> int:
    """Bytes of the outputs that go as JSON (about a tenth of the JSON they become)."""
    wishes, refs = plan.binary, plan.shm
    default = wishes.get("", False)
    return sum(
        a.nbytes * 10 for name, a in response.outputs.items() if not wishes.get(name, default) and name not in refs
    )
