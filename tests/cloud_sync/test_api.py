"""The admin HTTP API of a real cloud-sync, through httpx: auth, devices, results paging, input validation.

Every refusal is a 4xx with a reason that names what was wrong; the OpenAPI schema lists every route.
"""

from __future__ import annotations

import asyncio
import base64
import json
import select
import socket
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from starlette.routing import Route
from structlog.testing import capture_logs

from cloud_sync.api import ApiContext, create_app
from cloud_sync.api_auth import BearerAuth
from cloud_sync.store import DeviceRegistry, ResultStore, open_database
from cloud_sync.store.batches import record_checksum
from edgefleet.proto.edgefleet.v1 import results_pb2
from tests.cloud_sync.conftest import RunningCloudSync, batch, record

ADMIN_ROUTES = [
    ("GET", "/v1/devices"),
    ("POST", "/v1/devices"),
    ("GET", "/v1/devices/{device_id}"),
    ("POST", "/v1/devices/{device_id}/revoke"),
    ("GET", "/v1/results"),
    ("GET", "/v1/results/cursor"),
    ("GET", "/v1/devices/{device_id}/quarantine"),
]


def detail_locations(response: httpx.Response) -> list[str]:
    """The dotted locations a 422's `errors` name (body.device_id, query.limit...); the detail names them too."""
    body = response.json()
    assert isinstance(body["detail"], str) and body["errors"], body
    return [".".join(str(part) for part in error["loc"]) for error in body["errors"]]


@pytest.mark.parametrize("method, path", ADMIN_ROUTES)
@pytest.mark.parametrize(
    "authorization",
    [None, "Bearer efa_wrong", "Basic YWRtaW46YWRtaW4=", "Bearer"],
    ids=["missing", "wrong-token", "not-bearer", "empty-bearer"],
)
def test_every_admin_route_needs_the_admin_token(
    cloud_sync: RunningCloudSync, method: str, path: str, authorization: str | None
) -> None:
    headers = {"Authorization": authorization} if authorization else {}
    url = cloud_sync.http_url + path.replace("{device_id}", "nobody")
    response = httpx.request(method, url, headers=headers, json={"device_id": "x"}, trust_env=False)
    assert response.status_code == 401, response.text
    assert response.headers["WWW-Authenticate"] == "Bearer"
    assert "admin-token" in response.json()["detail"]


def test_health_and_metrics_are_open(cloud_sync: RunningCloudSync) -> None:
    health = httpx.get(cloud_sync.http_url + "/healthz", trust_env=False)
    assert (health.status_code, health.json()) == (200, {"status": "ok"})
    metrics = httpx.get(cloud_sync.http_url + "/metrics", trust_env=False)
    assert metrics.status_code == 200
    assert metrics.headers["content-type"].startswith("text/plain")


def test_a_device_is_created_once_and_its_token_shown_only_then(cloud_sync: RunningCloudSync) -> None:
    created = cloud_sync.api.post("/v1/devices", json={"device_id": "api-cam-1", "labels": {"site": "lab"}})
    assert created.status_code == 201, created.text
    body = created.json()
    assert body["device_id"] == "api-cam-1" and body["labels"] == {"site": "lab"}
    assert body["token"].startswith("efd_")

    again = cloud_sync.api.post("/v1/devices", json={"device_id": "api-cam-1"})
    assert again.status_code == 409
    assert "api-cam-1" in again.json()["detail"]

    shown = cloud_sync.device("api-cam-1")
    listed = cloud_sync.api.get("/v1/devices").json()["devices"]
    assert shown["labels"] == {"site": "lab"} and shown["revoked"] is False
    assert any(d["device_id"] == "api-cam-1" for d in listed)
    assert body["token"] not in repr(shown) + repr(listed)


