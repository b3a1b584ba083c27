"""The registry's admin API on a real cloud-sync: streamed blob upload, register, list, sign again, delete."""

from __future__ import annotations

import hashlib
import os
import socket
from collections.abc import Iterator

import httpx

from cloud_sync.registry import ModelRegistry
from edgefleet.signing import key_id
from tests.cloud_inprocess import InProcessCloud

from .conftest import MAX_BLOB_BYTES, assign
from .helpers import manifest_for


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _put(api: httpx.Client, data: bytes, sha: str | None = None) -> httpx.Response:
    return api.put(f"/v1/blobs/{sha or _sha(data)}", content=data)


def _raw_head(api: httpx.Client, request_line: str, headers: dict[str, str]) -> bytes:
    """What the server answers to a request sent without its body (read until it closes the connection)."""
    url = httpx.URL(str(api.base_url))
    lines = [f"{request_line} HTTP/1.1", f"Host: {url.host}", f"Authorization: {api.headers['authorization']}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    with socket.create_connection((url.host, url.port or 80), timeout=10) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def test_a_blob_past_the_api_body_limit_streams_in_and_head_finds_it(
    api: httpx.Client, registry: ModelRegistry
) -> None:
    data = os.urandom(2 * 1024 * 1024 + 17)  # past http.max_body_bytes (1 MiB): this path has its own limit
    assert api.head(f"/v1/blobs/{_sha(data)}").status_code == 404

    def chunked() -> Iterator[bytes]:
        for start in range(0, len(data), 100_000):
            yield data[start : start + 100_000]

    response = api.put(f"/v1/blobs/{_sha(data)}", content=chunked())  # no Content-Length: counted as it comes
    assert response.status_code == 200, response.text
    assert response.json() == {"sha256": _sha(data), "size": len(data)}
    head = api.head(f"/v1/blobs/{_sha(data)}")
    assert head.status_code == 200 and int(head.headers["content-length"]) == len(data)
    with registry.blobs.open(_sha(data)) as f:
        assert f.read() == data


def test_blob_uploads_that_are_damaged_too_large_or_misnamed_are_refused_and_keep_nothing(
    api: httpx.Client, registry: ModelRegistry
) -> None:
    wrong = _put(api, b"these bytes", _sha(b"other bytes"))
    assert wrong.status_code == 422 and "sha256" in wrong.json()["detail"]
    assert registry.blobs.size(_sha(b"other bytes")) is None
    big = os.urandom(MAX_BLOB_BYTES + 1)
    # A declared length past the limit is refused before a byte is read (raw HTTP: a client still sending the
    # body would see the connection reset instead of the answer).
    head = _raw_head(api, f"PUT /v1/blobs/{_sha(big)}", {"Content-Length": str(MAX_BLOB_BYTES + 1)})
    assert head.startswith(b"HTTP/1.1 413") and b"registry.max_blob_bytes" in head
    streamed = api.put(f"/v1/blobs/{_sha(big)}", content=iter([big[:MAX_BLOB_BYTES], big[MAX_BLOB_BYTES:]]))
    assert streamed.status_code == 413
    assert registry.blobs.size(_sha(big)) is None
    assert _put(api, b"abc", "not-a-digest").status_code == 422
    assert api.head("/v1/blobs/not-a-digest").status_code == 422
    assert httpx.put(f"{api.base_url}/v1/blobs/{_sha(b'abc')}", content=b"abc").status_code == 401


def test_other_routes_keep_the_api_body_limit(api: httpx.Client) -> None:
    response = api.post("/v1/models", json={"manifest": {"description": "x" * (2 * 1024 * 1024)}})
    assert response.status_code == 413


def test_register_list_show_sign_again(api: httpx.Client, registry: ModelRegistry) -> None:
    model, warmup = os.urandom(5000), os.urandom(300)
    manifest = manifest_for("digits", 1, model, warmup)
    missing = api.post("/v1/models", json={"manifest": manifest})
    assert missing.status_code == 409 and "not uploaded" in missing.json()["detail"]
    assert _put(api, model).status_code == 200 and _put(api, warmup).status_code == 200
    created = api.post("/v1/models", json={"manifest": manifest, "expires_in_s": 3600})
    assert created.status_code == 201, created.text
    body = created.json()
    assert body["files"] == {
        "model.onnx": {"sha256": _sha(model), "size": 5000},
        "warmup.npz": {"sha256": _sha(warmup), "size": 300},
    }
    assert body["key_id"] == key_id(registry.signer.public_key) and body["manifest"] == manifest
    assert 3_590_000 < body["expires_at_ms"] - body["signed_at_ms"] <= 3_600_000
    again = api.post("/v1/models", json={"manifest": manifest})
    assert again.status_code == 200 and again.json()["serial"] == body["serial"]
    changed = api.post("/v1/models", json={"manifest": {**manifest, "description": "other"}})
    assert changed.status_code == 409 and "never change" in changed.json()["detail"]
    assert [m["version"] for m in api.get("/v1/models", params={"name": "digits"}).json()["models"]] == [1]
    assert api.get("/v1/models", params={"name": "other"}).json()["models"] == []
    assert api.get("/v1/models/digits/1").json() == body
    assert api.get("/v1/models/digits/2").status_code == 404
    assert api.get("/v1/models/Digits/1").status_code == 422
    signed = api.post("/v1/models/digits/1/sign", json={"expires_in_s": 7200})
    assert signed.status_code == 200 and signed.json()["serial"] > body["serial"]
    assert api.post("/v1/models/digits/1/sign", json={"expires_in_s": 1}).status_code == 422
    assert api.post("/v1/models/digits/9/sign", json={}).status_code == 404
    key = api.get("/v1/fleet/signing-key").json()
    assert key == {"public_key": registry.signer.public_key.hex(), "key_id": registry.signer.key_id}


def test_invalid_manifests_get_422_naming_the_field(api: httpx.Client) -> None:
    for manifest, named in [
        ({"name": "x"}, "model version"),
        (manifest_for("digits", 1, b"m", sha256="xyz"), "manifest.sha256"),
        ("not an object", "manifest"),
    ]:
        response = api.post("/v1/models", json={"manifest": manifest})
        assert response.status_code == 422, response.text
        assert named in response.text
    assert api.post("/v1/models", json={"manifest": {}, "surprise": 1}).status_code == 422
    assert api.post("/v1/models", json={"manifest": {}, "expires_in_s": 10**12}).status_code == 422


def test_delete_is_refused_while_a_device_is_assigned_the_version(api: httpx.Client, cloud: InProcessCloud) -> None:
    model = os.urandom(1000)
    _put(api, model)
    assert api.post("/v1/models", json={"manifest": manifest_for("digits", 1, model)}).status_code == 201
    cloud.add_device("cam-1")
    assign(cloud, "cam-1", ("digits", 1))
    refused = api.delete("/v1/models/digits/1")
    assert refused.status_code == 409 and "cam-1" in refused.json()["detail"]
    assign(cloud, "cam-1")
    assert api.delete("/v1/models/digits/1").status_code == 200
    assert api.head(f"/v1/blobs/{_sha(model)}").status_code == 404
    assert api.delete("/v1/models/digits/1").status_code == 404
