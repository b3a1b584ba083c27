"""The admin API's model comparison: the five figures of two model versions over the same devices and window.

`GET /v1/models/compare?a=digits:1&b=digits:2[&selector=site=lab][&since_s=3600]`: per version latency
(p50/p95/p99), throughput, error rate, resource use and cost per inference (CPU-seconds, joules where the
device reports energy), from the per-version telemetry windows the cloud stores; what the registry says of it
(model.onnx's size, a compressed variant's precision and lineage); its agreement as a SHADOW beside what the
devices ran; and B relative to A. Not the rollout gates (cloud_sync/rollouts/gates.py), which read the same
windows per stage.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any

import sqlalchemy as sa
from fastapi import FastAPI, Query
from pydantic import BaseModel, ConfigDict, Field

from cloud_sync.api_auth import BearerAuth, as_auth, errors
from cloud_sync.api_schemas import SELECTOR_TEXT_PATTERN, VERSION_REF_PATTERN, Comparison, Figures
from cloud_sync.errors import InvalidArgument
from cloud_sync.registry.store import check_model_ref, model_versions
from cloud_sync.rollouts.plan import variant_of
from cloud_sync.selectors import format_selector, matches, parse_selector
from cloud_sync.store import Database, DeviceRegistry, TelemetryStore
from cloud_sync.store.telemetry import model_telemetry
from cloud_sync.telemetry.rollup import ModelWindow
from edgefleet.proto.edgefleet.v1.state_pb2 import MODEL_ROLE_SHADOW

__all__ = [
    "DEFAULT_SINCE_S",
    "MAX_SINCE_S",
    "VariantComparison",
    "VersionFigures",
    "compare_routes",
    "figures",
    "parse_version_ref",
]

DEFAULT_SINCE_S = 3600
# In the schema only: parse_version_ref's message names the parameter.
REF = {"pattern": VERSION_REF_PATTERN}
SELECTOR_TEXT = {"pattern": SELECTOR_TEXT_PATTERN}
_SELECTOR_TEXT = re.compile(SELECTOR_TEXT_PATTERN)
MAX_SINCE_S = 30 * 86400
# The largest IN (...) list one statement carries (as the telemetry store's own queries).
_IN_CHUNK = 1000
# The figures `relative` divides B by A for (lower is better for all but throughput).
_RELATIVE = (
    "p50_ms",
    "p95_ms",
    "p99_ms",
    "requests_per_s",
    "error_rate",
    "cpu_seconds_per_inference",
    "joules_per_inference",
    "size_bytes",
)


class ParentRef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    version: int | None = Field(description="null where the registered lineage does not say.")


class LineageView(BaseModel):
    """A compressed variant's lineage as the registry holds it (the manifest's `lineage`)."""

    model_config = ConfigDict(extra="forbid")
    parent: ParentRef
    method: str = Field(description="fp16, int8-static or int8-dynamic; '' where the lineage does not say.")
    precision: str = Field(description="fp16 or int8; '' where the lineage does not say.")


class VersionFigures(Figures):
    """One version's figures in GET /v1/models/compare: the five figures, the registry's facts, its shadow."""

    registered: bool = Field(description="Whether the registry holds the version (size, lineage: null if not).")
    size_bytes: int | None = Field(description="model.onnx's size in the registry.")
    precision: str | None = Field(description="A variant's (its lineage's); null for a version made as built.")
    lineage: LineageView | None = Field(description="Parent and method of a compressed variant; null otherwise.")
    shadow_role_compared: int = Field(description="Rows compared while this version ran as a SHADOW candidate.")
    shadow_role_agreed: int = Field(description="Of those, rows on which it agreed with the ACTIVE version.")
    shadow_role_agreement: float | None = Field(description="agreed / compared; null where nothing was compared.")


class VariantComparison(Comparison):
    a: VersionFigures
    b: VersionFigures


def parse_version_ref(text: str, what: str) -> tuple[str, int]:
    """`digits:2` -> ("digits", 2); InvalidArgument naming `what` otherwise."""
    name, sep, version = text.partition(":")
    if not sep or not version.isdigit():
        raise InvalidArgument(f"{what}: {text[:80]!r} is not name:version, e.g. digits:2")
    try:
        return check_model_ref(name, int(version))
    except InvalidArgument as exc:
        raise InvalidArgument(f"{what}: {exc.message}") from None


@dataclass(frozen=True)
class Percentiles:
    """Request-weighted means of the window p50/p95/p99 of one version on some devices."""

    p50_ms: float
    p95_ms: float
    p99_ms: float


def _percentiles(db: Database, model: str, version: int, ids: Sequence[str], since_ms: int) -> Percentiles:
    """The typical request's latency: each window's percentiles weighted by its requests, summed across
    devices in SQL (the histograms are not shipped, so no true fleet percentile exists; see rollup.py)."""
    m = model_telemetry.c
    sums = [
        sa.func.sum(m.requests).label("requests"),
        sa.func.sum(m.requests * m.p50_ms).label("p50"),
        sa.func.sum(m.requests * m.p95_ms).label("p95"),
        sa.func.sum(m.requests * m.p99_ms).label("p99"),
    ]
    base = sa.select(*sums).where(m.model == model, m.version == version, m.window_end_ms > since_ms)

    def query(conn: sa.Connection) -> list[float]:
        total = [0.0, 0.0, 0.0, 0.0]
        for start in range(0, len(ids), _IN_CHUNK):
            row = conn.execute(base.where(m.device_id.in_(ids[start : start + _IN_CHUNK]))).one()
            total = [t + float(v or 0) for t, v in zip(total, row, strict=True)]
        return total

    requests, p50, p95, p99 = db.read(query)
    if not requests:
        return Percentiles(0.0, 0.0, 0.0)
    return Percentiles(p50 / requests, p95 / requests, p99 / requests)


def _shadow_role(db: Database, model: str, version: int, ids: Sequence[str], since_ms: int) -> tuple[int, int]:
    """(compared, agreed) rows of `model:version` while it ran as a SHADOW candidate on `ids` since `since_ms`:
    its agreement with whatever those devices ran ACTIVE (a rollout's A) on their live inputs."""
    m = model_telemetry.c
    base = sa.select(sa.func.sum(m.shadow_compared), sa.func.sum(m.shadow_agreed)).where(
        m.model == model, m.version == version, m.role == MODEL_ROLE_SHADOW, m.window_end_ms > since_ms
    )

    def query(conn: sa.Connection) -> tuple[int, int]:
        compared = agreed = 0
        for start in range(0, len(ids), _IN_CHUNK):
            row = conn.execute(base.where(m.device_id.in_(ids[start : start + _IN_CHUNK]))).one()
            compared, agreed = compared + int(row[0] or 0), agreed + int(row[1] or 0)
        return compared, agreed

    return db.read(query)


def registered(db: Database, model: str, version: int) -> dict[str, Any]:
    """What the registry says of a version: whether it holds it, model.onnx's size, a variant's lineage."""
    v = model_versions.c
    row = db.read(
        lambda conn: conn.execute(
            sa.select(v.size, v.manifest).where(v.name == model, v.version == version)
        ).one_or_none()
    )
    if row is None:
        return {"registered": False, "size_bytes": None, "precision": None, "lineage": None}
    variant = variant_of(dict(row.manifest))
    lineage = (
        {
            "parent": {"name": model, "version": variant.parent_version},
            "method": variant.method,
            "precision": variant.precision,
        }
        if variant is not None
        else None
    )
    return {
        "registered": True,
        "size_bytes": int(row.size),
        "precision": (variant.precision or None) if variant is not None else None,
        "lineage": lineage,
    }


def figures(window: ModelWindow, latency: Percentiles) -> dict[str, Any]:
    """One version's five figures (and what they come from) as the API shows them."""
    return {
        "model": window.model,
        "version": window.version,
        "devices": window.devices,
        "requests": window.requests,
        "errors": window.errors,
        "inferences": window.inferences,
        # Latency: the typical request (request-weighted window percentiles) and the worst device's p99,
        # which the rollout gates read.
        "p50_ms": latency.p50_ms,
        "p95_ms": latency.p95_ms,
        "p99_ms": latency.p99_ms,
        "p99_worst_device_ms": window.p99_ms,
        "p99_max_ms": window.p99_max_ms,
        "requests_per_s": window.requests_per_s,
        "mean_batch_size": window.mean_batch_size,
        "error_rate": window.error_rate,
        "cpu_seconds": window.cpu_seconds,
        "cpu_seconds_per_inference": window.cpu_seconds_per_inference,
        # Energy only where the device reports it (power rails on a Jetson): None, not 0, elsewhere.
        "energy_joules": window.energy_joules if window.energy_joules > 0 else None,
        "joules_per_inference": window.joules_per_inference if window.energy_joules > 0 else None,
        "shadow_compared": window.shadow_compared,
        "shadow_agreement": window.shadow_agreement if window.shadow_compared else None,
    }


def relative(a: dict[str, Any], b: dict[str, Any]) -> dict[str, float | None]:
    """B / A per figure; None where either has no value or A's is 0 (nothing to compare with). Telemetry figures
    need requests of both; the size only that both are registered."""
    shown: dict[str, float | None] = {}
    for key in _RELATIVE:
        x, y = a.get(key), b.get(key)
        measured = key == "size_bytes" or (a["requests"] and b["requests"])
        shown[key] = y / x if x and y is not None and measured else None
    return shown


def compare_routes(
    db: Database, telemetry: TelemetryStore, devices: DeviceRegistry, admin_token: str | BearerAuth
) -> Callable[[FastAPI], None]:
    """The route, for ApiContext.extra_routes."""
    viewer = as_auth(admin_token).require("viewer")

    def add(app: FastAPI) -> None:
        @app.get("/v1/models/compare", tags=["models"], dependencies=viewer, responses=errors(401, 403, 422, 503))
        def compare_models(
            a: Annotated[str, Query(max_length=100, description="version A, e.g. digits:1", json_schema_extra=REF)],
            b: Annotated[str, Query(max_length=100, description="version B, e.g. digits:2", json_schema_extra=REF)],
            selector: Annotated[
                str,
                Query(
                    max_length=10_400, json_schema_extra=SELECTOR_TEXT, description="key=value,...; '' for all devices"
                ),
            ] = "",
            since_s: Annotated[int, Query(ge=1, le=MAX_SINCE_S, description="the window: the last since_s")] = (
                DEFAULT_SINCE_S
            ),
        ) -> VariantComparison:
            """Latency, throughput, error rate and cost per inference of two versions on the same devices; their
            size, precision and lineage; each one's agreement while it ran as a SHADOW beside the ACTIVE one."""
            refs = parse_version_ref(a, "a"), parse_version_ref(b, "b")
            try:
                chosen = parse_selector(selector)
            except InvalidArgument as exc:
                raise InvalidArgument(f"selector: {exc.message}") from None
            if not _SELECTOR_TEXT.fullmatch(selector):
                # What the schema says, so that what it forbids is refused (spaces parse_selector would strip).
                raise InvalidArgument(f"selector: write it as {format_selector(chosen)!r}: no spaces around = and ,")
            ids = sorted(d.device_id for d in devices.list_devices() if not d.revoked and matches(chosen, d.labels))
            since_ms = int(time.time() * 1000) - since_s * 1000
            shown = []
            for name, version in refs:
                window = telemetry.model_window(name, version, ids, since_ms)
                compared, agreed = _shadow_role(db, name, version, ids, since_ms)
                shown.append(
                    {
                        **figures(window, _percentiles(db, name, version, ids, since_ms)),
                        **registered(db, name, version),
                        "shadow_role_compared": compared,
                        "shadow_role_agreed": agreed,
                        "shadow_role_agreement": agreed / compared if compared else None,
                    }
                )
            return VariantComparison.model_validate(
                {
                    "selector": chosen,
                    "selector_text": format_selector(chosen),
                    "since_s": since_s,
                    "devices_selected": len(ids),
                    "a": shown[0],
                    "b": shown[1],
                    "relative": relative(shown[0], shown[1]),
                }
            )

    return add