INVALID_DEVICES: dict[str, tuple[dict[str, Any], str]] = {
    "id-with-space": ({"device_id": "cam 1"}, "device id"),
    "id-with-slash": ({"device_id": "site/cam"}, "device id"),
    "id-empty": ({"device_id": ""}, "body.device_id"),
    "id-too-long": ({"device_id": "c" * 129}, "body.device_id"),
    "id-missing": ({"labels": {}}, "body.device_id"),
    "id-not-a-string": ({"device_id": 17}, "body.device_id"),
    "label-key": ({"device_id": "ok-1", "labels": {"bad key": "v"}}, "label key"),
    "label-value-type": ({"device_id": "ok-2", "labels": {"site": 3}}, "body.labels.site"),
    "labels-not-a-map": ({"device_id": "ok-3", "labels": ["site=lab"]}, "body.labels"),
    "unknown-field": ({"device_id": "ok-4", "lables": {"site": "lab"}}, "body.lables"),
    # Once stored, and from then on every GET /v1/devices failed with a 500 (the JSON encoder refused it).
    "label-value-lone-surrogate": ({"device_id": "ok-5", "labels": {"site": "\ud800"}}, "body.labels"),
    # cloud-sync's own broker identity: a device under it could read every device's topics.
    "reserved-id": ({"device_id": "cloud-sync"}, "reserved"),
}


@pytest.mark.parametrize("body, named", INVALID_DEVICES.values(), ids=INVALID_DEVICES.keys())
def test_an_invalid_device_is_refused_naming_the_field(
    cloud_sync: RunningCloudSync, body: dict[str, Any], named: str
) -> None:
    # json.dumps escapes a lone surrogate as JSON allows (httpx's json= would fail to encode it).
    sent = json.dumps(body).encode()
    response = cloud_sync.api.post("/v1/devices", content=sent, headers={"Content-Type": "application/json"})
    assert response.status_code == 422, response.text
    body = response.json()
    where = " ".join([body["detail"], *(".".join(str(p) for p in e["loc"]) for e in body["errors"])])
    assert named in where
    listed = cloud_sync.api.get("/v1/devices")
    assert listed.status_code == 200, listed.text
    assert body.get("device_id") not in [d["device_id"] for d in listed.json()["devices"]]


def test_a_body_that_is_not_json_is_refused(cloud_sync: RunningCloudSync) -> None:
    response = cloud_sync.api.post("/v1/devices", content=b"{not json", headers={"Content-Type": "application/json"})
    assert response.status_code == 422


def test_revoke_marks_the_device_and_is_idempotent(cloud_sync: RunningCloudSync) -> None:
    device_id, _ = cloud_sync.new_device("api")
    first = cloud_sync.api.post(f"/v1/devices/{device_id}/revoke")
    assert first.status_code == 200 and first.json()["revoked"] is True
    second = cloud_sync.api.post(f"/v1/devices/{device_id}/revoke")
    assert second.status_code == 200 and second.json()["revoked"] is True
    assert cloud_sync.device(device_id)["revoked"] is True


@pytest.mark.parametrize("method, suffix", [("GET", ""), ("POST", "/revoke"), ("GET", "/quarantine")])
def test_an_unknown_device_is_404(cloud_sync: RunningCloudSync, method: str, suffix: str) -> None:
    response = cloud_sync.api.request(method, f"/v1/devices/nobody-here{suffix}")
    assert response.status_code == 404
    assert "nobody-here" in response.json()["detail"]


def test_results_page_through_a_cursor_and_carry_their_payloads(cloud_sync: RunningCloudSync) -> None:
    device_id, token = cloud_sync.new_device("api")
    other_id, other_token = cloud_sync.new_device("api")
    payloads = {seq: f"result {seq}".encode() for seq in range(1, 6)}
    cloud_sync.upload(token, [batch(0, 5, records=[record(s, payload=p) for s, p in payloads.items()])])
    cloud_sync.upload(other_token, [batch(0, 2)])

    seen: list[int] = []
    after, pages = 0, 0
    while True:
        page = cloud_sync.api.get("/v1/results", params={"device_id": device_id, "after_id": after, "limit": 2})
        assert page.status_code == 200
        body = page.json()
        if not body["results"]:
            assert body["next_after_id"] == after
            break
        pages += 1
        assert len(body["results"]) <= 2
        for row in body["results"]:
            assert row["device_id"] == device_id
            assert base64.b64decode(row["payload"]) == payloads[row["seq"]]
            assert row["payload_bytes"] == len(payloads[row["seq"]])
            seen.append(row["seq"])
        assert body["next_after_id"] == body["results"][-1]["id"]
        after = body["next_after_id"]
    assert (seen, pages) == ([1, 2, 3, 4, 5], 3)

    everyone = cloud_sync.api.get("/v1/results", params={"limit": 10_000}).json()["results"]
    assert {device_id, other_id} <= {r["device_id"] for r in everyone}


