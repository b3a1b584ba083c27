"""uvicorn inside a process that owns its signals: edge-agent and cloud-sync drain on SIGTERM and stop their
HTTP servers themselves, so uvicorn must not install SIGINT/SIGTERM handlers of its own.

Imported only where uvicorn is installed (the `agent` and `cloud` extras): edge_runtime/kserve/http.py and
cloud_sync/process.py.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import uvicorn

__all__ = ["EmbeddedServer"]


class EmbeddedServer(uvicorn.Server):
    """A uvicorn.Server that leaves the process's signal handlers alone (uvicorn >= 0.29 takes them in
    capture_signals)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield
