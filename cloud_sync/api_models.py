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
from fastapi import FastAPI, HTTPException, Path, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import ClientDisconnect

from cloud_sync.api_audit import recorder
from cloud_sync.api_auth import ERROR_MEANINGS, BearerAuth, actor_of, as_auth, errors
from cloud_sync.api_schemas import MODEL_NAME_PATTERN, SHA256_PATTERN, Blob, ModelList, ModelVersion, SigningKey
from cloud_sync.errors import InvalidArgument, TooLarge
from cloud_sync.registry.blobs import check_sha256
from cloud_sync.registry.store import ModelRegistry, check_model_ref
from cloud_sync.registry.store import ModelVersion as StoredVersion
from cloud_sync.store.audit import AuditDraft, AuditLog
from cloud_sync.store.database import now_ms

__all__ = ["DEFAULT_EXPIRES_S", "MAX_EXPIRES_S", "MIN_EXPIRES_S", "model_json", "model_routes"]

log = structlog.get_logger(__name__)

# How long a signed manifest is valid by default; `fleetctl models sign` renews it.
DEFAULT_EXPIRES_S = 30 * 86400
MIN_EXPIRES_S = 60
MAX_EXPIRES_S = 5 * 365 * 86400

Expiry = Annotated[int, Field(ge=MIN_EXPIRES_S, le=MAX_EXPIRES_S, description="seconds the signature is valid")]


# Patterns in the schema only: check_sha256's and check_model_ref's messages say what is allowed.
ShaPath = Annotated[
    str, Path(max_length=64, json_schema_extra={"pattern": SHA256_PATTERN}, description="the file's sha256")
]
NamePath = Annotated[
    str, Path(max_length=63, json_schema_extra={"pattern": MODEL_NAME_PATTERN}, description="model name, e.g. digits")
]
VersionPath = Annotated[int, Path(ge=1, le=2**31 - 1, description="model version")]


HEAD_ERRORS = (401, 403, 422, 503)
# The largest file size a manifest may give: JSON's exact integers (2**53 - 1; I-JSON, RFC 7493), past which
# clients and schema tools round. The registry itself takes up to 2**63 - 1.
MAX_FILE_BYTES = 2**53 - 1
# What the registry checks of a manifest (registry/store.py check_manifest); the device checks the rest.
MANIFEST_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["name", "version", "sha256", "size", "inputs", "outputs"],
    "properties": {
        "name": {"type": "string", "pattern": MODEL_NAME_PATTERN},
        "version": {"type": "integer", "minimum": 1, "maximum": 2**31 - 1},
        "platform": {"const": "onnx"},
        "sha256": {"type": "string", "pattern": SHA256_PATTERN},
        "size": {"type": "integer", "minimum": 1, "maximum": MAX_FILE_BYTES},
        "inputs": {"type": "array", "minItems": 1},
        "outputs": {"type": "array", "minItems": 1},
        "warmup": {
            "type": "object",
            "properties": {
                "file": {"const": "warmup.npz"},
                "sha256": {"type": "string", "pattern": SHA256_PATTERN},
                "size": {"type": "integer", "minimum": 1, "maximum": MAX_FILE_BYTES},
            },
            "dependentRequired": {"file": ["sha256", "size"]},
        },
    },
}


class NewModel(BaseModel):
    model_config = ConfigDict(extra="forbid")
    manifest: dict[str, Any] = Field(
        description="The package's manifest.json as an object; its blobs uploaded first.",
        json_schema_extra=MANIFEST_SCHEMA,
    )
    expires_in_s: Expiry = DEFAULT_EXPIRES_S


class SignAgain(BaseModel):
    model_config = ConfigDict(extra="forbid")
    expires_in_s: Expiry = DEFAULT_EXPIRES_S


def _integers(manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest with its integral numbers written as integers (JSON, and its schema, read 3.0 as the
    integer 3; the registry's checks and the device's take ints only), its sizes within MAX_FILE_BYTES."""
    shown = dict(manifest)
    for key in ("version", "size"):
        if isinstance(shown.get(key), float) and shown[key].is_integer():
            shown[key] = int(shown[key])
    warmup = shown.get("warmup")
    if isinstance(warmup, dict) and isinstance(warmup.get("size"), float) and warmup["size"].is_integer():
        shown["warmup"] = warmup = {**warmup, "size": int(warmup["size"])}
    sizes = [("manifest.size", shown.get("size"))]
    if isinstance(warmup, dict):
        sizes.append(("manifest.warmup.size", warmup.get("size")))
    for what, size in sizes:
        if isinstance(size, int) and size > MAX_FILE_BYTES:
            raise InvalidArgument(f"{what} {size} is past {MAX_FILE_BYTES} bytes")
    return shown


def model_json(found: StoredVersion) -> dict[str, Any]:
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


def _target(shown: dict[str, Any]) -> str:
    return f"model/{shown['name']}:{shown['version']}"


def _summary(shown: dict[str, Any]) -> dict[str, Any]:
    """What an audit record keeps of a version: its identity and signature, not its whole manifest."""
    keep = ("name", "version", "sha256", "size", "serial", "key_id", "signed_at_ms", "expires_at_ms")
    return {key: shown[key] for key in keep if key in shown}


def model_routes(
    registry: ModelRegistry,
    admin_token: str | BearerAuth,
    in_use: Callable[[str, int], list[str]],
    max_blob_bytes: int,
    audit: AuditLog | None = None,
) -> Callable[[FastAPI], None]:
    auth = as_auth(admin_token)
    viewer, operator, admin = auth.require("viewer"), auth.require("operator"), auth.require("admin")
    # Registering, signing and deleting a version are recorded; a blob alone changes nothing devices see.
    record = recorder(audit)

    def add(app: FastAPI) -> None:
        @app.put(
            "/v1/blobs/{sha256}",
            tags=["models"],
            dependencies=operator,
            responses=errors(400, 401, 403, 413, 422, 503),
            openapi_extra={
                "requestBody": {
                    "required": True,
                    "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
                }
            },
        )
        async def put_blob(sha256: ShaPath, request: Request) -> Blob:
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
            return Blob(sha256=info.sha256, size=info.size)

        @app.head(
            "/v1/blobs/{sha256}",
            tags=["models"],
            dependencies=viewer,
            responses={
                200: {"description": "Stored; Content-Length is its size."},
                404: {"description": "Not stored."},
                # A HEAD answer has no body: these are the statuses alone.
                **{code: {"description": meaning} for code, meaning in ERROR_MEANINGS.items() if code in HEAD_ERRORS},
            },
        )
        def has_blob(sha256: ShaPath) -> Response:
            """200 with Content-Length when the blob is stored, 404 when not: an upload can be skipped."""
            check_sha256(sha256)
            size = registry.blobs.size(sha256)
            if size is None:
                return Response(status_code=404)
            return Response(status_code=200, headers={"Content-Length": str(size)})

        @app.post(
            "/v1/models",
            tags=["models"],
            dependencies=operator,
            status_code=201,
            response_model=ModelVersion,
            responses={
                200: {"model": ModelVersion, "description": "Registered already with this manifest."},
                **errors(401, 403, 409, 413, 422, 503),
            },
        )
        def register_model(body: NewModel, response: Response, request: Request) -> dict[str, Any]:
            """Register and sign a version (201); the same manifest again: 200 with the version as it is."""
            found, created = registry.register_new(_integers(body.manifest), now_ms() + body.expires_in_s * 1000)
            response.status_code = 201 if created else 200
            shown = model_json(found)
            if created:
                record(AuditDraft(actor_of(request), "model.register", _target(shown), None, _summary(shown)))
            return shown

        @app.get("/v1/models", tags=["models"], dependencies=viewer, responses=errors(401, 403, 422, 503))
        def list_models(
            name: Annotated[str | None, Query(max_length=63, pattern=MODEL_NAME_PATTERN)] = None,
        ) -> ModelList:
            """Registered versions (of one model with `name`), by name then version."""
            return ModelList.model_validate({"models": [model_json(v) for v in registry.list(name)]})

        @app.get(
            "/v1/models/{name}/{version}",
            tags=["models"],
            dependencies=viewer,
            responses=errors(401, 403, 404, 422, 503),
        )
        def show_model(name: NamePath, version: VersionPath) -> ModelVersion:
            """A version: its files, manifest and signature."""
            return ModelVersion.model_validate(model_json(registry.get(*check_model_ref(name, version))))

        @app.delete(
            "/v1/models/{name}/{version}",
            tags=["models"],
            dependencies=admin,
            responses=errors(401, 403, 404, 409, 422, 503),
        )
        def delete_model(name: NamePath, version: VersionPath, request: Request) -> ModelVersion:
            """Delete a version no device is assigned or runs (409 naming them otherwise), and its unshared blobs."""
            shown = model_json(registry.delete(*check_model_ref(name, version), in_use))
            record(AuditDraft(actor_of(request), "model.delete", _target(shown), _summary(shown), None))
            return ModelVersion.model_validate(shown)

        @app.post(
            "/v1/models/{name}/{version}/sign",
            tags=["models"],
            dependencies=operator,
            responses=errors(401, 403, 404, 413, 422, 503),
        )
        def sign_model(name: NamePath, version: VersionPath, body: SignAgain, request: Request) -> ModelVersion:
            """Sign the version again with a new expiry under a new serial."""
            name, version = check_model_ref(name, version)
            before = _summary(model_json(registry.get(name, version)))
            shown = model_json(registry.sign_again(name, version, now_ms() + body.expires_in_s * 1000))
            record(AuditDraft(actor_of(request), "model.sign", _target(shown), before, _summary(shown)))
            return ModelVersion.model_validate(shown)

        @app.get("/v1/fleet/signing-key", tags=["models"], dependencies=viewer, responses=errors(401, 403, 503))
        def signing_key() -> SigningKey:
            """The fleet's ed25519 public key (hex of the raw 32 bytes) that devices pin at enrollment."""
            return SigningKey(public_key=registry.signer.public_key.hex(), key_id=registry.signer.key_id)

    return add