@pytest.mark.parametrize("last, seqs", [(2, [4, 5]), (0, []), (5, [1, 2, 3, 4, 5]), (50, [1, 2, 3, 4, 5])])
def test_the_cursor_starts_a_page_at_the_newest_last_results(
    cloud_sync: RunningCloudSync, last: int, seqs: list[int]
) -> None:
    device_id, token = cloud_sync.new_device("cursor")
    cloud_sync.upload(token, [batch(0, 5)])
    _other_id, other_token = cloud_sync.new_device("cursor")
    cloud_sync.upload(other_token, [batch(0, 3)])  # newer rows of another device do not count

    cursor = cloud_sync.api.get("/v1/results/cursor", params={"device_id": device_id, "last": last})
    assert cursor.status_code == 200
    after = cursor.json()["after_id"]
    page = cloud_sync.api.get("/v1/results", params={"device_id": device_id, "after_id": after}).json()
    assert [r["seq"] for r in page["results"]] == seqs


BAD_QUERIES = [
    ("/v1/results", {"limit": 0}, "query.limit"),
    ("/v1/results", {"limit": 10_001}, "query.limit"),
    ("/v1/results", {"limit": "many"}, "query.limit"),
    ("/v1/results", {"after_id": -1}, "query.after_id"),
    ("/v1/results", {"after_id": 2**63}, "query.after_id"),  # once a 500: SQLite's OverflowError
    ("/v1/results", {"settle_ms": -1}, "query.settle_ms"),
    ("/v1/results", {"settle_ms": 60_001}, "query.settle_ms"),
    ("/v1/results", {"device_id": "d" * 129}, "query.device_id"),
    ("/v1/results/cursor", {"last": -1}, "query.last"),
    ("/v1/results/cursor", {"last": 10_001}, "query.last"),
    # Checked before the device is looked up: the parameter is named even for an unknown device.
    ("/v1/devices/nobody/quarantine", {"limit": 0}, "query.limit"),
    ("/v1/devices/nobody/quarantine", {"limit": 1001}, "query.limit"),
    ("/v1/devices/nobody/quarantine", {"limit": "many"}, "query.limit"),
    ("/v1/devices/nobody/quarantine", {"after_seq": -1}, "query.after_seq"),
    ("/v1/devices/nobody/quarantine", {"after_seq": 2**63}, "query.after_seq"),
    ("/v1/devices/nobody/quarantine", {"after_seq": "1.5"}, "query.after_seq"),
]


@pytest.mark.parametrize("path, params, named", BAD_QUERIES)
def test_a_bad_query_is_422_naming_the_parameter(
    cloud_sync: RunningCloudSync, path: str, params: dict[str, Any], named: str
) -> None:
    response = cloud_sync.api.get(path, params=params)
    assert response.status_code == 422, response.text
    assert named in detail_locations(response)


