"""The admin API's model time series: latency, throughput and error rate per version over time, for charts.

`GET /v1/models/series?model=digits[&since_s=3600][&step_s=60][&selector=site=lab]` reads the per-version
telemetry windows (cloud_sync/store/series.py). The dashboard's charts poll it; fleetctl shows the same
figures for one window with `models compare`. Not the comparison of two versions (api_compare.py).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Annotated

from fastapi import FastAPI, Query
from pydantic import BaseModel, Field

from cloud_sync.api_auth import BearerAuth, as_auth, errors
from cloud_sync.api_schemas import MODEL_NAME_PATTERN, SELECTOR_TEXT_PATTERN
from cloud_sync.errors import InvalidArgument
from cloud_sync.selectors import format_selector, matches, parse_selector
from cloud_sync.store import Database, DeviceRegistry
from cloud_sync.store.series import model_series

__all__ = ["MAX_SINCE_S", "MAX_STEP_S", "MIN_SINCE_S", "MIN_STEP_S", "SeriesAnswer", "series_routes"]

MIN_SINCE_S, MAX_SINCE_S, DEFAULT_SINCE_S = 60, 7 * 86400, 3600
MIN_STEP_S, MAX_STEP_S, DEFAULT_STEP_S = 10, 3600, 60
# At most this many points a version: a week at 10 s steps would be 60,480 a line, past what a chart shows.
MAX_POINTS = 2000
_SELECTOR_TEXT = re.compile(SELECTOR_TEXT_PATTERN)


class SeriesPointBody(BaseModel):
    t_ms: int = Field(description="Start of the step (ms since the epoch): windows that ended in [t_ms, t_ms+step).")
    p50_ms: float | None = Field(description="Request-weighted mean of the windows' p50; null: no requests.")
    p99_ms: float | None = Field(description="Request-weighted mean of the windows' p99; null: no requests.")
    requests_per_s: float = Field(description="The fleet's request rate over the step.")
    error_rate: float | None = Field(description="Errors / requests; null: no requests.")


class VersionSeriesBody(BaseModel):
    version: int
    points: list[SeriesPointBody] = Field(description="Oldest first; a step with no window has no point.")


class SeriesAnswer(BaseModel):
    model: str
    step_s: int
    versions: list[VersionSeriesBody] = Field(description="Each version with windows in the time asked, by version.")


def series_routes(db: Database, devices: DeviceRegistry, admin_token: str | BearerAuth) -> Callable[[FastAPI], None]:
    """The route, for ApiContext.extra_routes (the dashboard's routes add it)."""
    viewer = as_auth(admin_token).require("viewer")

    def add(app: FastAPI) -> None:
        @app.get("/v1/models/series", tags=["models"], dependencies=viewer, responses=errors(401, 403, 422, 503))
        def model_series_route(
            model: Annotated[str, Query(max_length=63, pattern=MODEL_NAME_PATTERN, description="a model name")],
            since_s: Annotated[
                int, Query(ge=MIN_SINCE_S, le=MAX_SINCE_S, description="the time shown: the last since_s")
            ] = DEFAULT_SINCE_S,
            step_s: Annotated[
                int | None,
                Query(
                    ge=MIN_STEP_S,
                    le=MAX_STEP_S,
                    description=f"seconds a point covers (default {DEFAULT_STEP_S}, or the least that keeps a "
                    f"version to {MAX_POINTS} points over since_s)",
                ),
            ] = None,
            selector: Annotated[
                str,
                Query(
                    max_length=10_400,
                    json_schema_extra={"pattern": SELECTOR_TEXT_PATTERN},
                    description="key=value,...; '' for all devices",
                ),
            ] = "",
        ) -> SeriesAnswer:
            """Latency p50/p99, throughput and error rate of each version of a model, a point per step."""
            if step_s is None:  # a week asked for without a step: coarser steps, not a refusal
                step_s = max(DEFAULT_STEP_S, -(-since_s // MAX_POINTS))
            if since_s // step_s > MAX_POINTS:
                raise InvalidArgument(
                    f"step_s: {step_s} s steps over {since_s} s make {since_s // step_s} points a version; "
                    f"at most {MAX_POINTS}: use step_s >= {-(-since_s // MAX_POINTS)}"
                )
            ids = None
            if selector:
                try:
                    chosen = parse_selector(selector)
                except InvalidArgument as exc:
                    raise InvalidArgument(f"selector: {exc.message}") from None
                if not _SELECTOR_TEXT.fullmatch(selector):
                    raise InvalidArgument(
                        f"selector: write it as {format_selector(chosen)!r}: no spaces around = and ,"
                    )
                ids = sorted(d.device_id for d in devices.list_devices() if not d.revoked and matches(chosen, d.labels))
            since_ms = int(time.time() * 1000) - since_s * 1000
            found = model_series(db, model, since_ms, step_s, ids)
            return SeriesAnswer.model_validate(
                {
                    "model": model,
                    "step_s": step_s,
                    "versions": [{"version": s.version, "points": [vars(p) for p in s.points]} for s in found],
                }
            )

    return add
