"""Model packages: an ONNX file and its manifest.json, read and written with full validation.

A package directory holds `model.onnx` and `manifest.json` (DESIGN.md "Model packages"). The manifest bytes
are what the registry signs, so they are written canonically (sorted keys, UTF-8). Not for where packages
live on a device: see models/store.py.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from edge_runtime.errors import PackageError, VerificationFailed
from edge_runtime.inference.tensors import DATATYPES, TensorSpec

__all__ = [
    "MANIFEST_FILE",
    "MODEL_FILE",
    "ModelManifest",
    "ModelPackage",
    "parse_manifest",
    "read_package",
    "sha256_file",
    "write_package",
]

MANIFEST_FILE = "manifest.json"
MODEL_FILE = "model.onnx"
MAX_MANIFEST_BYTES = 1 << 20
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class ModelManifest:
    name: str
    version: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    sha256: str
    size: int
    max_batch_size: int = 0
    labels: tuple[str, ...] = ()
    platform: str = "onnx"
    created: str = ""
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "platform": self.platform,
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "labels": list(self.labels),
            "max_batch_size": self.max_batch_size,
            "sha256": self.sha256,
            "size": self.size,
            "created": self.created,
            "description": self.description,
            **({"extra": self.extra} if self.extra else {}),
        }

    def to_json(self) -> bytes:
        """Canonical bytes: these are what the registry signs."""
        return json.dumps(self.to_dict(), sort_keys=True, indent=2, ensure_ascii=False).encode() + b"\n"


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise PackageError(f"invalid manifest: {message}")


def _tensor(value: Any, where: str, batched: bool) -> TensorSpec:
    _require(isinstance(value, dict), f"{where} must be an object")
    unknown = set(value) - {"name", "datatype", "shape"}
    _require(not unknown, f"{where} has unknown keys {sorted(unknown)}")
    name, datatype, shape = value.get("name"), value.get("datatype"), value.get("shape")
    _require(isinstance(name, str) and 0 < len(name) <= 256, f"{where}.name must be a non-empty string")
    _require(datatype in DATATYPES, f"{where}.datatype {datatype!r} is not one of {', '.join(DATATYPES)}")
    _require(
        isinstance(shape, list)
        and 0 < len(shape) <= 16
        and all(isinstance(d, int) and not isinstance(d, bool) and (d == -1 or d > 0) for d in shape),
        f"{where}.shape must be a list of 1..16 dimensions, each -1 or positive",
    )
    if batched:
        _require(shape[0] == -1, f"{where}.shape[0] must be -1 (the batch axis) when max_batch_size > 0")
    return TensorSpec(name=name, datatype=datatype, shape=tuple(shape))


def parse_manifest(raw: bytes) -> ModelManifest:
    """Validate manifest.json bytes; PackageError names the first thing wrong."""
    _require(len(raw) <= MAX_MANIFEST_BYTES, f"larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PackageError(f"invalid manifest: not UTF-8 JSON ({exc})") from exc
    _require(isinstance(data, dict), "must be a JSON object")
    known = {
        "name",
        "version",
        "platform",
        "inputs",
        "outputs",
        "labels",
        "max_batch_size",
        "sha256",
        "size",
        "created",
        "description",
        "extra",
    }
    unknown = set(data) - known
    _require(not unknown, f"unknown keys {sorted(unknown)}")
    name, version = data.get("name"), data.get("version")
    _require(
        isinstance(name, str) and bool(_NAME.match(name)),
        "name must be 1-63 characters of a-z, 0-9, '.', '_', '-', starting with a letter or digit",
    )
    _require(
        isinstance(version, int) and not isinstance(version, bool) and 0 < version < 2**31,
        "version must be a positive integer",
    )
    _require(data.get("platform", "onnx") == "onnx", "platform must be 'onnx'")
    mbs = data.get("max_batch_size", 0)
    _require(
        isinstance(mbs, int) and not isinstance(mbs, bool) and 0 <= mbs <= 65536,
        "max_batch_size must be an integer in 0..65536",
    )
    for key in ("inputs", "outputs"):
        _require(isinstance(data.get(key), list) and 0 < len(data[key]) <= 64, f"{key} must list 1..64 tensors")
    inputs = tuple(_tensor(t, f"inputs[{i}]", mbs > 0) for i, t in enumerate(data["inputs"]))
    outputs = tuple(_tensor(t, f"outputs[{i}]", mbs > 0) for i, t in enumerate(data["outputs"]))
    for key, specs in (("inputs", inputs), ("outputs", outputs)):
        names = [t.name for t in specs]
        _require(len(set(names)) == len(names), f"{key} names must be unique")
    labels = data.get("labels", [])
    _require(isinstance(labels, list) and all(isinstance(x, str) for x in labels), "labels must be strings")
    sha, size = data.get("sha256"), data.get("size")
    _require(isinstance(sha, str) and bool(_SHA256.match(sha)), "sha256 must be 64 lower-case hex digits")
    _require(isinstance(size, int) and not isinstance(size, bool) and size > 0, "size must be a positive integer")
    for key in ("created", "description"):
        _require(isinstance(data.get(key, ""), str), f"{key} must be a string")
    extra = data.get("extra", {})
    _require(isinstance(extra, dict), "extra must be an object")
    return ModelManifest(
        name=name,
        version=version,
        inputs=inputs,
        outputs=outputs,
        sha256=sha,
        size=size,
        max_batch_size=mbs,
        labels=tuple(labels),
        created=data.get("created", ""),
        description=data.get("description", ""),
        extra=extra,
    )


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class ModelPackage:
    """A validated package on disk."""

    directory: Path
    manifest: ModelManifest

    @property
    def model_path(self) -> Path:
        return self.directory / MODEL_FILE


def read_package(directory: Path, *, verify: bool = True) -> ModelPackage:
    """Read a package directory; with `verify`, check the ONNX file's size and sha256 against the manifest."""
    directory = Path(directory)
    manifest_path = directory / MANIFEST_FILE
    try:
        raw = manifest_path.read_bytes()
    except OSError as exc:
        raise PackageError(f"{directory} is not a model package: cannot read {MANIFEST_FILE} ({exc.strerror})") from exc
    manifest = parse_manifest(raw)
    model = directory / MODEL_FILE
    if not model.is_file():
        raise PackageError(f"{directory} is not a model package: {MODEL_FILE} is missing")
    if verify:
        size = model.stat().st_size
        if size != manifest.size:
            raise VerificationFailed(
                f"{manifest.ref}: {MODEL_FILE} is {size} bytes, the manifest says {manifest.size}; refusing it"
            )
        actual = sha256_file(model)
        if actual != manifest.sha256:
            raise VerificationFailed(
                f"{manifest.ref}: {MODEL_FILE} sha256 {actual} does not match the manifest's {manifest.sha256}; "
                "refusing it"
            )
    return ModelPackage(directory=directory, manifest=manifest)


def write_package(
    directory: Path,
    model_bytes: bytes,
    *,
    name: str,
    version: int,
    inputs: list[TensorSpec],
    outputs: list[TensorSpec],
    max_batch_size: int = 0,
    labels: list[str] | None = None,
    description: str = "",
    extra: dict[str, Any] | None = None,
) -> ModelPackage:
    """Write model.onnx and a manifest that describes it (sha256, size, created now)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    manifest = ModelManifest(
        name=name,
        version=version,
        inputs=tuple(inputs),
        outputs=tuple(outputs),
        sha256=hashlib.sha256(model_bytes).hexdigest(),
        size=len(model_bytes),
        max_batch_size=max_batch_size,
        labels=tuple(labels or ()),
        created=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        description=description,
        extra=dict(extra or {}),
    )
    parse_manifest(manifest.to_json())  # what we write must be what we accept
    (directory / MODEL_FILE).write_bytes(model_bytes)
    (directory / MANIFEST_FILE).write_bytes(manifest.to_json())
    return ModelPackage(directory=directory, manifest=manifest)
