"""The admin API's model compression: POST /v1/models/{name}/{version}/compress registers a variant version.

The parent's blobs are read from the registry, the calibration data gathered (samples the devices kept, an
uploaded .npz blob, or the parent's warmup inputs), the variant made by cloud_sync/compress.py and registered
through the registry's normal path (blob put, register: a signed manifest under the next serial). Added to the
app through ApiContext.extra_routes. Not for rolling the variant out (api_rollouts.py does, as for any version).
"""

from __future__ import annotations

import io
import json
import threading
import zipfile
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any, Literal

import structlog
from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field

from cloud_sync.api_audit import recorder
from cloud_sync.api_auth import BearerAuth, actor_of, as_auth, errors
from cloud_sync.api_models import DEFAULT_EXPIRES_S, NamePath, VersionPath, model_json
from cloud_sync.api_schemas import SHA256_PATTERN, ModelVersion
from cloud_sync.compress import (
    MAX_CALIBRATION_BYTES,
    Calibration,
    calibration_digest,
    compress,
    method_of,
    require_tooling,
)
from cloud_sync.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, TooLarge
from cloud_sync.registry.blobs import check_sha256
from cloud_sync.registry.store import ModelRegistry, check_model_ref
from cloud_sync.store.audit import AuditDraft, AuditLog
from cloud_sync.store.database import Database, now_ms
from cloud_sync.store.samples import SampleStore

if TYPE_CHECKING:
    import numpy as np

    from edge_runtime.models.package import ModelManifest

__all__ = ["DEFAULT_CALIBRATION_LIMIT", "MAX_CALIBRATION_LIMIT", "MAX_PARENT_BYTES", "compress_routes"]

log = structlog.get_logger(__name__)

DEFAULT_CALIBRATION_LIMIT, MAX_CALIBRATION_LIMIT = 512, 10_000
MAX_SINCE_S = 365 * 86400
# ONNX Runtime's quantizer holds the model several times over (parent, prepared, augmented for calibration,
# result): past this a compression would hold gigabytes in the cloud-sync process. Protobuf caps a model at 2 GiB.
MAX_PARENT_BYTES = 512 * 1024 * 1024


class FleetSamples(BaseModel):
    model_config = ConfigDict(extra="forbid")
    source: Literal["fleet-samples"]
    limit: int = Field(DEFAULT_CALIBRATION_LIMIT, ge=1, le=MAX_CALIBRATION_LIMIT, description="newest samples used")
    since_s: int | None = Field(None, ge=1, le=MAX_SINCE_S, description="only samples kept in the last since_s")


class Upload(BaseModel):
    model_config = ConfigDict(extra="forbid")
    source: Literal["upload"]
    sha256: str = Field(
        max_length=64,
        json_schema_extra={"pattern": SHA256_PATTERN},
        description="an .npz uploaded with PUT /v1/blobs/{sha256}: an array per input, rows along axis 0",
    )


class Warmup(BaseModel):
    model_config = ConfigDict(extra="forbid")
    source: Literal["warmup"]


class CompressBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    to: Literal["fp16", "int8", "int8-dynamic"] = Field(
        description="fp16: FP16 weights; int8: static INT8 with QDQ nodes (TensorRT-ready, needs calibration); "
        "int8-dynamic: INT8 weights for ONNX Runtime on the CPU"
    )
    version: int | None = Field(None, ge=1, le=2**31 - 1, description="the variant's version; default: the next free")
    calibration: Annotated[FleetSamples | Upload | Warmup, Field(discriminator="source")] | None = Field(
        None,
        description="int8's calibration rows, and the rows agreement is measured on; default: the samples the "
        "devices kept when there are any, else the parent's warmup inputs",
    )
    description: str = Field("", max_length=500)


class CompressionReportBody(BaseModel):
    method: str
    precision: str
    parent_bytes: int
    variant_bytes: int
    size_ratio: float
    evaluated_on: str = Field(description="calibration, warmup, or random (seeded inputs of the signature)")
    compared: int
    agreed: int
    agreement: float = Field(description="agreed / compared, judged as a shadow stage judges (top-1 or elementwise)")
    rule: str
    parent_latency_ms: float = Field(description="CPU, 1 intra-op thread, one row, median")
    variant_latency_ms: float
    latency_ratio: float
    seconds: float
    tool: str


class CompressedVersion(ModelVersion):
    report: CompressionReportBody