def test_quarantine_shows_what_the_cloud_refused_and_what_the_device_declared(cloud_sync: RunningCloudSync) -> None:
    device_id, token = cloud_sync.new_device("quarantine")
    records = [record(1), record(2, kind=99), record(3), record(5)]
    upload = batch(0, 5, records=records)
    upload.record_checksum = results_pb2.RECORD_CHECKSUM_CRC32
    for r in upload.records:
        r.checksum = record_checksum(r)
    upload.records[2].payload = b"altered on the way"  # seq 3, after its checksum was computed
    upload.rejected.add(seq=4, reason="checksum failed when read from the outbox")
    upload.rejected_total = 1
    before_ms = int(time.time() * 1000)
    assert list(cloud_sync.upload(token, [upload]).rejected_seqs) == [2, 3, 4]
    after_ms = int(time.time() * 1000)

    response = cloud_sync.api.get(f"/v1/devices/{device_id}/quarantine")
    assert response.status_code == 200, response.text
    body = response.json()
    entries = {e["seq"]: e for e in body["quarantine"]}
    assert list(entries) == [2, 3, 4] and body["next_after_seq"] == 4
    assert [entries[s]["source"] for s in (2, 3, 4)] == ["cloud", "cloud", "device"]
    assert "kind 99" in entries[2]["reason"]
    assert "checksum" in entries[3]["reason"] and "does not match" in entries[3]["reason"]
    assert entries[4]["reason"] == "on the device: checksum failed when read from the outbox"
    for seq, sent in ((2, upload.records[1]), (3, upload.records[2])):
        kept = base64.b64decode(entries[seq]["record"])
        assert kept == sent.SerializeToString()  # the record as it arrived, whole: it is under 64 KiB
        assert entries[seq]["record_bytes"] == entries[seq]["record_size"] == len(kept)
        assert entries[seq]["created_at_ms"] == sent.created_at_ms
    declared = entries[4]
    assert (declared["record"], declared["record_bytes"], declared["record_size"]) == (None, 0, 0)
    assert declared["created_at_ms"] is None
    for entry in entries.values():
        assert entry["device_id"] == device_id
        assert before_ms <= entry["received_at_ms"] <= after_ms
    # The ledger the device page shows counts exactly these.
    assert cloud_sync.device(device_id)["uplink"]["rejected"] == len(entries)


def test_quarantine_pages_by_seq(cloud_sync: RunningCloudSync) -> None:
    device_id, token = cloud_sync.new_device("quarantine")
    _other, other_token = cloud_sync.new_device("quarantine")
    cloud_sync.upload(token, [batch(0, 7, records=[record(s, kind=99 if s % 2 else 1) for s in range(1, 8)])])
    cloud_sync.upload(other_token, [batch(0, 2, records=[record(1, kind=99), record(2, kind=99)])])

    pages: list[list[int]] = []
    after = 0
    while True:
        response = cloud_sync.api.get(f"/v1/devices/{device_id}/quarantine", params={"after_seq": after, "limit": 2})
        assert response.status_code == 200, response.text
        body = response.json()
        if not body["quarantine"]:
            assert body["next_after_seq"] == after
            break
        assert {e["device_id"] for e in body["quarantine"]} == {device_id}
        pages.append([e["seq"] for e in body["quarantine"]])
        after = body["next_after_seq"]
    assert pages == [[1, 3], [5, 7]]
    past = cloud_sync.api.get(f"/v1/devices/{device_id}/quarantine", params={"after_seq": 3})
    assert [e["seq"] for e in past.json()["quarantine"]] == [5, 7]


def test_a_device_with_nothing_quarantined_has_an_empty_list_not_a_404(cloud_sync: RunningCloudSync) -> None:
    device_id, token = cloud_sync.new_device("quarantine")
    cloud_sync.upload(token, [batch(0, 3)])
    response = cloud_sync.api.get(f"/v1/devices/{device_id}/quarantine", params={"after_seq": 2})
    assert response.status_code == 200, response.text
    assert response.json() == {"quarantine": [], "next_after_seq": 2}


def test_a_revoked_device_still_shows_its_quarantine(cloud_sync: RunningCloudSync) -> None:
    device_id, token = cloud_sync.new_device("quarantine")
    cloud_sync.upload(token, [batch(0, 1, records=[record(1, kind=99)])])
    assert cloud_sync.api.post(f"/v1/devices/{device_id}/revoke").status_code == 200
    response = cloud_sync.api.get(f"/v1/devices/{device_id}/quarantine")
    assert response.status_code == 200, response.text
    assert [e["seq"] for e in response.json()["quarantine"]] == [1]


def test_openapi_lists_every_route(cloud_sync: RunningCloudSync, tmp_path: Path) -> None:
    # The routes the app defines, read from an app built in this process over a store of its own.
    db = open_database(f"sqlite:///{tmp_path / 'api.db'}")
    try:
        app = create_app(ApiContext(DeviceRegistry(db), ResultStore(db), "t", CollectorRegistry()))
        defined = {
            (method, route.path)
            for route in app.routes
            if isinstance(route, Route) and not route.path.startswith(("/openapi", "/docs", "/redoc"))
            for method in (route.methods or set()) - {"HEAD"}
        }
    finally:
        db.close()

    schema = httpx.get(cloud_sync.http_url + "/openapi.json", trust_env=False).json()
    listed = {(method.upper(), path) for path, ops in schema["paths"].items() for method in ops}
    assert defined <= listed
    assert {*ADMIN_ROUTES, ("GET", "/healthz"), ("GET", "/metrics")} <= listed
    for method, path in ADMIN_ROUTES:
        assert schema["paths"][path][method.lower()].get("summary"), (method, path)


