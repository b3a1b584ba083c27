"""The admin API's samples: GET /v1/samples (what the devices kept, attributable) and GET /v1/samples/export
(a .npz or Parquet file of them with its manifest, for labelling and retraining).

Added to the app through ApiContext.extra_routes (process.py). Listing is for viewers: metadata, no tensors.
Exporting takes the operator role, since field data leaves the system, and each export is an audit record.
The store is cloud_sync/store/samples.py, the file formats cloud_sync/samples_export.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, Field

from cloud_sync.api_audit import recorder
from cloud_sync.api_auth import BearerAuth, actor_of, as_auth, errors
from cloud_sync.api_schemas import DEVICE_ID_PATTERN, MODEL_NAME_PATTERN
from cloud_sync.errors import InvalidArgument, NotInstalled, TooLarge
from cloud_sync.store.audit import AuditDraft, AuditLog
from cloud_sync.store.database import Database
from cloud_sync.store.samples import EXPORT_MEDIA_TYPES, SampleQuery, SampleStore

__all__ = ["MAX_EXPORT_BYTES", "MAX_EXPORT_SAMPLES", "SamplePageBody", "samples_routes"]

MAX_ID = 2**63 - 1
MAX_LIST = 1000
# An export is built in memory: its payloads, the decoded arrays and the file (about 3x this at the peak).
MAX_EXPORT_SAMPLES = 10_000
MAX_EXPORT_BYTES = 128 * 1024 * 1024
MAX_SINCE_S = 365 * 86400
NARROW = "narrow --since (since_s) or lower --limit"

Reason = Literal["random", "uncertain", "disagreement"]


class SampleBody(BaseModel):
    id: int = Field(description="The stored result's id: the cursor (after_id).")
    device_id: str
    seq: int = Field(description="The device's sequence number of the record.")
    model: str
    version: int
    created_at_ms: int = Field(description="When the device kept it, by the device's clock.")
    received_at_ms: int
    reason: str = Field(description='Why it was kept: "random", "uncertain" or "disagreement".')
    measure: str = Field(description='What judged it: "margin", "top1", "entropy", a comparator rule; "" if random.')
    score: float = Field(description="The measure's value for this input.")
    engine: str = Field(description='The engine that answered, e.g. "onnxruntime/CPUExecutionProvider".')
    precision: str = Field(description='The answering version\'s precision: "fp32", "fp16", "int8".')
    shadow_version: int = Field(description="For a disagreement: the shadow version; else 0.")
    payload_bytes: int = Field(description="Size of the kept SampledInference (inputs and outputs).")


class SamplePageBody(BaseModel):
    samples: list[SampleBody] = Field(description="Oldest first.")
    next_after_id: int = Field(description="Pass back as after_id to go on.")
    more: bool = Field(description="False once the scan reached the newest sample; true: go on from next_after_id.")
    scanned: int = Field(description="Candidate rows read (reason and engine are filtered after reading).")


_ModelQuery = Annotated[str, Query(max_length=63, pattern=MODEL_NAME_PATTERN, description="model name, e.g. digits")]
_VersionQuery = Annotated[int | None, Query(ge=1, le=2**32 - 1, description="only this version")]
_ReasonQuery = Annotated[Reason | None, Query(description="only samples kept for this reason")]
_DeviceQuery = Annotated[
    str | None, Query(min_length=1, max_length=128, pattern=DEVICE_ID_PATTERN, description="only this device")
]
_SinceQuery = Annotated[
    int | None, Query(ge=1, le=MAX_SINCE_S, description="only samples kept in the last since_s (device clock)")
]
_EngineQuery = Annotated[str | None, Query(min_length=1, max_length=128, description="only this engine")]
_AfterQuery = Annotated[int, Query(ge=0, le=MAX_ID, description="samples with a larger id (the cursor)")]


def _exporter() -> Any:
    """samples_export.export_file, or NotInstalled where this cloud-sync lacks numpy and ONNX Runtime's extra."""
    try:
        from cloud_sync.samples_export import export_file
    except ImportError as exc:
        raise NotInstalled(
            f"exporting samples decodes their tensors with numpy ({exc.name or exc} is not installed here): "
            'install cloud-sync with pip install "edgefleet[cloud,compress]"'
        ) from None
    return export_file