def compress_routes(
    db: Database,
    registry: ModelRegistry,
    admin_token: str | BearerAuth,
    audit: AuditLog | None = None,
    max_parent_bytes: int = MAX_PARENT_BYTES,
) -> Callable[[FastAPI], None]:
    """The route, for ApiContext.extra_routes. Plain def: FastAPI runs it in its threadpool, one at a time."""
    operator = as_auth(admin_token).require("operator")
    record = recorder(audit)
    # One compression at a time per process: each takes a core for up to tens of seconds (mobilenet static int8).
    busy = threading.Lock()

    def add(app: FastAPI) -> None:
        @app.post(
            "/v1/models/{name}/{version}/compress",
            tags=["models"],
            dependencies=operator,
            status_code=201,
            responses=errors(401, 403, 404, 409, 413, 422, 501, 503),
        )
        def compress_model(
            name: NamePath, version: VersionPath, body: CompressBody, request: Request
        ) -> CompressedVersion:
            """Make a compressed variant of a version and register it as a new, signed version (201)."""
            name, version = check_model_ref(name, version)
            require_tooling()
            if not busy.acquire(blocking=False):
                raise FailedPrecondition("another compression is running in this cloud-sync: try again after it")
            try:
                shown, report = _compress(db, registry, name, version, body, max_parent_bytes)
            finally:
                busy.release()
            after = {
                **{k: shown[k] for k in ("name", "version", "sha256", "size", "serial", "key_id")},
                "parent": f"{name}:{version}",
                "lineage": shown["manifest"]["lineage"],
                "agreement": report["agreement"],
            }
            record(AuditDraft(actor_of(request), "model.compress", f"model/{name}:{shown['version']}", None, after))
            return CompressedVersion.model_validate({**shown, "report": report})

    return add


