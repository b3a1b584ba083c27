"""The operators' dashboard: static files served by cloud-sync's admin API app at /dashboard/, and its one view.

The page is plain ES modules and uPlot, shipped in static/ (no build step, nothing fetched at run time); it
signs in with an admin-API token and does everything through the admin API. The one route it adds to the
API is `GET /v1/models/series` (cloud_sync/api_series.py), for its charts.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.responses import RedirectResponse
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cloud_sync.api_auth import BearerAuth
from cloud_sync.api_series import series_routes
from cloud_sync.store import Database, DeviceRegistry

__all__ = ["STATIC_DIR", "dashboard_routes"]

STATIC_DIR = Path(__file__).parent / "static"

# The page holds a bearer token: it runs only its own scripts and talks only to its own origin (no inline
# script, no framing). uPlot sets styles through the CSSOM, which style-src does not govern.
_HEADERS = [
    (
        b"content-security-policy",
        b"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        b"connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    # A new release's files are picked up on the next load (the files are small; an ETag saves the bytes).
    (b"cache-control", b"no-cache"),
]


class _WithHeaders:
    """ASGI wrapper: the static files' answers with the headers above."""

    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *_HEADERS]}
            await send(message)

        await self._app(scope, receive, sending)


def dashboard_routes(
    db: Database, telemetry: Any, devices: DeviceRegistry, auth: str | BearerAuth
) -> Callable[[FastAPI], None]:
    """The dashboard's static files at /dashboard/, `GET /` redirecting there, and `GET /v1/models/series`."""
    add_series = series_routes(db, devices, auth)

    def add(app: FastAPI) -> None:
        add_series(app)

        @app.get("/", include_in_schema=False)
        def root() -> RedirectResponse:
            return RedirectResponse("/dashboard/", status_code=307)

        @app.get("/dashboard", include_in_schema=False)
        def dashboard_slash() -> RedirectResponse:
            return RedirectResponse("/dashboard/", status_code=307)

        app.mount("/dashboard", _WithHeaders(StaticFiles(directory=STATIC_DIR, html=True)), name="dashboard")

    return add