def _query(
    model: str, version: int | None, reason: str | None, device: str | None, since_s: int | None, engine: str | None
) -> SampleQuery:
    since_ms = int(time.time() * 1000) - since_s * 1000 if since_s is not None else None
    return SampleQuery(model, version, reason, device, since_ms, None, engine).check()


def samples_routes(
    db: Database, admin_token: str | BearerAuth, audit: AuditLog | None = None, *, max_bytes: int = MAX_EXPORT_BYTES
) -> Callable[[FastAPI], None]:
    """The routes, for ApiContext.extra_routes; each export is recorded in `audit`."""
    auth = as_auth(admin_token)
    viewer, operator = auth.require("viewer"), auth.require("operator")
    store = SampleStore(db)
    record = recorder(audit)

    def add(app: FastAPI) -> None:
        @app.get("/v1/samples", tags=["samples"], dependencies=viewer, responses=errors(401, 403, 422, 503))
        def list_samples(
            model: _ModelQuery,
            version: _VersionQuery = None,
            reason: _ReasonQuery = None,
            device: _DeviceQuery = None,
            since_s: _SinceQuery = None,
            engine: _EngineQuery = None,
            after_id: _AfterQuery = 0,
            limit: Annotated[int, Query(ge=1, le=MAX_LIST)] = 100,
        ) -> SamplePageBody:
            """The samples devices kept of a model, oldest first, with why each was kept (no tensors)."""
            page = store.page(_query(model, version, reason, device, since_s, engine), after_id, limit)
            return SamplePageBody.model_validate(
                {
                    "samples": [s.summary() for s in page.samples],
                    "next_after_id": page.next_after_id,
                    "more": page.more,
                    "scanned": page.scanned,
                }
            )

        @app.get(
            "/v1/samples/export",
            tags=["samples"],
            dependencies=operator,
            response_class=Response,
            responses={
                200: {
                    "description": "The export file; its manifest is its manifest.json member (npz) or its "
                    "schema metadata key edgefleet.manifest (Parquet).",
                    "content": {
                        t: {"schema": {"type": "string", "format": "binary"}} for t in EXPORT_MEDIA_TYPES.values()
                    },
                },
                **errors(401, 403, 413, 422, 501, 503),
            },
        )
        def export_samples(
            request: Request,
            model: _ModelQuery,
            version: _VersionQuery = None,
            reason: _ReasonQuery = None,
            device: _DeviceQuery = None,
            since_s: _SinceQuery = None,
            engine: _EngineQuery = None,
            after_id: _AfterQuery = 0,
            limit: Annotated[
                int, Query(ge=1, json_schema_extra={"maximum": MAX_EXPORT_SAMPLES}, description="samples at most")
            ] = 1000,
            format: Annotated[Literal["npz", "parquet"], Query(description="the file's format")] = "npz",
        ) -> Response:
            """A file of the samples (inputs, outputs, who and why) and its manifest, oldest first."""
            if limit > MAX_EXPORT_SAMPLES:
                raise InvalidArgument(
                    f"limit: an export holds at most {MAX_EXPORT_SAMPLES} samples, not {limit}: {NARROW}"
                )
            query = _query(model, version, reason, device, since_s, engine)
            try:
                page = store.page(query, after_id, limit, max_bytes=max_bytes)
            except TooLarge as exc:
                raise TooLarge(f"export past {max_bytes} bytes ({exc.message}): {NARROW}") from None
            asked = {**query.to_json(), "after_id": after_id, "limit": limit}
            export_file = _exporter()
            made = export_file(page.samples, asked, format, {"next_after_id": page.next_after_id, "more": page.more})
            info = made.manifest
            record(
                AuditDraft(
                    actor_of(request),
                    "samples.export",
                    f"samples/{model}",
                    None,
                    {"query": asked, "format": format, "count": info["count"], "bytes": len(made.content)},
                )
            )
            return Response(
                made.content,
                media_type=made.media_type,
                headers={"Content-Disposition": f'attachment; filename="{made.filename}"'},
            )

    return add
