"""GET /v1/models/series over a real store (SQLite file and PostgreSQL schema): per version, per step, the
fleet's latency, throughput and error rate from the stored telemetry windows; bad queries get a 422 naming the
parameter."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

import cloud_sync.store.telemetry  # noqa: F401  (registers the telemetry tables before the schema is made)
from cloud_sync.api import ApiContext, create_app
from cloud_sync.api_auth import BearerAuth
from cloud_sync.dashboard import STATIC_DIR, dashboard_routes
from cloud_sync.store import Database, DeviceRegistry, ResultStore, open_database
from cloud_sync.store.series import SeriesPoint, model_series, point
from cloud_sync.store.telemetry import TelemetryReceived, TelemetryStore
from edgefleet.proto.edgefleet.v1.state_pb2 import MODEL_ROLE_ACTIVE
from edgefleet.proto.edgefleet.v1.telemetry_pb2 import LatencySummary, ModelVersionTelemetry, Telemetry
from tests.postgres import ENGINES, postgres_schema_url

ADMIN, VIEWER = "admin-secret", "viewer-secret"
STEP_S = 60


@pytest.fixture(params=ENGINES)
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    if request.param == "sqlite":
        database = open_database(f"sqlite:///{tmp_path / 'cloud.db'}")
        yield database
        database.close()
        return
    with postgres_schema_url() as url:
        database = open_database(url)
        yield database
        database.close()


def _message(device: str, seq: int, at_ms: int, *versions: tuple[int, int, int, float, float]) -> TelemetryReceived:
    """A device's window ending at `at_ms`: per version (version, requests, errors, p50, p99), 10 s long."""
    message = Telemetry(
        device_id=device,
        seq=seq,
        timestamp_ms=at_ms,
        window_s=10.0,
        agent_start_ms=1,
        models=[
            ModelVersionTelemetry(
                name="digits",
                version=v,
                role=MODEL_ROLE_ACTIVE,
                requests=requests,
                errors=errors,
                inferences=requests,
                latency=LatencySummary(p50_ms=p50, p95_ms=p99, p99_ms=p99),
                mean_batch_size=1.0,
            )
            for v, requests, errors, p50, p99 in versions
        ],
    )
    return TelemetryReceived(device, message, message.SerializeToString(), at_ms)


def _step_start(ms: int) -> int:
    return ms - ms % (STEP_S * 1000)


def _fill(db: Database) -> int:
    """Two devices over two steps: v1 on both, v2 on cam-2 in the second step. The first step's start."""
    registry = DeviceRegistry(db)
    registry.add_device("cam-1", {"site": "lab"})
    registry.add_device("cam-2", {"site": "yard"})
    start = _step_start(int(time.time() * 1000)) - STEP_S * 1000
    store = TelemetryStore(db)
    store.write(
        [
            _message("cam-1", 1, start + 10_000, (1, 100, 0, 2.0, 4.0)),
            _message("cam-2", 1, start + 10_000, (1, 300, 3, 4.0, 8.0)),
            _message("cam-1", 2, start + STEP_S * 1000 + 5_000, (1, 50, 5, 2.0, 4.0)),
            _message("cam-2", 2, start + STEP_S * 1000 + 5_000, (2, 200, 0, 1.0, 2.0)),
        ]
    )
    return start


def test_series_are_per_version_and_step_weighted_by_requests(db: Database) -> None:
    start = _fill(db)
    series = model_series(db, "digits", start - 1, STEP_S)
    assert [s.version for s in series] == [1, 2]
    v1, v2 = series
    first, second = v1.points
    assert first.t_ms == start and second.t_ms == start + STEP_S * 1000
    # Request-weighted: (100 x 2 + 300 x 4) / 400; both devices covered 10 s of the step.
    assert first.p50_ms == pytest.approx(3.5) and first.p99_ms == pytest.approx(7.0)
    assert first.requests_per_s == pytest.approx(400 / 10) and first.error_rate == pytest.approx(3 / 400)
    assert second.error_rate == pytest.approx(0.1) and second.requests_per_s == pytest.approx(5.0)
    assert [p.t_ms for p in v2.points] == [start + STEP_S * 1000] and v2.points[0].p99_ms == pytest.approx(2.0)
    # Only the devices asked for; only windows after since.
    [only] = model_series(db, "digits", start - 1, STEP_S, ["cam-1"])
    assert only.version == 1 and only.points[0].requests_per_s == pytest.approx(10.0)
    assert model_series(db, "digits", start - 1, STEP_S, []) == []
    assert model_series(db, "other", start - 1, STEP_S) == []
    [late] = [s for s in model_series(db, "digits", start + 10_000, STEP_S) if s.version == 1]
    assert [p.t_ms for p in late.points] == [start + STEP_S * 1000]


