"""Model package manifests: every malformed field is refused with a reason; verification catches tampering."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_runtime.errors import PackageError, VerificationFailed
from edge_runtime.inference.tensors import TensorSpec
from edge_runtime.models.package import (
    MANIFEST_FILE,
    MODEL_FILE,
    WARMUP_FILE,
    parse_manifest,
    read_package,
    write_package,
)

GOOD: dict[str, Any] = {
    "name": "digits",
    "version": 1,
    "platform": "onnx",
    "max_batch_size": 8,
    "inputs": [{"name": "pixels", "datatype": "FP32", "shape": [-1, 64]}],
    "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}],
    "labels": ["0", "1"],
    "sha256": "a" * 64,
    "size": 10,
    "created": "2026-11-25T00:00:00Z",
    "description": "",
}


def manifest(**changes: Any) -> bytes:
    data = {**GOOD, **changes}
    return json.dumps({k: v for k, v in data.items() if v is not ...}).encode()


def test_a_good_manifest_round_trips() -> None:
    m = parse_manifest(manifest())
    assert m.ref == "digits:1"
    assert m.inputs == (TensorSpec("pixels", "FP32", (-1, 64)),)
    assert parse_manifest(m.to_json()) == m


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"name": "Digits"}, "name must be"),
        ({"name": "../etc"}, "name must be"),
        ({"name": ...}, "name must be"),
        ({"version": 0}, "version must be a positive integer"),
        ({"version": "1"}, "version must be a positive integer"),
        ({"version": True}, "version must be a positive integer"),
        ({"platform": "tflite"}, "platform must be 'onnx'"),
        ({"max_batch_size": -1}, "max_batch_size"),
        ({"inputs": []}, "inputs must list"),
        ({"inputs": [{"name": "x", "datatype": "FP8", "shape": [-1, 1]}]}, "datatype 'FP8'"),
        ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 0]}]}, "each -1 or positive"),
        ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [-1] * 17}]}, "0..16 dimensions"),
        (
            {"inputs": [{"name": "sr", "datatype": "INT64", "shape": []}]},
            r"inputs\[0\] is a scalar \(shape \[\]\), which has no batch",
        ),
        ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [3, 4]}]}, r"shape\[0\] must be -1"),
        ({"inputs": [{"name": "", "datatype": "FP32", "shape": [-1]}]}, "name must be a non-empty string"),
        ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [-1], "extra": 1}]}, "unknown keys"),
        ({"outputs": [{"name": "y", "datatype": "FP32", "shape": [-1]}] * 2}, "names must be unique"),
        ({"labels": [1, 2]}, "labels must be strings"),
        ({"sha256": "A" * 64}, "sha256 must be 64 lower-case hex"),
        ({"size": 0}, "size must be a positive integer"),
        ({"surprise": 1}, "unknown keys"),
        ({"warmup": []}, "warmup must be an object"),
        ({"warmup": {"shapes": {}, "extra": 1}}, "warmup has unknown keys"),
        ({"warmup": {"shapes": {"image": [1, 64]}}}, "warmup.shapes names 'image', which is not an input"),
        ({"warmup": {"shapes": {"pixels": [1, 63]}}}, r"warmup.shapes\['pixels'\] \[1, 63\] does not fit"),
        ({"warmup": {"shapes": {"pixels": [1, 64, 1]}}}, "does not fit"),
        ({"warmup": {"shapes": {"pixels": ["1", 64]}}}, "must be a list of integers"),
        ({"warmup": {"shapes": {"pixels": [1, 64]}, "sha256": "a" * 64}}, "need warmup.file"),
        (
            {"warmup": {"shapes": {"pixels": [1, 64]}, "file": "../../etc/passwd", "sha256": "a" * 64, "size": 1}},
            "warmup.file must be 'warmup.npz'",
        ),
        ({"warmup": {"shapes": {}, "file": "warmup.npz", "sha256": "a" * 64, "size": 1}}, "every input's shape"),
        ({"warmup": {"shapes": {"pixels": [1, 64]}, "file": "warmup.npz", "sha256": "x", "size": 1}}, "warmup.sha256"),
        (
            {"warmup": {"shapes": {"pixels": [1, 64]}, "file": "warmup.npz", "sha256": "a" * 64, "size": 0}},
            "warmup.size",
        ),
    ],
)
def test_malformed_manifests_are_refused(changes: dict[str, Any], reason: str) -> None:
    with pytest.raises(PackageError, match=reason):
        parse_manifest(manifest(**changes))


def test_scalars_are_declared_with_an_empty_shape_in_a_model_without_a_batch_axis() -> None:
    inputs = [
        {"name": "audio", "datatype": "FP32", "shape": [-1, -1]},
        {"name": "sr", "datatype": "INT64", "shape": []},
    ]
    m = parse_manifest(manifest(max_batch_size=0, inputs=inputs))
    assert m.inputs[1] == TensorSpec("sr", "INT64", ())
    assert not m.batched
    assert parse_manifest(m.to_json()) == m


def test_warm_up_shapes_round_trip() -> None:
    m = parse_manifest(manifest(warmup={"shapes": {"pixels": [4, 64]}}))
    assert m.warmup is not None and m.warmup.shapes == {"pixels": (4, 64)} and m.warmup.file == ""
    assert parse_manifest(m.to_json()) == m


@pytest.mark.parametrize("raw", [b"", b"not json", b"[]", b"\xff\xfe", b"{" * 100_000])
def test_garbage_is_refused(raw: bytes) -> None:
    with pytest.raises(PackageError):
        parse_manifest(raw)


def test_an_oversized_manifest_is_refused_before_parsing() -> None:
    with pytest.raises(PackageError, match="larger than"):
        parse_manifest(b" " * (2 << 20))


def write_sample(directory: Path, payload: bytes = b"onnx bytes") -> None:
    write_package(
        directory,
        payload,
        name="sample",
        version=3,
        inputs=[TensorSpec("x", "FP32", (-1, 2))],
        outputs=[TensorSpec("y", "FP32", (-1, 2))],
        max_batch_size=4,
    )


def test_read_package_verifies_size_and_checksum(tmp_path: Path) -> None:
    write_sample(tmp_path)
    assert read_package(tmp_path).manifest.ref == "sample:3"
    data = bytearray((tmp_path / MODEL_FILE).read_bytes())
    data[0] ^= 0xFF
    (tmp_path / MODEL_FILE).write_bytes(bytes(data))
    with pytest.raises(VerificationFailed, match="sha256 .* does not match"):
        read_package(tmp_path)
    (tmp_path / MODEL_FILE).write_bytes(b"short")
    with pytest.raises(VerificationFailed, match="is 5 bytes, the manifest says 10"):
        read_package(tmp_path)


def test_warm_up_inputs_are_written_beside_the_model_and_verified_with_it(tmp_path: Path) -> None:
    write_package(
        tmp_path,
        b"onnx bytes",
        name="sample",
        version=3,
        inputs=[TensorSpec("x", "FP32", (-1, 2)), TensorSpec("sr", "INT64", ())],
        outputs=[TensorSpec("y", "FP32", (-1, 2))],
        warmup_inputs={"x": np.ones((5, 2), np.float32), "sr": np.array(8000, np.int64)},
    )
    package = read_package(tmp_path)
    assert package.files() == [MODEL_FILE, MANIFEST_FILE, WARMUP_FILE]
    assert package.manifest.warmup is not None and package.manifest.warmup.shapes == {"x": (5, 2), "sr": ()}
    (tmp_path / WARMUP_FILE).unlink()
    with pytest.raises(PackageError, match="warmup.npz is missing"):
        read_package(tmp_path)


def test_a_directory_without_a_package_says_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(PackageError, match="cannot read manifest.json"):
        read_package(tmp_path)
    write_sample(tmp_path)
    (tmp_path / MODEL_FILE).unlink()
    with pytest.raises(PackageError, match="model.onnx is missing"):
        read_package(tmp_path)
    assert (tmp_path / MANIFEST_FILE).exists()
