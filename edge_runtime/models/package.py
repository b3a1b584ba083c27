"""Model packages: an ONNX file, its manifest.json and optional warm-up inputs, read and written with
full validation.

A package directory holds `model.onnx`, `manifest.json` (DESIGN.md "Model packages") and, when the model
needs representative inputs, `warmup.npz`, whose sha256 and size the manifest records so that the signature
of the manifest covers it. The manifest bytes are what the registry signs, so they are written canonically
(sorted keys, UTF-8). Not for where packages live on a device (models/store.py) nor for making a package
from an ONNX file (models/packaging.py).
"""

from __future__ import annotations

import hashlib
import json
import re
import zipfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.engines.base import ModelFile
from edge_runtime.errors import PackageError, VerificationFailed
from edge_runtime.inference.tensors import DATATYPES, TensorSpec

__all__ = [
    "COMPRESSION_METHODS",
    "MANIFEST_FILE",
    "MODEL_FILE",
    "PACKAGE_FILES",
    "WARMUP_FILE",
    "Lineage",
    "ModelManifest",
    "ModelPackage",
    "Warmup",
    "check_ref",
    "parse_manifest",
    "read_package",
    "sha256_file",
    "shape_fits",
    "write_npz",
    "write_package",
]

MANIFEST_FILE = "manifest.json"
MODEL_FILE = "model.onnx"
WARMUP_FILE = "warmup.npz"
PACKAGE_FILES = (MODEL_FILE, MANIFEST_FILE, WARMUP_FILE)
MAX_MANIFEST_BYTES = 1 << 20
MAX_RANK = 16
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class Warmup:
    """The manifest's `warmup` entry: representative full input shapes, and the file of sample inputs.

    `shapes` gives each input with variable axes the size warm-up, batch profiling and TensorRT's
    optimisation profile use (a batched model's axis 0 is the sample's rows). With `file`, the inputs
    themselves are in warmup.npz, whose sha256 and size are here so the manifest's signature covers them.
    """

    shapes: dict[str, tuple[int, ...]]
    file: str = ""
    sha256: str = ""
    size: int = 0

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"shapes": {k: list(v) for k, v in sorted(self.shapes.items())}}
        if self.file:
            data.update(file=self.file, sha256=self.sha256, size=self.size)
        return data


# How a variant was made from its parent (cloud_sync/compress.py) and the precision each method computes in.
COMPRESSION_METHODS = {"fp16": "fp16", "int8-static": "int8", "int8-dynamic": "int8"}
PRECISIONS = ("fp32", "fp16", "int8")
_CALIBRATION_SOURCES = ("fleet-samples", "upload", "warmup")


@dataclass(frozen=True)
class Lineage:
    """The manifest's `lineage`: a variant's parent version, how it was made and from what calibration data.

    A variant is a version of the same model (so rollouts and assignments treat it like any version); the
    parent's sha256 pins which bytes it was made from. `calibration` ({"source", "samples", "sha256"}) is
    present for static quantization only.
    """

    parent_version: int
    parent_sha256: str
    method: str
    tool: str = ""
    calibration: dict[str, Any] | None = field(default=None, compare=False)

    @property
    def precision(self) -> str:
        return COMPRESSION_METHODS[self.method]

    def to_dict(self, name: str) -> dict[str, Any]:
        data: dict[str, Any] = {
            "parent": {"name": name, "version": self.parent_version, "sha256": self.parent_sha256},
            "method": self.method,
            "precision": self.precision,
            "tool": self.tool,
        }
        if self.calibration is not None:
            data["calibration"] = dict(self.calibration)
        return data


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
    warmup: Warmup | None = None
    lineage: Lineage | None = None

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"

    @property
    def batched(self) -> bool:
        """Axis 0 of every input and output is the batch axis."""
        return self.max_batch_size > 0

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
            **({"warmup": self.warmup.to_dict()} if self.warmup is not None else {}),
            **({"lineage": self.lineage.to_dict(self.name)} if self.lineage is not None else {}),
        }

    def to_json(self) -> bytes:
        """Canonical bytes: these are what the registry signs."""
        return json.dumps(self.to_dict(), sort_keys=True, indent=2, ensure_ascii=False).encode() + b"\n"


