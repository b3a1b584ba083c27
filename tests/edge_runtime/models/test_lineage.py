"""A compressed variant's `lineage` in its manifest: parsed, round-tripped canonically, every bad field refused."""

from __future__ import annotations

import json
from typing import Any

import pytest

from edge_runtime.errors import PackageError
from edge_runtime.models.package import COMPRESSION_METHODS, Lineage, parse_manifest
from tests.edge_runtime.models.test_package import manifest

PARENT = {"name": "digits", "version": 2, "sha256": "b" * 64}
GOOD_LINEAGE: dict[str, Any] = {
    "parent": PARENT,
    "method": "int8-static",
    "precision": "int8",
    "tool": "onnxruntime 1.24.1",
    "calibration": {"source": "fleet-samples", "samples": 512, "sha256": "c" * 64, "query": {"reason": "random"}},
}


def lineage(**changes: Any) -> dict[str, Any]:
    data = {**GOOD_LINEAGE, **changes}
    return {k: v for k, v in data.items() if v is not ...}


def test_a_variant_names_its_parent_method_and_calibration_and_round_trips() -> None:
    m = parse_manifest(manifest(version=6, lineage=lineage()))
    assert m.lineage == Lineage(2, "b" * 64, "int8-static", "onnxruntime 1.24.1")
    assert m.lineage is not None and m.lineage.precision == "int8"
    assert m.lineage.calibration == GOOD_LINEAGE["calibration"]
    again = parse_manifest(m.to_json())
    assert again == m
    assert json.loads(m.to_json())["lineage"] == GOOD_LINEAGE


@pytest.mark.parametrize("method", sorted(COMPRESSION_METHODS))
def test_each_method_carries_its_own_precision(method: str) -> None:
    m = parse_manifest(manifest(version=6, lineage=lineage(method=method, precision=..., calibration=...)))
    assert m.lineage is not None and m.lineage.precision == COMPRESSION_METHODS[method]
    assert json.loads(m.to_json())["lineage"]["precision"] == COMPRESSION_METHODS[method]


def test_a_manifest_without_lineage_has_none() -> None:
    m = parse_manifest(manifest())
    assert m.lineage is None
    assert "lineage" not in json.loads(m.to_json())


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"parent": {"name": "other", "version": 2, "sha256": "b" * 64}}, "must be the model's own name"),
        ({"parent": {"name": "digits", "version": 6, "sha256": "b" * 64}}, "other than the variant's own"),
        ({"parent": {"name": "digits", "version": 0, "sha256": "b" * 64}}, "positive integer"),
        ({"parent": {"name": "digits", "version": True, "sha256": "b" * 64}}, "positive integer"),
        ({"parent": {"name": "digits", "version": 2, "sha256": "B" * 64}}, "parent.sha256"),
        ({"parent": {"name": "digits", "version": 2}}, "lineage.parent must be"),
        ({"parent": "digits:2"}, "lineage.parent must be"),
        ({"method": "int4"}, "lineage.method must be one of"),
        ({"method": ...}, "lineage.method must be one of"),
        ({"precision": "fp16"}, "precision of int8-static is int8"),
        ({"tool": 3}, "lineage.tool"),
        ({"surprise": 1}, "lineage has unknown keys"),
        ({"calibration": {"source": "web", "samples": 1}}, "calibration.source"),
        ({"calibration": {"source": "upload", "samples": 0}}, "calibration.samples"),
        ({"calibration": {"source": "upload", "samples": 3, "sha256": "x"}}, "calibration.sha256"),
        ({"calibration": {"source": "upload", "samples": 3, "extra": 1}}, "lineage.calibration must be"),
        ({"calibration": {"source": "upload", "samples": 3, "query": []}}, "calibration.query"),
    ],
)
def test_malformed_lineage_is_refused(changes: dict[str, Any], reason: str) -> None:
    with pytest.raises(PackageError, match=reason):
        parse_manifest(manifest(version=6, lineage=lineage(**changes)))


def test_lineage_must_be_an_object() -> None:
    with pytest.raises(PackageError, match="lineage must be an object"):
        parse_manifest(manifest(version=6, lineage="digits:2"))