def test_an_unexpected_error_is_500_with_a_generic_message_and_no_secret_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # No request makes the real process fail on cue, so the app runs in-process with a route (through the
    # extra_routes extension point) that fails as a bug would.
    def add_failing_route(app: FastAPI) -> None:
        @app.get("/v1/fails")
        def fails() -> None:
            raise RuntimeError("a bug")

    db = open_database(f"sqlite:///{tmp_path / 'api.db'}")
    secret = "efa_the-admin-token"
    ctx = ApiContext(DeviceRegistry(db), ResultStore(db), secret, CollectorRegistry(), [add_failing_route])
    transport = httpx.ASGITransport(app=create_app(ctx), raise_app_exceptions=False)

    async def call() -> httpx.Response:
        async with httpx.AsyncClient(transport=transport, base_url="http://cloud-sync") as client:
            response = await client.get("/v1/fails", headers={"Authorization": f"Bearer {secret}"})
            assert (await client.get("/healthz")).status_code == 200  # and it goes on serving
            return response

    try:
        with capture_logs() as logs:
            response = asyncio.run(call())
    finally:
        db.close()
    assert response.status_code == 500
    assert response.json() == {"detail": "internal error in cloud-sync; its log has the details", "errors": []}
    [logged] = [e for e in logs if e["event"] == "api.internal_error"]
    assert (logged["error"], logged["detail"], logged["path"]) == ("RuntimeError", "a bug", "/v1/fails")
    assert "test_api.py" in logged["where"]
    assert secret not in repr(logs) + caplog.text


def test_an_empty_bearer_token_is_refused_even_against_an_empty_admin_token(tmp_path: Path) -> None:
    db = open_database(f"sqlite:///{tmp_path / 'api.db'}")
    app = create_app(ApiContext(DeviceRegistry(db), ResultStore(db), "", CollectorRegistry()))

    async def call() -> list[int]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://cloud-sync") as client:
            return [
                (await client.get("/v1/devices", headers=headers)).status_code
                for headers in ({"Authorization": "Bearer "}, {"Authorization": "Bearer"}, {})
            ]

    try:
        assert asyncio.run(call()) == [401, 401, 401]
    finally:
        db.close()


def _read_response(conn: socket.socket) -> bytes:
    """A whole HTTP/1.1 response with a Content-Length (what uvicorn sends for a JSON answer)."""
    answer = b""
    while True:
        head, sep, body = answer.partition(b"\r\n\r\n")
        if sep:
            length = next(
                int(line.split(b":")[1]) for line in head.lower().split(b"\r\n") if line.startswith(b"content-length")
            )
            if len(body) >= length:
                return answer
        try:
            chunk = conn.recv(65536)
        except ConnectionResetError:  # the server closed on the body it would not read; its answer came first
            return answer
        if not chunk:
            return answer
        answer += chunk


def _raw_post(cloud_sync: RunningCloudSync, headers: str) -> tuple[socket.socket, bytes]:
    url = httpx.URL(cloud_sync.http_url)
    conn = socket.create_connection((url.host, url.port), timeout=10)
    head = (
        f"POST /v1/devices HTTP/1.1\r\nHost: {url.host}\r\nAuthorization: Bearer {cloud_sync.admin_token}\r\n"
        f"Content-Type: application/json\r\n{headers}\r\n\r\n"
    )
    return conn, head.encode()


def test_a_body_past_the_limit_is_refused_with_413_before_it_is_read(cloud_sync: RunningCloudSync) -> None:
    """Declared 30 MB, and only the first bytes sent: the answer comes at once, so the rest was never awaited."""
    conn, head = _raw_post(cloud_sync, "Content-Length: 30000000")
    with conn:
        conn.sendall(head + b'{"device_id": "big-1", "labels": {"x": "')
        answer = _read_response(conn)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"larger than 1048576 bytes" in answer and b"http.max_body_bytes" in answer
    assert "big-1" not in [d["device_id"] for d in cloud_sync.api.get("/v1/devices").json()["devices"]]


