"""The TensorRT engine cache and build decisions as plain data: cache keys, profile shapes, builder flags.

Pure except for `EngineCache`'s file I/O; nothing here imports tensorrt (engines/tensorrt.py does), so the
version split between TensorRT 10 and 11 is tested on any machine.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from edge_runtime.errors import EngineError
from edge_runtime.inference.tensors import TensorSpec
from edgefleet.durable import fsync_dir

__all__ = [
    "BuildOptions",
    "BuilderFlags",
    "EngineCache",
    "EngineCacheKey",
    "ProfileShapes",
    "Shape",
    "builder_flags",
    "key_for",
    "optimal_batch",
    "profile_shapes",
    "tensorrt_major",
]

log = structlog.get_logger(__name__)

Shape = tuple[int, ...]
# Input name -> (min, opt, max) shapes of the optimisation profile.
ProfileShapes = dict[str, tuple[Shape, Shape, Shape]]

# Bump when the key's inputs or the file layout change: old entries then simply miss.
CACHE_FORMAT = 1
# Cache files start with this magic and the sha256 of the payload, so a truncated or corrupted file (power
# loss mid-copy, a full disk) is caught here instead of being handed to TensorRT's deserializer.
_MAGIC = b"EFTRT01\n"
_HEADER = len(_MAGIC) + hashlib.sha256().digest_size
_HEX64 = re.compile(r"^[0-9a-f]{64}$")  # sha256 digests: ONNX files and cache keys
_VERSION = re.compile(r"^(\d+)\.\d+")


def tensorrt_major(version: str) -> int:
    """The major number of a TensorRT version string ("10.3.0.30" -> 10)."""
    match = _VERSION.match(version.strip())
    if match is None:
        raise EngineError(f"cannot read a TensorRT version from {version!r}")
    return int(match.group(1))


@dataclass(frozen=True)
class BuilderFlags:
    """How to create the network and builder config for one TensorRT major version."""

    strongly_typed: bool  # precision comes from the ONNX file's types
    fp16: bool  # set BuilderFlag.FP16 (weak typing, TensorRT 10 only)
    pass_strongly_typed_flag: bool  # pass NetworkDefinitionCreationFlag.STRONGLY_TYPED to create_network
    ignored: str = ""  # why a requested option was ignored; "" when none was


def builder_flags(major: int, *, fp16_requested: bool) -> BuilderFlags:
    """Decide typing and precision flags for a TensorRT major version.

    TensorRT 10 (JetPack 6): FP16 needs a weakly typed network plus BuilderFlag.FP16 (weak typing is
    deprecated from 10.12 but works); without it we opt in to strong typing, so an FP32 ONNX builds FP32
    kernels exactly as on 11 (ONNX Runtime's TensorRT EP makes the same choice, microsoft/onnxruntime#24298).
    TensorRT 11 removed BuilderFlag.FP16 and every weak-typing API and always builds strongly typed; the
    STRONGLY_TYPED creation flag is deprecated and ignored there, so it is not passed ("Migrating from
    TensorRT 10.x to 11.x", Removed Python APIs: BuilderFlag.FP16 -> ModelOpt AutoCast).
    """
    if major < 10:
        raise EngineError(f"TensorRT {major}.x is not supported: edgefleet needs TensorRT 10 (JetPack 6) or 11")
    if major == 10:
        if fp16_requested:
            return BuilderFlags(strongly_typed=False, fp16=True, pass_strongly_typed_flag=False)
        return BuilderFlags(strongly_typed=True, fp16=False, pass_strongly_typed_flag=True)
    ignored = ""
    if fp16_requested:
        ignored = (
            f"engine.tensorrt_fp16 is ignored on TensorRT {major}: networks are strongly typed and precision "
            "comes from the ONNX file (convert it to FP16 with ModelOpt AutoCast before packaging)"
        )
    return BuilderFlags(strongly_typed=True, fp16=False, pass_strongly_typed_flag=False, ignored=ignored)


def optimal_batch(max_batch_size: int) -> int:
    """The batch size the optimisation profile tunes kernels for: the maximum.

    TensorRT picks one kernel per layer, timed at the profile's opt shape, and runs it for every batch size
    in [min, max]. Batches only grow when requests queue up, which is when the GPU is the bottleneck and
    throughput decides whether the queue drains; small batches happen when the GPU is mostly idle, where a
    kernel tuned for a larger batch costs little. A latency policy that lowers max_batch_size changes the
    cache key, so the engine is rebuilt tuned for the smaller maximum, and the batcher's adaptive profiler
    measures what each batch size really costs on the engine that was built.
    """
    return max(1, max_batch_size)


def profile_shapes(
    inputs: Sequence[TensorSpec],
    max_batch_size: int,
    *,
    fixed_dims: Mapping[str, Sequence[int]] | None = None,
) -> ProfileShapes:
    """(min, opt, max) shapes per input: batch 1..max_batch_size on axis 0, every other dimension fixed.

    `max_batch_size` 0 means the model has no batch axis. A dynamic dimension other than the batch axis has
    no range we could choose well, so it must be given in `fixed_dims` (a full shape per input; its batch
    entry is ignored) or the model is refused with an EngineError naming the input.
    """
    if max_batch_size < 0:
        raise EngineError(f"max_batch_size must be >= 0, not {max_batch_size}")
    given = fixed_dims or {}
    shapes: ProfileShapes = {}
    for spec in inputs:
        shape = spec.shape
        if max_batch_size > 0 and (not shape or shape[0] != -1):
            raise EngineError(
                f"input {spec.name!r} has shape {list(shape)}: with max_batch_size > 0 its first dimension "
                "must be the dynamic batch axis (-1)"
            )
        first = 1 if max_batch_size > 0 else 0
        rest = _fixed(spec, shape[first:], given.get(spec.name), first)
        if max_batch_size == 0:
            shapes[spec.name] = (rest, rest, rest)
        else:
            shapes[spec.name] = ((1, *rest), (optimal_batch(max_batch_size), *rest), (max_batch_size, *rest))
    return shapes


def _fixed(spec: TensorSpec, dims: Shape, given: Sequence[int] | None, offset: int) -> Shape:
    dynamic = [offset + i for i, d in enumerate(dims) if d == -1]
    if not dynamic:
        return dims
    if given is None:
        raise EngineError(
            f"input {spec.name!r} (shape {list(spec.shape)}) has dynamic dimension(s) at axis {dynamic} "
            "besides the batch axis; TensorRT needs their sizes for its optimisation profile. Give them, or "
            "serve this model with ONNX Runtime"
        )
    full = tuple(int(d) for d in given)
    if len(full) != len(spec.shape):
        raise EngineError(f"input {spec.name!r}: given shape {list(full)} has the wrong rank for {list(spec.shape)}")
    out = full[offset:]
    for axis, (declared, value) in enumerate(zip(dims, out, strict=True), start=offset):
        if value <= 0 or (declared != -1 and declared != value):
            raise EngineError(f"input {spec.name!r}: given size {value} at axis {axis} does not fit {list(spec.shape)}")
    return out


@dataclass(frozen=True)
class BuildOptions:
    """Everything besides the ONNX file, TensorRT version and GPU that changes the built engine."""

    tensorrt_major: int
    max_batch_size: int
    profile: tuple[tuple[str, Shape, Shape, Shape], ...]  # (input, min, opt, max), sorted by input
    fp16: bool
    strongly_typed: bool
    workspace_mib: int

    @classmethod
    def create(
        cls,
        *,
        tensorrt_major: int,
        max_batch_size: int,
        shapes: ProfileShapes,
        flags: BuilderFlags,
        workspace_mib: int,
    ) -> BuildOptions:
        profile = tuple((name, *shapes[name]) for name in sorted(shapes))
        return cls(
            tensorrt_major=tensorrt_major,
            max_batch_size=max_batch_size,
            profile=profile,
            fp16=flags.fp16,
            strongly_typed=flags.strongly_typed,
            workspace_mib=workspace_mib,
        )

    def shapes(self) -> ProfileShapes:
        return {name: (lo, opt, hi) for name, lo, opt, hi in self.profile}

    def to_dict(self) -> dict[str, Any]:
        return {
            "tensorrt_major": self.tensorrt_major,
            "max_batch_size": self.max_batch_size,
            "profile": [[name, list(lo), list(opt), list(hi)] for name, lo, opt, hi in self.profile],
            "fp16": self.fp16,
            "strongly_typed": self.strongly_typed,
            "workspace_mib": self.workspace_mib,
        }


@dataclass(frozen=True)
class EngineCacheKey:
    """What a serialized engine depends on; `digest` names its cache file."""

    onnx_sha256: str
    tensorrt_version: str
    gpu_name: str
    compute_capability: tuple[int, int]
    build_options: BuildOptions

    def __post_init__(self) -> None:
        if not _HEX64.match(self.onnx_sha256):
            raise EngineError(f"onnx_sha256 must be 64 lower-case hex digits, not {self.onnx_sha256!r}")

    def digest(self) -> str:
        major, minor = self.compute_capability
        document = {
            "format": CACHE_FORMAT,
            "onnx_sha256": self.onnx_sha256,
            # The full version: TensorRT plans are not portable even across patch releases.
            "tensorrt_version": self.tensorrt_version,
            "gpu_name": self.gpu_name,
            "compute_capability": f"{major}.{minor}",
            "build_options": self.build_options.to_dict(),
        }
        canonical = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        return hashlib.sha256(canonical.encode()).hexdigest()


def key_for(
    onnx_sha256: str,
    tensorrt_version: str,
    gpu_name: str,
    compute_capability: tuple[int, int],
    build_options: BuildOptions,
) -> str:
    """The cache key (64 hex digits) of an engine built from these inputs."""
    return EngineCacheKey(onnx_sha256, tensorrt_version, gpu_name, compute_capability, build_options).digest()


class EngineCache:
    """Serialized engines and timing caches in one directory, each file written atomically and checksummed."""

    key_for = staticmethod(key_for)

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def path_for(self, key: str) -> Path:
        if not _HEX64.match(key):
            raise EngineError(f"not an engine cache key: {key!r}")
        return self.directory / f"{key}.plan"

    def load(self, key: str) -> bytes | None:
        """The cached engine, or None when there is none or it is damaged (a damaged file is removed)."""
        return _read_checked(self.path_for(key))

    def store(self, key: str, plan: bytes) -> Path:
        path = self.path_for(key)
        _write_atomic(path, plan)
        return path

    def drop(self, key: str) -> None:
        """Forget an engine, e.g. one TensorRT failed to deserialize."""
        self.path_for(key).unlink(missing_ok=True)

    def timing_cache_path(self, tensorrt_version: str, gpu_name: str, compute_capability: tuple[int, int]) -> Path:
        # Timing data is valid for one TensorRT version on one kind of GPU; it is shared by every model.
        ident = f"{CACHE_FORMAT}|{tensorrt_version}|{gpu_name}|{compute_capability[0]}.{compute_capability[1]}"
        return self.directory / f"timing-{hashlib.sha256(ident.encode()).hexdigest()[:32]}.cache"

    def load_timing_cache(
        self, tensorrt_version: str, gpu_name: str, compute_capability: tuple[int, int]
    ) -> bytes | None:
        return _read_checked(self.timing_cache_path(tensorrt_version, gpu_name, compute_capability))

    def store_timing_cache(
        self, tensorrt_version: str, gpu_name: str, compute_capability: tuple[int, int], data: bytes
    ) -> None:
        _write_atomic(self.timing_cache_path(tensorrt_version, gpu_name, compute_capability), data)


def _read_checked(path: Path) -> bytes | None:
    try:
        with path.open("rb") as f:
            header = f.read(_HEADER)
            payload = f.read()
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("engine_cache.unreadable", path=str(path), error=exc.strerror)
        return None
    if len(header) < _HEADER or not header.startswith(_MAGIC):
        reason = "no cache header (truncated or not written by edgefleet)"
    elif hashlib.sha256(payload).digest() != header[len(_MAGIC) :]:
        reason = "checksum mismatch (truncated or corrupted)"
    else:
        return payload
    log.warning("engine_cache.corrupt", path=str(path), reason=reason, bytes=len(header) + len(payload))
    path.unlink(missing_ok=True)
    return None


def _write_atomic(path: Path, payload: bytes) -> None:
    """write temp -> fsync -> rename -> fsync(dir), so a power cut leaves the old file or the new one.

    durable.write_atomic's protocol, streamed: header and payload are written in turn rather than joined
    into one more copy of an engine that can be hundreds of MiB.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(_MAGIC)
            f.write(hashlib.sha256(payload).digest())
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
