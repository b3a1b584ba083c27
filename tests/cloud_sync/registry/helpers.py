"""Model packages for registry tests: random bytes as the model file (the registry never parses ONNX), a
manifest naming them, and the blobs stored."""

from __future__ import annotations

import hashlib
import os
from typing import Any

from cloud_sync.registry.blobs import BlobStore

FAR_FUTURE_MS = 4_102_444_800_000  # 2100-01-01


def manifest_for(name: str, version: int, model: bytes, warmup: bytes | None = None, **extra: Any) -> dict[str, Any]:
    manifest: dict[str, Any] = {
        "name": name,
        "version": version,
        "platform": "onnx",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 2]}],
        "labels": [],
        "max_batch_size": 8,
        "sha256": hashlib.sha256(model).hexdigest(),
        "size": len(model),
        "created": "",
        "description": "",
        **extra,
    }
    if warmup is not None:
        manifest["warmup"] = {
            "shapes": {"x": [1, 4]},
            "file": "warmup.npz",
            "sha256": hashlib.sha256(warmup).hexdigest(),
            "size": len(warmup),
        }
    return manifest


def stored(blobs: BlobStore, data: bytes) -> str:
    sha = hashlib.sha256(data).hexdigest()
    blobs.put([data], expected_sha256=sha, max_bytes=1 << 30)
    return sha


def package(
    blobs: BlobStore, name: str, version: int, size: int = 1000, warmup: int = 0
) -> tuple[dict[str, Any], bytes, bytes | None]:
    """(manifest, model bytes, warmup bytes) with both blobs stored."""
    model = os.urandom(size)
    extra = os.urandom(warmup) if warmup else None
    stored(blobs, model)
    if extra is not None:
        stored(blobs, extra)
    return manifest_for(name, version, model, extra), model, extra