def test_a_step_without_requests_has_no_latency_nor_error_rate() -> None:
    from cloud_sync.store.series import _Sums

    assert point(5, _Sums(devices=1, window_s=10.0), 60) == SeriesPoint(5, None, None, 0.0, None)
    # Windows straddling the step cover at most the step: the rate is never inflated past it.
    assert point(5, _Sums(requests=600, window_s=200.0, devices=1), 60).requests_per_s == pytest.approx(10.0)


def _client(db: Database) -> TestClient:
    """The admin API app as cloud-sync builds it (its error mapping included), with the dashboard's routes."""
    auth = BearerAuth({ADMIN: "admin", VIEWER: "viewer"})
    routes = [dashboard_routes(db, TelemetryStore(db), DeviceRegistry(db), auth)]
    app = create_app(ApiContext(DeviceRegistry(db), ResultStore(db), auth, CollectorRegistry(), routes))
    return TestClient(app, follow_redirects=False)


def test_the_route_answers_a_viewer_and_refuses_bad_queries(db: Database) -> None:
    start = _fill(db)
    with _client(db) as client:
        bearer = {"authorization": f"Bearer {VIEWER}"}
        answer = client.get("/v1/models/series", params={"model": "digits", "since_s": 600}, headers=bearer)
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["model"] == "digits" and body["step_s"] == 60
        assert [v["version"] for v in body["versions"]] == [1, 2]
        assert body["versions"][0]["points"][0] == {
            "t_ms": start,
            "p50_ms": pytest.approx(3.5),
            "p99_ms": pytest.approx(7.0),
            "requests_per_s": pytest.approx(40.0),
            "error_rate": pytest.approx(0.0075),
        }
        # A week without a step: the least step that keeps a version to MAX_POINTS points, not a refusal.
        week = client.get("/v1/models/series", params={"model": "digits", "since_s": 604800}, headers=bearer)
        assert week.status_code == 200 and week.json()["step_s"] == 303, week.text
        lab = client.get("/v1/models/series", params={"model": "digits", "selector": "site=lab"}, headers=bearer)
        assert [v["version"] for v in lab.json()["versions"]] == [1]
        assert client.get("/v1/models/series", params={"model": "digits"}).status_code == 401
        for params, word in (
            ({}, "model"),
            ({"model": "Not A Name"}, "model"),
            ({"model": "digits", "since_s": 59}, "since_s"),
            ({"model": "digits", "since_s": 604801}, "since_s"),
            ({"model": "digits", "step_s": 9}, "step_s"),
            ({"model": "digits", "step_s": 3601}, "step_s"),
            ({"model": "digits", "since_s": 604800, "step_s": 10}, "step_s"),
            ({"model": "digits", "selector": "site"}, "selector"),
            ({"model": "digits", "selector": "site = lab"}, "selector"),
        ):
            refused = client.get("/v1/models/series", params=params, headers=bearer)
            assert refused.status_code == 422, (params, refused.text)
            assert word in refused.json()["detail"], (params, refused.text)


def test_the_dashboard_files_are_served_without_a_token_and_slash_redirects(db: Database) -> None:
    with _client(db) as client:
        page = client.get("/dashboard/")
        assert page.status_code == 200 and "<title>Edgefleet dashboard</title>" in page.text
        assert "default-src 'self'" in page.headers["content-security-policy"]
        assert client.get("/dashboard/app.js").headers["content-type"].startswith("text/javascript")
        assert client.get("/").headers["location"] == "/dashboard/"
        assert client.get("/dashboard").headers["location"] == "/dashboard/"
        assert client.get("/dashboard/nope.js").status_code == 404
    # What ships: no file fetched from elsewhere (no http(s) URL in what the page loads).
    for path in STATIC_DIR.rglob("*"):
        if path.suffix in (".html", ".js", ".css") and "vendor" not in path.parts:
            text = path.read_text()
            assert "http://" not in text and "https://" not in text, path
