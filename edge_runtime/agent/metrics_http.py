"""The agent's Prometheus endpoint: GET /metrics on its own threads; every other path is 404.

prometheus_client's start_http_server answers every path with the metrics (200), so a readiness probe or a
typo pointed at it always "passes". Served by wsgiref's threading server, off the agent's loop: a scrape
only reads counters.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app

__all__ = ["METRICS_PATH", "MetricsServer", "metrics_app"]

METRICS_PATH = "/metrics"
NOT_FOUND = b"404 not found: this port serves Prometheus metrics at /metrics only\n"

StartResponse = Callable[..., Any]
WsgiApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


def metrics_app(registry: CollectorRegistry) -> WsgiApp:
    """A WSGI app answering GET/HEAD /metrics from `registry`, 404 on any other path, 405 on other methods."""
    metrics = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("PATH_INFO", "") != METRICS_PATH:
            return _plain(start_response, "404 Not Found", NOT_FOUND)
        if environ.get("REQUEST_METHOD") not in ("GET", "HEAD"):
            return _plain(start_response, "405 Method Not Allowed", b"405: /metrics answers GET\n", allow="GET, HEAD")
        result: Iterable[bytes] = metrics(environ, start_response)
        return result

    return app


def _plain(start_response: StartResponse, status: str, body: bytes, **extra: str) -> list[bytes]:
    headers = [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))]
    headers += [(key.capitalize(), value) for key, value in extra.items()]
    start_response(status, headers)
    return [body]


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a scrape in flight never holds up the agent's exit


class _IPv6Server(_ThreadingServer):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes are not log lines (STYLE: nothing per request on the log)."""


class MetricsServer:
    """Listening on (host, port) at once; serving from a daemon thread named `metrics-http`."""

    def __init__(self, host: str, port: int, registry: CollectorRegistry) -> None:
        server_class = _IPv6Server if ":" in host else _ThreadingServer
        self._httpd = make_server(host, port, metrics_app(registry), server_class, handler_class=_QuietHandler)
        self.port = int(self._httpd.server_port)
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="metrics-http", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Blocks up to serve_forever's poll interval (0.5 s): call it off the loop."""
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)