def check_ref(name: Any, version: Any) -> None:
    """A valid model name and version (PackageError otherwise)."""
    _require(
        isinstance(name, str) and bool(_NAME.match(name)),
        "name must be 1-63 characters of a-z, 0-9, '.', '_', '-', starting with a letter or digit",
    )
    _require(
        isinstance(version, int) and not isinstance(version, bool) and 0 < version < 2**31,
        "version must be a positive integer",
    )


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
        and len(shape) <= MAX_RANK
        and all(isinstance(d, int) and not isinstance(d, bool) and (d == -1 or d > 0) for d in shape),
        f"{where}.shape must be a list of 0..{MAX_RANK} dimensions, each -1 or positive ([] is a scalar)",
    )
    if batched:
        _require(
            len(shape) > 0,
            f"{where} is a scalar (shape []), which has no batch axis: a model with one has max_batch_size 0",
        )
        _require(shape[0] == -1, f"{where}.shape[0] must be -1 (the batch axis) when max_batch_size > 0")
    return TensorSpec(name=name, datatype=datatype, shape=tuple(shape))


def shape_fits(shape: tuple[int, ...], spec: TensorSpec) -> bool:
    """A concrete shape fits a spec: same rank, each fixed dimension equal, each variable one at least 1."""
    return len(shape) == len(spec.shape) and all(
        d >= 1 and (want == -1 or want == d) for d, want in zip(shape, spec.shape, strict=True)
    )


def _warmup(value: Any, inputs: tuple[TensorSpec, ...]) -> Warmup:
    _require(isinstance(value, dict), "warmup must be an object")
    unknown = set(value) - {"shapes", "file", "sha256", "size"}
    _require(not unknown, f"warmup has unknown keys {sorted(unknown)}")
    shapes = value.get("shapes")
    _require(isinstance(shapes, dict), "warmup.shapes must map input names to shapes")
    specs = {s.name: s for s in inputs}
    parsed: dict[str, tuple[int, ...]] = {}
    for name, shape in shapes.items():
        _require(name in specs, f"warmup.shapes names {name!r}, which is not an input")
        _require(
            isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) for d in shape),
            f"warmup.shapes[{name!r}] must be a list of integers",
        )
        _require(
            shape_fits(tuple(shape), specs[name]),
            f"warmup.shapes[{name!r}] {shape} does not fit the input's shape {list(specs[name].shape)}",
        )
        parsed[name] = tuple(shape)
    file = value.get("file", "")
    if not file:
        _require("sha256" not in value and "size" not in value, "warmup.sha256 and warmup.size need warmup.file")
        return Warmup(parsed)
    # A fixed name: a manifest must not point a reader at another path (../../etc/passwd).
    _require(file == WARMUP_FILE, f"warmup.file must be {WARMUP_FILE!r}")
    _require(set(parsed) == set(specs), "warmup.shapes must give every input's shape when warmup.file is set")
    sha, size = value.get("sha256"), value.get("size")
    _require(isinstance(sha, str) and bool(_SHA256.match(sha)), "warmup.sha256 must be 64 lower-case hex digits")
    _require(isinstance(size, int) and not isinstance(size, bool) and size > 0, "warmup.size must be positive")
    return Warmup(parsed, file, sha, size)


def _lineage(value: Any, name: str, version: int) -> Lineage:
    _require(isinstance(value, dict), "lineage must be an object")
    unknown = set(value) - {"parent", "method", "precision", "tool", "calibration"}
    _require(not unknown, f"lineage has unknown keys {sorted(unknown)}")
    parent = value.get("parent")
    _require(
        isinstance(parent, dict) and set(parent) == {"name", "version", "sha256"},
        'lineage.parent must be {"name", "version", "sha256"}',
    )
    _require(
        parent["name"] == name, f"lineage.parent.name must be the model's own name {name!r}: a variant is a version"
    )
    pv = parent["version"]
    _require(
        isinstance(pv, int) and not isinstance(pv, bool) and 0 < pv < 2**31 and pv != version,
        "lineage.parent.version must be a positive integer other than the variant's own version",
    )
    sha = parent["sha256"]
    _require(
        isinstance(sha, str) and bool(_SHA256.match(sha)), "lineage.parent.sha256 must be 64 lower-case hex digits"
    )
    method = value.get("method")
    _require(method in COMPRESSION_METHODS, f"lineage.method must be one of {', '.join(COMPRESSION_METHODS)}")
    precision = value.get("precision", COMPRESSION_METHODS[method])
    _require(
        precision == COMPRESSION_METHODS[method], f"lineage.precision of {method} is {COMPRESSION_METHODS[method]}"
    )
    tool = value.get("tool", "")
    _require(isinstance(tool, str) and len(tool) <= 200, "lineage.tool must be a string of at most 200 characters")
    calibration = value.get("calibration")
    if calibration is not None:
        _require(
            isinstance(calibration, dict) and set(calibration) <= {"source", "samples", "sha256", "query"},
            'lineage.calibration must be an object of "source", "samples", "sha256" and "query"',
        )
        _require(
            calibration.get("source") in _CALIBRATION_SOURCES,
            f"lineage.calibration.source must be one of {', '.join(_CALIBRATION_SOURCES)}",
        )
        samples = calibration.get("samples")
        _require(
            isinstance(samples, int) and not isinstance(samples, bool) and samples > 0,
            "lineage.calibration.samples must be a positive integer",
        )
        csha = calibration.get("sha256", "")
        _require(
            isinstance(csha, str) and (csha == "" or bool(_SHA256.match(csha))),
            "lineage.calibration.sha256 must be 64 lower-case hex digits",
        )
        _require(isinstance(calibration.get("query", {}), dict), "lineage.calibration.query must be an object")
    return Lineage(pv, sha, method, tool, calibration)


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
        "warmup",
        "lineage",
    }
    unknown = set(data) - known
    _require(not unknown, f"unknown keys {sorted(unknown)}")
    name, version = data.get("name"), data.get("version")
    check_ref(name, version)
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
    warmup = _warmup(data["warmup"], inputs) if "warmup" in data else None
    lineage = _lineage(data["lineage"], name, version) if "lineage" in data else None
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
        warmup=warmup,
        lineage=lineage,
    )