def _compress(
    db: Database, registry: ModelRegistry, name: str, version: int, body: CompressBody, max_parent_bytes: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    from edge_runtime.models.package import parse_manifest

    method = method_of(body.to)
    parent = registry.get(name, version)
    if parent.manifest.get("lineage") is not None:
        lineage = parent.manifest["lineage"]
        raise FailedPrecondition(
            f"{parent.ref} is itself a {lineage.get('method')} variant of {name}:{lineage['parent']['version']}: "
            "compress that version (a variant of a variant compounds the error and hides the real parent)"
        )
    if parent.size > max_parent_bytes:
        raise TooLarge(f"{parent.ref} is {parent.size} bytes: compression takes models of at most {max_parent_bytes}")
    taken = {v.version for v in registry.list(name)}
    target = body.version if body.version is not None else max(taken) + 1
    if target in taken:
        raise AlreadyExists(f"{name}:{target} is registered already: give another version (or none: the next free)")
    manifest = parse_manifest(json.dumps(parent.manifest).encode())
    model = _blob(registry, parent.sha256, f"{parent.ref}'s model.onnx")
    warmup = _warmup(registry, manifest)
    calibration = _calibration(db, registry, manifest, body, warmup)
    if method == "int8-static" and calibration is None:
        raise InvalidArgument(
            f"calibration: {parent.ref} has no warmup inputs and the devices kept no samples of {name}: "
            'upload an .npz (PUT /v1/blobs/{sha256}) and give {"source": "upload", "sha256": ...}'
        )
    variant = compress(
        model,
        parent.manifest,
        method,
        version=target,
        calibration=calibration,
        warmup=warmup,
        description=body.description,
    )
    registry.blobs.put([variant.model], expected_sha256=variant.sha256, max_bytes=len(variant.model))
    found, _ = registry.register_new(variant.manifest, now_ms() + DEFAULT_EXPIRES_S * 1000)
    log.info(
        "model.compressed",
        parent=parent.ref,
        variant=found.ref,
        method=method,
        agreement=round(variant.report.agreement, 4),
        size_ratio=round(variant.report.size_ratio, 4),
    )
    return model_json(found), variant.report.to_dict()


def _blob(registry: ModelRegistry, sha256: str, what: str) -> bytes:
    try:
        with registry.blobs.open(sha256) as f:
            return f.read()
    except NotFound:
        raise FailedPrecondition(f"{what} (blob {sha256}) is missing from the blob store") from None


def _warmup(registry: ModelRegistry, manifest: ModelManifest) -> dict[str, np.ndarray] | None:
    """The parent's warmup inputs (one request), or None when it has none."""
    if manifest.warmup is None or not manifest.warmup.file:
        return None
    raw = _blob(registry, manifest.warmup.sha256, f"{manifest.ref}'s warmup.npz")
    return _npz(raw, f"{manifest.ref}'s warmup.npz")


def _npz(raw: bytes, what: str) -> dict[str, np.ndarray]:
    """An .npz's arrays, never unpickled, its members' unpacked sizes checked before any is read."""
    import numpy as np

    try:
        with zipfile.ZipFile(io.BytesIO(raw)) as archive:
            unpacked = sum(member.file_size for member in archive.infolist())
        if unpacked > MAX_CALIBRATION_BYTES:
            raise InvalidArgument(f"{what} unpacks to {unpacked} bytes, past {MAX_CALIBRATION_BYTES}")
        with np.load(io.BytesIO(raw), allow_pickle=False) as arrays:
            return {key: arrays[key] for key in arrays.files}
    except InvalidArgument:
        raise
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise InvalidArgument(f"{what} is not an .npz of arrays (numpy.savez): {str(exc)[:200]}") from None


def _stacked(manifest: ModelManifest, requests: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Requests' inputs as rows along axis 0: a batched model's rows concatenated, else one request a row."""
    import numpy as np

    ranks = {s.name: len(s.shape) for s in manifest.inputs}
    found = {}
    for spec in manifest.inputs:
        parts = [r[spec.name] for r in requests]
        if not manifest.batched and all(p.ndim == ranks[spec.name] for p in parts):
            found[spec.name] = np.stack(parts)
        else:
            found[spec.name] = np.concatenate(parts)
    return found


def _calibration(
    db: Database,
    registry: ModelRegistry,
    manifest: ModelManifest,
    body: CompressBody,
    warmup: dict[str, np.ndarray] | None,
) -> Calibration | None:
    given = body.calibration
    if isinstance(given, Upload):
        sha = check_sha256(given.sha256, "calibration.sha256")
        if registry.blobs.size(sha) is None:
            raise InvalidArgument(f"calibration.sha256: no blob {sha}: upload the .npz with PUT /v1/blobs/{sha} first")
        arrays = _npz(_blob(registry, sha, "the calibration upload"), f"calibration blob {sha}")
        return Calibration("upload", arrays, sha)
    if isinstance(given, Warmup):
        if warmup is None or manifest.warmup is None:
            raise InvalidArgument(
                f"calibration: {manifest.ref} has no warmup inputs: use the fleet's samples or an upload"
            )
        return Calibration("warmup", _stacked(manifest, [warmup]), manifest.warmup.sha256)
    if isinstance(given, FleetSamples):
        found = _fleet_samples(db, manifest, given.limit, given.since_s)
        if found is None:
            raise InvalidArgument(
                f"calibration: the devices kept no samples of {manifest.name} that fit {manifest.ref}'s inputs"
                + (f" in the last {given.since_s} s" if given.since_s else "")
            )
        return found
    # Not given: the fleet's samples when there are any, else the parent's warmup inputs, else none.
    found = _fleet_samples(db, manifest, DEFAULT_CALIBRATION_LIMIT, None)
    if found is not None:
        return found
    if warmup is not None and manifest.warmup is not None:
        return Calibration("warmup", _stacked(manifest, [warmup]), manifest.warmup.sha256)
    return None


def _fleet_samples(db: Database, manifest: ModelManifest, limit: int, since_s: int | None) -> Calibration | None:
    """The newest inputs the devices kept of the model (any version) that fit the parent's signature."""
    from edge_runtime.models.package import shape_fits

    since_ms = now_ms() - since_s * 1000 if since_s else None
    samples = SampleStore(db).calibration(manifest.name, None, limit, since_ms, MAX_CALIBRATION_BYTES)
    specs = {s.name: s for s in manifest.inputs}

    def fits(sample: dict[str, np.ndarray]) -> bool:
        if set(sample) != set(specs):
            return False
        for key, array in sample.items():
            spec = specs[key]
            shape = tuple(array.shape)
            if manifest.batched or len(shape) == len(spec.shape) + 1:
                shape = (1, *shape[1:]) if manifest.batched else shape[1:]
            if not shape_fits(shape, spec) or array.dtype.str[1:] != _dtype(spec.datatype):
                return False
        return True

    usable = [s for s in samples if fits(s)]
    if not usable:
        return None
    inputs = _stacked(manifest, usable)
    query: dict[str, Any] = {"model": manifest.name, "limit": limit}
    if since_ms is not None:
        query["since_ms"] = since_ms
    return Calibration("fleet-samples", inputs, calibration_digest(inputs), query)


def _dtype(datatype: str) -> str:
    from edge_runtime.inference.tensors import dtype_of

    return str(dtype_of(datatype).str[1:])