def test_a_chunked_body_is_cut_off_once_it_passes_the_limit(cloud_sync: RunningCloudSync) -> None:
    """No Content-Length: the server counts as it reads and answers 413 while the client is still sending."""
    conn, head = _raw_post(cloud_sync, "Transfer-Encoding: chunked")
    start = b'{"device_id": "big-2", "labels": {"x": "'
    chunk = b"a" * 65536
    sent = 0
    with conn:
        conn.sendall(head + b"%x\r\n%s\r\n" % (len(start), start))
        # Up to 64 MiB against a 1 MiB limit, until the server answers (and stops reading).
        while sent < 64 * 1024 * 1024 and not select.select([conn], [], [], 0)[0]:
            try:
                conn.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            except (BrokenPipeError, ConnectionResetError):
                break  # it answered and closed already
            sent += len(chunk)
        answer = _read_response(conn)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"http.max_body_bytes" in answer
    assert sent < 8 * 1024 * 1024, f"{sent} bytes went in before the refusal"
    assert cloud_sync.api.get("/healthz").status_code == 200
    assert "big-2" not in [d["device_id"] for d in cloud_sync.api.get("/v1/devices").json()["devices"]]


def test_a_token_below_the_route_s_role_gets_403_naming_the_role(tmp_path: Path) -> None:
    # Today cloud-sync has the one admin token; the auth dependency already answers per role (issue 14's
    # tokens plug in here). In-process: no cloud-sync config makes a viewer token yet.
    viewer, operator, admin = "v" * 40, "o" * 40, "a" * 40
    auth = BearerAuth({viewer: "viewer", operator: "operator", admin: "admin"})
    db = open_database(f"sqlite:///{tmp_path / 'api.db'}")
    app = create_app(ApiContext(DeviceRegistry(db), ResultStore(db), auth, CollectorRegistry()))

    async def call(token: str, method: str, path: str, **kwargs: Any) -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://cloud-sync") as client:
            return await client.request(method, path, headers={"Authorization": f"Bearer {token}"}, **kwargs)

    try:
        assert asyncio.run(call(viewer, "GET", "/v1/devices")).status_code == 200
        refused = asyncio.run(call(viewer, "POST", "/v1/devices", json={"device_id": "role-1"}))
        assert refused.status_code == 403
        assert refused.json() == {"detail": "this call needs the admin role; the token is viewer", "errors": []}
        assert asyncio.run(call(operator, "POST", "/v1/devices", json={"device_id": "role-1"})).status_code == 403
        assert asyncio.run(call(admin, "POST", "/v1/devices", json={"device_id": "role-1"})).status_code == 201
        unknown = asyncio.run(call("x" * 40, "GET", "/v1/devices"))
        assert unknown.status_code == 401 and unknown.headers["WWW-Authenticate"] == "Bearer"
        assert DeviceRegistry(db).get_device("role-1").device_id == "role-1"  # the refused calls changed nothing
        assert [d.device_id for d in DeviceRegistry(db).list_devices()] == ["role-1"]
    finally:
        db.close()


def test_the_schema_has_the_bearer_scheme_and_one_error_body(cloud_sync: RunningCloudSync) -> None:
    schema = cloud_sync.api.get("/openapi.json").json()
    assert schema["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    error = schema["components"]["schemas"]["ErrorBody"]
    assert error["required"] == ["detail"] and set(error["properties"]) == {"detail", "errors"}
    assert "HTTPValidationError" not in schema["components"]["schemas"]  # FastAPI's own 422 shape is not sent
    add = schema["paths"]["/v1/devices"]["post"]
    assert {"201", "400", "401", "403", "409", "413", "422", "503"} <= set(add["responses"])
    assert add["responses"]["201"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/CreatedDevice"
    }
    new_device = schema["components"]["schemas"]["NewDevice"]["properties"]
    assert new_device["device_id"]["maxLength"] == 128 and new_device["device_id"]["pattern"].startswith("^")
    assert new_device["labels"]["maxProperties"] == 64