def write_npz(path: Path, arrays: dict[str, np.ndarray[Any, Any]]) -> None:
    """numpy's .npz layout (a zip of .npy files), deflated, never pickled; any input name is a valid key
    (np.savez takes names as keyword arguments, so an input called "file" would collide)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, array in arrays.items():
            with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asarray(array), allow_pickle=False)


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

    @property
    def warmup_path(self) -> Path | None:
        """warmup.npz when the package carries sample inputs."""
        warmup = self.manifest.warmup
        return self.directory / warmup.file if warmup is not None and warmup.file else None

    def files(self) -> list[str]:
        """The package's files, as they are copied and verified."""
        return [MODEL_FILE, MANIFEST_FILE] + ([WARMUP_FILE] if self.warmup_path is not None else [])

    def model_file(self) -> ModelFile:
        """What an engine needs to load this package's model."""
        m = self.manifest
        return ModelFile(
            path=self.model_path,
            ref=m.ref,
            sha256=m.sha256,
            inputs=m.inputs,
            outputs=m.outputs,
            max_batch_size=m.max_batch_size,
        )


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
    package = ModelPackage(directory=directory, manifest=manifest)
    warmup = package.warmup_path
    if warmup is not None and not warmup.is_file():
        raise PackageError(f"{directory} is not a complete model package: {WARMUP_FILE} is missing")
    if verify:
        _verify(manifest.ref, model, manifest.size, manifest.sha256)
        if warmup is not None and manifest.warmup is not None:
            _verify(manifest.ref, warmup, manifest.warmup.size, manifest.warmup.sha256)
    return package


def _verify(ref: str, path: Path, expected_size: int, expected_sha256: str) -> None:
    size = path.stat().st_size
    if size != expected_size:
        raise VerificationFailed(f"{ref}: {path.name} is {size} bytes, the manifest says {expected_size}; refusing it")
    actual = sha256_file(path)
    if actual != expected_sha256:
        raise VerificationFailed(
            f"{ref}: {path.name} sha256 {actual} does not match the manifest's {expected_sha256}; refusing it"
        )


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
    warmup_shapes: dict[str, tuple[int, ...]] | None = None,
    warmup_inputs: dict[str, np.ndarray[Any, Any]] | None = None,
) -> ModelPackage:
    """Write model.onnx and a manifest that describes it (sha256, size, created now).

    `warmup_inputs` (one request's inputs, by name) are written to warmup.npz and their shapes recorded;
    `warmup_shapes` records representative shapes alone. Give one or neither.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if warmup_inputs is not None and warmup_shapes is not None:
        raise ValueError("give warmup_inputs or warmup_shapes, not both")
    warmup = Warmup(dict(warmup_shapes)) if warmup_shapes else None
    if warmup_inputs is not None:
        target = directory / WARMUP_FILE
        write_npz(target, warmup_inputs)
        shapes = {name: tuple(int(d) for d in array.shape) for name, array in warmup_inputs.items()}
        warmup = Warmup(shapes, WARMUP_FILE, sha256_file(target), target.stat().st_size)
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
        warmup=warmup,
    )
    parse_manifest(manifest.to_json())  # what we write must be what we accept
    (directory / MODEL_FILE).write_bytes(model_bytes)
    (directory / MANIFEST_FILE).write_bytes(manifest.to_json())
    return ModelPackage(directory=directory, manifest=manifest)
