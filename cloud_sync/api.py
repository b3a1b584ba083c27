"""The admin HTTP API (FastAPI, OpenAPI at /openapi.json) that fleetctl and the dashboard use.

Bearer-token auth with a role per route on everything under /v1 (api_auth.py, with the one error body
every status carries); /healthz and /metrics are open (no fleet data in them beyond counts). Response bodies
are api_schemas.py's models, so the schema says what each route answers. Store calls are synchronous
SQLAlchemy: FastAPI runs these plain `def` endpoints in its threadpool, off the event loop.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Annotated, Any, Protocol

import structlog
from fastapi import Depends, FastAPI, HTTPException, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cloud_sync.api_auth import BearerAuth, actor_of, as_auth, error_response, errors, validation_error_response
from cloud_sync.api_schemas import (
    DEVICE_ID_PATTERN,
    LABELS_SCHEMA,
    CreatedDevice,
    Cursor,
    Device,
    DeviceDetail,
    DeviceList,
    Health,
    QuarantinePage,
    ResultPage,
    message_json,
)
from cloud_sync.errors import CloudSyncError, InvalidArgument, Unauthenticated
from cloud_sync.status import INTERNAL_MESSAGE, http_code, unexpected_error_fields
from cloud_sync.store import AuditLog, DeviceRegistry, ResultStore, TelemetryStore
from cloud_sync.store.audit import AuditDraft
from cloud_sync.store.batches import MAX_SEQ
from cloud_sync.store.results import MAX_PAGE, QuarantineEntry

__all__ = ["ApiContext", "create_app"]

log = structlog.get_logger(__name__)

# The largest request body the API reads (http.max_body_bytes): a device or label document is a few KiB.
DEFAULT_MAX_BODY_BYTES = 1024 * 1024
# Result ids are BIGINT: a larger after_id is not an id (SQLite once raised OverflowError on it: a 500).
MAX_ID = MAX_SEQ
# The most quarantine entries one page returns: each carries up to IngestLimits.max_quarantined_bytes (64 KiB)
# of the record, so a page is at most 64 MiB of record bytes (results' 10,000 would be 640 MiB).
MAX_QUARANTINE_PAGE = 1000


class DeviceStateView(Protocol):
    """Desired vs reported state for the device routes (cloud_sync/api_state.py's DeviceStates)."""

    def summaries(self) -> dict[str, dict[str, Any]]: ...

    def state(self, device_id: str) -> dict[str, Any]: ...


class ApiContext:
    """What the endpoints need; built by the cloud-sync process (or a test)."""

    def __init__(
        self,
        devices: DeviceRegistry,
        results: ResultStore,
        admin_token: str | BearerAuth,
        registry: CollectorRegistry,
        extra_routes: list[Callable[[FastAPI], None]] | None = None,
        telemetry: TelemetryStore | None = None,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        device_states: DeviceStateView | None = None,
        audit: AuditLog | None = None,
    ) -> None:
        self.devices = devices
        self.results = results
        self.admin_token = admin_token
        self.registry = registry
        self.extra_routes = extra_routes or []
        self.telemetry = telemetry
        self.max_body_bytes = max_body_bytes
        self.device_states = device_states
        # Where the device routes record their changes (None: not recorded, as in a test of routes alone).
        self.audit = audit

    def record(self, draft: AuditDraft) -> None:
        """Write the audit record of a change that has committed (DeviceRegistry writes have no hook for it)."""
        if self.audit is not None:
            self.audit.record(draft)


class NewDevice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    device_id: str = Field(
        min_length=1,
        max_length=128,
        # In the schema only: check_device_id's message says what is allowed, pydantic's would quote a regex.
        json_schema_extra={"pattern": DEVICE_ID_PATTERN},
        description="Unique id, e.g. cam-17: letters, digits and . _ - (not starting with cloud-sync or edgefleet).",
    )
    labels: dict[str, str] = Field(
        default_factory=dict, description="Labels rollouts and policies select on.", json_schema_extra=LABELS_SCHEMA
    )

    @field_validator("labels")
    @classmethod
    def _encodable(cls, labels: dict[str, str]) -> dict[str, str]:
        # JSON may carry a lone surrogate (\ud800); stored, it made every later listing of devices fail.
        for text in (*labels, *labels.values()):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError(f"{text!r} is not valid Unicode (a lone surrogate)") from None
        return labels


class _InternalErrors:
    """ASGI middleware: an exception no CloudSyncError describes becomes a 500 with a generic message and one
    log line. Left to Starlette and uvicorn, the traceback is logged with its locals: the request's headers,
    admin token included."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception as exc:
            log.error("api.internal_error", method=scope["method"], path=scope["path"], **unexpected_error_fields(exc))
            if started:
                return  # the status line is out: all that is left is to end the connection
            await error_response(500, INTERNAL_MESSAGE)(scope, receive, send)


def _streamed_upload(scope: Scope) -> bool:
    """PUT /v1/blobs/{sha256}: a model file, streamed to the blob store under its own limit (api_models.py)."""
    path = str(scope.get("path", ""))
    return scope.get("method") == "PUT" and path.startswith("/v1/blobs/") and path.count("/") == 3


class _BodyLimit:
    """ASGI middleware: a request body past `max_bytes` gets 413 with the limit, and is not read past it.

    A declared Content-Length over the limit is refused before a byte of the body is read; a chunked body is
    counted as it arrives and refused once it passes the limit (FastAPI answers the HTTPException raised
    while it reads the body). Without this the whole body was read, a 30 MB one included, before anything
    looked at it.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self) -> HTTPException:
        # Connection: close, as the rest of the body is not read.
        detail = f"the request body is larger than {self.max_bytes} bytes (cloud-sync's http.max_body_bytes)"
        return HTTPException(status_code=413, detail=detail, headers={"Connection": "close"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or _streamed_upload(scope):
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            refused = self._too_large()
            await error_response(413, refused.detail, refused.headers)(scope, receive, send)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise self._too_large()
            return message

        await self.app(scope, counted, send)


DeviceIdPath = Annotated[
    str,
    # The pattern in the schema only: an id no device can have is answered 404, as an unknown one.
    Path(max_length=128, json_schema_extra={"pattern": DEVICE_ID_PATTERN}, description="the device's id, e.g. cam-17"),
]

# A device never given a desired state (GET /v1/devices rows).
_NO_STATE = {"desired_generation": None, "reported_generation": None, "converged": None, "state_error": ""}
# How far back a device's per-model figures reach in GET /v1/devices/{id}.
RECENT_S = 300


def _presence_json(presence: Any) -> dict[str, Any]:
    """Presence as the broker last told it (status retained + last will); unknown before any message."""
    if presence is None:
        return {"online": None, "last_seen_ms": None}
    return {"online": presence.online, "last_seen_ms": presence.last_seen_ms}


def _telemetry_json(latest: Any) -> dict[str, Any]:
    data = message_json(latest.message)
    data["received_at_ms"] = latest.received_at_ms
    # How far the device's clock was ahead (+) or behind (-) the cloud's when it sent this, give or take the
    # transport's delay: a device with a wrong clock shows here.
    data["clock_skew_ms"] = latest.message.timestamp_ms - latest.received_at_ms
    return data


def _device_json(device: Any) -> dict[str, Any]:
    return {
        "device_id": device.device_id,
        "labels": dict(device.labels),
        "created_at_ms": device.created_at_ms,
        "revoked": device.revoked,
    }


def _result_json(result: Any) -> dict[str, Any]:
    data = asdict(result)
    data["payload"] = base64.b64encode(result.payload).decode()
    data["payload_bytes"] = len(result.payload)
    return data


def _quarantine_json(entry: QuarantineEntry) -> dict[str, Any]:
    data = asdict(entry)
    # None for a rejection the device declared: the cloud never received the record.
    data["record"] = base64.b64encode(entry.record).decode() if entry.record is not None else None
    data["record_bytes"] = len(entry.record) if entry.record is not None else 0
    return data


def _single_valued_query(request: Request) -> None:
    """Refuse a query parameter of the route given twice: FastAPI would take the last one silently."""
    route = request.scope.get("route")
    dependant = getattr(route, "dependant", None)
    declared = {p.alias for p in dependant.query_params} if dependant is not None else set()
    names = [name for name, _ in request.query_params.multi_items() if name in declared]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise InvalidArgument(f"query parameter {repeated[0]} is given more than once: give it once")


# Every /v1 route may answer these (bad or missing token; the database away).
AUTH_ERRORS = (401, 403, 503)


def create_app(ctx: ApiContext) -> FastAPI:
    app = FastAPI(
        title="cloud-sync admin API", version="1", description=__doc__, dependencies=[Depends(_single_valued_query)]
    )
    app.add_middleware(_BodyLimit, max_bytes=ctx.max_body_bytes)
    app.add_middleware(_InternalErrors)  # added last: the outermost

    @app.exception_handler(CloudSyncError)
    async def _cloud_sync_error(request: Request, exc: CloudSyncError) -> Response:
        headers = {"WWW-Authenticate": "Bearer"} if isinstance(exc, Unauthenticated) else None
        return error_response(http_code(exc), exc.message, headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        return error_response(exc.status_code, str(exc.detail), exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(request: Request, exc: RequestValidationError) -> Response:
        return validation_error_response(exc.errors())

    auth = as_auth(ctx.admin_token)
    viewer, admin = auth.require("viewer"), auth.require("admin")

    @app.get("/healthz", tags=["health"])
    def healthz() -> Health:
        return Health(status="ok")

    @app.get(
        "/metrics",
        tags=["health"],
        response_class=PlainTextResponse,
        responses={200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}}},
    )
    def metrics() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(ctx.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/devices", tags=["devices"], dependencies=viewer, responses=errors(*AUTH_ERRORS))
    def list_devices() -> DeviceList:
        """Every registered device with its presence and desired/reported generations."""
        presence = {p.device_id: p for p in ctx.telemetry.fleet_presence()} if ctx.telemetry else {}
        states = ctx.device_states.summaries() if ctx.device_states is not None else {}
        return DeviceList.model_validate(
            {
                "devices": [
                    {
                        **_device_json(d),
                        **_presence_json(presence.get(d.device_id)),
                        **states.get(d.device_id, _NO_STATE),
                        # A revoked device converges to nothing: its last report does not count.
                        **({"converged": False} if d.revoked and d.device_id in states else {}),
                    }
                    for d in ctx.devices.list_devices()
                ]
            }
        )

    @app.post(
        "/v1/devices",
        tags=["devices"],
        dependencies=admin,
        status_code=201,
        responses=errors(*AUTH_ERRORS, 409, 413, 422),
    )
    def add_device(body: NewDevice, request: Request) -> CreatedDevice:
        """Register a device; its token is in this answer only."""
        token = ctx.devices.add_device(body.device_id, body.labels)
        after = {"device_id": body.device_id, "labels": body.labels}
        ctx.record(AuditDraft(actor_of(request), "device.add", f"device/{body.device_id}", None, after))
        return CreatedDevice(device_id=body.device_id, labels=body.labels, token=token)

    @app.get(
        "/v1/devices/{device_id}",
        tags=["devices"],
        dependencies=viewer,
        responses=errors(*AUTH_ERRORS, 404, 422),
        response_model_exclude_unset=True,
    )
    def show_device(device_id: DeviceIdPath) -> DeviceDetail:
        """A device, its upload counters, presence, newest telemetry, desired vs reported state, recent figures."""
        device = ctx.devices.get_device(device_id)
        shown = {**_device_json(device), "uplink": asdict(ctx.results.reconcile(device_id))}
        if ctx.device_states is not None:
            shown["state"] = ctx.device_states.state(device_id)
            shown["state"]["converged"] = shown["state"]["converged"] and not device.revoked
        if ctx.telemetry is not None:
            presence = {p.device_id: p for p in ctx.telemetry.fleet_presence()}.get(device_id)
            latest = ctx.telemetry.latest(device_id)
            shown.update(_presence_json(presence))
            shown["telemetry"] = _telemetry_json(latest) if latest is not None else None
            since = int(time.time() * 1000) - RECENT_S * 1000
            models = [(m.name, m.version) for m in latest.message.models] if latest is not None else []
            shown["recent_models"] = [
                {**asdict(w), "error_rate": w.error_rate, "window_s": RECENT_S}
                for w in (ctx.telemetry.model_window(name, version, [device_id], since) for name, version in models)
            ]
        return DeviceDetail.model_validate(shown)

    @app.post(
        "/v1/devices/{device_id}/revoke",
        tags=["devices"],
        dependencies=admin,
        responses=errors(*AUTH_ERRORS, 404, 422),
    )
    def revoke_device(device_id: DeviceIdPath, request: Request) -> Device:
        """Cut a device off: its token stops working on every channel (idempotent)."""
        was = ctx.devices.get_device(device_id)
        ctx.devices.revoke(device_id)
        now = _device_json(ctx.devices.get_device(device_id))
        if not was.revoked:  # a second revoke changes nothing: no record
            draft = AuditDraft(actor_of(request), "device.revoke", f"device/{device_id}", _device_json(was), now)
            ctx.record(draft)
        return Device.model_validate(now)

    @app.get(
        "/v1/devices/{device_id}/quarantine",
        tags=["devices"],
        dependencies=viewer,
        responses=errors(*AUTH_ERRORS, 404, 422),
        summary="Records of a device the cloud counts as rejected, and why",
    )
    def list_quarantine(
        device_id: DeviceIdPath,
        after_seq: Annotated[int, Query(ge=0, le=MAX_SEQ)] = 0,
        limit: Annotated[int, Query(ge=1, le=MAX_QUARANTINE_PAGE)] = 100,
    ) -> QuarantinePage:
        """Quarantined seqs past `after_seq`, ascending: refused by cloud-sync (with the first bytes of the
        record) or declared rejected by the device. Pass `next_after_seq` back as `after_seq` to go on."""
        entries = ctx.results.quarantine(device_id, after_seq, limit)
        return QuarantinePage.model_validate(
            {
                "quarantine": [_quarantine_json(e) for e in entries],
                "next_after_seq": entries[-1].seq if entries else after_seq,
            }
        )

    @app.get("/v1/results", tags=["results"], dependencies=viewer, responses=errors(*AUTH_ERRORS, 422))
    def list_results(
        device_id: Annotated[str | None, Query(max_length=128)] = None,
        after_id: Annotated[int, Query(ge=0, le=MAX_ID)] = 0,
        limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
        settle_ms: Annotated[int, Query(ge=0, le=60_000, description="stay this far behind the newest")] = 0,
    ) -> ResultPage:
        """Stored results past `after_id`, in id order; pass `next_after_id` back as `after_id` to go on."""
        before = int(time.time() * 1000) - settle_ms if settle_ms else 0
        rows = ctx.results.results(device_id, after_id, limit, received_before_ms=before)
        return ResultPage.model_validate(
            {"results": [_result_json(r) for r in rows], "next_after_id": rows[-1].id if rows else after_id}
        )

    @app.get("/v1/results/cursor", tags=["results"], dependencies=viewer, responses=errors(*AUTH_ERRORS, 422))
    def results_cursor(
        device_id: Annotated[str | None, Query(max_length=128)] = None,
        last: Annotated[int, Query(ge=0, le=MAX_PAGE)] = 20,
    ) -> Cursor:
        """The after_id from which /v1/results returns the newest `last` results."""
        return Cursor(after_id=ctx.results.cursor_before_last(device_id, last))

    for add_routes in ctx.extra_routes:
        add_routes(app)
    return app
