"""Admin API routes of the model registry: upload blobs, register, list, sign again, delete; the fleet key.

`PUT /v1/blobs/{sha256}` streams the body to the blob store (never held in memory) under its own limit,
`registry.max_blob_bytes`; the API's 1 MiB body limit does not apply to that path (api.py exempts it). Routes
are added to the app through ApiContext.extra_routes. Not for assigning models to devices (api_state.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Annotated, Any

import structlog
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import ClientDisconnect

from cloud_sync.errors import TooLarge
from cloud_sync.registry.blobs import check_sha256
from cloud_sync.registry.store import ModelRegistry, ModelVersion, check_model_ref
from cloud_sync.store.database import now_ms

__all__ = ["DEFAULT_EXPIRES_S", "MAX_EXPIRES_S", "MIN_EXPIRES_S", "model_json", "model_routes"]

log = structlog.get_logger(__name__)

# How long a signed manifest is valid by default; `fleetctl models sign` renews it.
DEFAULT_EXPIRES_S = 30 * 86400
MIN_EXPIRES_S = 60
MAX_EXPIRES_S = 5 * 365 * 86400

Expiry = Annotated[int, Field(ge=MIN_EXPIRES_S, le=MAX_EXPIRES_S, description="seconds the signature is valid")]


class NewModel(BaseModel):
    model_config = ConfigDict(extra="forbid")
    manifest: dict[str, Any] = Field(description="The package's manifest.json as an object; its blobs uploaded first.")
    expires_in_s: Expiry = DEFAULT_EXPIRES_S


class SignAgain(BaseModel):
    model_config = ConfigDict(extra="forbid")
    expires_in_s: Expiry = DEFAULT_EXPIRES_S


def model_json(found: ModelVersion) -> dict[str, Any]:
    return {
        "name": found.name,
        "version": found.version,
        "sha256": found.sha256,
        "size": found.size,
        "files": {file: {"sha256": sha, "size": size} for file, (sha, size) in found.files().items()},
        "manifest": found.manifest,
        "serial": found.serial,
        "key_id": found.key_id,
        "signed_at_ms": found.signed_at_ms,
        "expires_at_ms": found.expires_at_ms,
        "created_at_ms": found.created_at_ms,
    }


def _too_large(limit: int) -> HTTPException:
    detail = f"the blob is larger than {limit} bytes (cloud-sync's registry.max_blob_bytes)"
    return HTTPException(status_code=413, detail=detail, headers={"Connection": "close"})


def _chunks(stream: AsyncIterator[bytes], loop: asyncio.AbstractEventLoop) -> Iterator[bytes]:
    """The request body's chunks, pulled from the loop by the thread that writes them."""

    async def following() -> bytes | None:
        try:
            return await stream.__anext__()
        except StopAsyncIteration:
            return None

    while (chunk := asyncio.run_coroutine_threadsafe(following(), loop).result()) is not None:
        if chunk:
            yield chunk


def model_routes(
    registry: ModelRegistry,
    admin_token: str,
    in_use: Callable[[str, int], list[str]],
    max_blob_bytes: int,
) -> Callable[[FastAPI], None]:
    from cloud_sync.api import admin_auth  # api.py imports nothing of this module; this keeps it that way

    auth = admin_auth(admin_token)

    def add(app: FastAPI) -> None:
        @app.put("/v1/blobs/{sha256}", tags=["models"], dependencies=auth)
        async def put_blob(sha256: str, request: Request) -> dict[str, Any]:
            """Upload a model file under its sha256 (streamed; checked against the digest before it is kept)."""
            check_sha256(sha256)
            declared = request.headers.get("content-length")
            if declared is not None and (not declared.isdigit() or int(declared) > max_blob_bytes):
                raise _too_large(max_blob_bytes)
            loop = asyncio.get_running_loop()
            body = _chunks(request.stream().__aiter__(), loop)
            try:
                info = await asyncio.to_thread(
                    registry.blobs.put, body, expected_sha256=sha256, max_bytes=max_blob_bytes
                )
            except TooLarge:
                raise _too_large(max_blob_bytes) from None
            except ClientDisconnect:
                raise HTTPException(status_code=400, detail="the upload was cut off; nothing was stored") from None
            return {"sha256": info.sha256, "size": info.size}

        @app.head("/v1/blobs/{sha256}", tags=["models"], dependencies=auth)
        def has_blob(sha256: str) -> Response:
            """200 with Content-Length when the blob is stored, 404 when not: an upload can be skipped."""
            check_sha256(sha256)
            size = registry.blobs.size(sha256)
            if size is None:
                return Response(status_code=404)
            return Response(status_code=200, headers={"Content-Length": str(size)})

        @app.post("/v1/models", tags=["models"], dependencies=auth, status_code=201)
        def register_model(body: NewModel) -> JSONResponse:
            """Register and sign a version (201); the same manifest again: 200 with the version as it is."""
            found, created = registry.register_new(body.manifest, now_ms() + body.expires_in_s * 1000)
            return JSONResponse(model_json(found), status_code=201 if created else 200)

        @app.get("/v1/models", tags=["models"], dependencies=auth)
        def list_models(name: Annotated[str | None, Query(max_length=63)] = None) -> dict[str, Any]:
            return {"models": [model_json(v) for v in registry.list(name)]}

        @app.get("/v1/models/{name}/{version}", tags=["models"], dependencies=auth)
        def show_model(name: str, version: int) -> dict[str, Any]:
            return model_json(registry.get(*check_model_ref(name, version)))

        @app.delete("/v1/models/{name}/{version}", tags=["models"], dependencies=auth)
        def delete_model(name: str, version: int) -> dict[str, Any]:
            """Delete a version no device is assigned or runs (409 naming them otherwise), and its unshared blobs."""
            return model_json(registry.delete(*check_model_ref(name, version), in_use))

        @app.post("/v1/models/{name}/{version}/sign", tags=["models"], dependencies=auth)
        def sign_model(name: str, version: int, body: SignAgain) -> dict[str, Any]:
            """Sign the version again with a new expiry under a new serial."""
            name, version = check_model_ref(name, version)
            return model_json(registry.sign_again(name, version, now_ms() + body.expires_in_s * 1000))

        @app.get("/v1/fleet/signing-key", tags=["models"], dependencies=auth)
        def signing_key() -> dict[str, str]:
            """The fleet's ed25519 public key (hex of the raw 32 bytes) that devices pin at enrollment."""
            return {"public_key": registry.signer.public_key.hex(), "key_id": registry.signer.key_id}

    return add
