"""POST /v1/models/{name}/{version}/compress through a real admin API app: the variant registered as a signed
version with its lineage, and every bad input refused with its reason and nothing registered."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from edge_runtime.inference.tensors import TensorSpec
from edge_runtime.models.package import parse_manifest, write_package
from edgefleet.signing import verify_envelope
from models.build import digits_holdout

from .conftest import MAX_PARENT_BYTES, VIEWER, CompressCloud, npz_bytes


def _compress(cloud: CompressCloud, body: dict[str, Any], ref: str = "digits/2") -> httpx.Response:
    return cloud.api.post(f"/v1/models/{ref}/compress", json=body)


def test_an_int8_variant_is_registered_signed_with_its_lineage_and_audited(
    cloud: CompressCloud, training_rows: np.ndarray, tmp_path: Path
) -> None:
    sha = cloud.upload(npz_bytes({"pixels": training_rows}, tmp_path))
    answer = _compress(cloud, {"to": "int8", "calibration": {"source": "upload", "sha256": sha}})
    assert answer.status_code == 201, answer.text
    body = answer.json()
    assert body["name"] == "digits" and body["version"] == 3  # the next free version
    shown = cloud.api.get("/v1/models/digits/3").json()
    assert {k: v for k, v in body.items() if k != "report"} == shown
    # The envelope verifies with the fleet key, and its manifest is one a device accepts, lineage and all.
    stored = cloud.registry.get("digits", 3)
    envelope = verify_envelope(
        cloud.registry.signer.public_key,
        stored.envelope.manifest_json,
        stored.envelope.signature,
        stored.envelope.key_id,
        now_ms=0,
    )
    parsed = parse_manifest(json.dumps(envelope.manifest).encode())
    assert parsed.lineage is not None and parsed.lineage.method == "int8-static"
    assert parsed.lineage.parent_version == 2 and parsed.lineage.parent_sha256 == cloud.registry.get("digits", 2).sha256
    assert parsed.lineage.calibration == {"source": "upload", "samples": 512, "sha256": sha}
    # The blob is the variant's bytes, and they answer as the parent does on the holdout.
    with cloud.registry.blobs.open(parsed.sha256) as f:
        data = f.read()
    assert hashlib.sha256(data).hexdigest() == parsed.sha256 == body["sha256"]
    report = body["report"]
    assert report["method"] == "int8-static" and report["evaluated_on"] == "calibration"
    assert report["variant_bytes"] == len(data) < report["parent_bytes"] and report["agreement"] >= 0.95
    (record,) = cloud.audit.query(action="model.compress")
    assert record.target == "model/digits:3" and record.actor == "token-0" and record.before is None
    assert record.after is not None and record.after["parent"] == "digits:2"
    assert record.after["serial"] == body["serial"]


def test_fp16_without_calibration_is_measured_on_seeded_inputs_and_takes_the_version_asked(
    cloud: CompressCloud,
) -> None:
    answer = _compress(cloud, {"to": "fp16", "version": 40, "description": "for the Jetsons"})
    assert answer.status_code == 201, answer.text
    body = answer.json()
    assert body["version"] == 40 and body["manifest"]["description"] == "for the Jetsons"
    assert body["report"]["evaluated_on"] == "random" and "calibration" not in body["manifest"]["lineage"]
    assert cloud.versions() == [2, 40]


def test_a_parent_with_warmup_inputs_calibrates_on_them_by_default(
    cloud: CompressCloud, digits2: tuple[bytes, dict[str, Any]], tmp_path: Path
) -> None:
    model, manifest = digits2
    pixels, _ = digits_holdout()
    package = write_package(
        tmp_path / "pkg",
        model,
        name="digits",
        version=5,
        inputs=[TensorSpec("pixels", "FP32", (-1, 64))],
        outputs=[TensorSpec("probabilities", "FP32", (-1, 10))],
        max_batch_size=256,
        labels=manifest["labels"],
        warmup_inputs={"pixels": pixels[:64]},
    )
    warmup = (package.directory / "warmup.npz").read_bytes()
    cloud.push(model, package.manifest.to_dict(), warmup)
    answer = _compress(cloud, {"to": "int8"}, "digits/5")
    assert answer.status_code == 201, answer.text
    body = answer.json()
    calibration = body["manifest"]["lineage"]["calibration"]
    assert calibration == {"source": "warmup", "samples": 64, "sha256": hashlib.sha256(warmup).hexdigest()}
    # The variant keeps the parent's warmup (the same blob) and labels.
    assert body["manifest"]["warmup"] == package.manifest.to_dict()["warmup"]
    assert body["files"]["warmup.npz"]["sha256"] == hashlib.sha256(warmup).hexdigest()
    assert body["report"]["compared"] == 64


def _bad_requests(cloud: CompressCloud, tmp_path: Path) -> list[tuple[str, dict[str, Any], int, str]]:
    """(path, body, status, a word of the reason) of requests that must change nothing."""
    not_npz = cloud.upload(b"these bytes are no npz")
    wrong_input = cloud.upload(npz_bytes({"image": np.zeros((4, 64), np.float32)}, tmp_path))
    wrong_shape = cloud.upload(npz_bytes({"pixels": np.zeros((4, 8, 8), np.float32)}, tmp_path))
    absent = "0" * 64
    return [
        ("nothing/2", {"to": "int8"}, 404, "no model nothing:2"),
        ("digits/9", {"to": "fp16"}, 404, "no model digits:9"),
        ("digits/2", {"to": "fp16", "version": 2}, 409, "digits:2 is registered already"),
        ("digits/2", {"to": "int4"}, 422, "to"),
        ("digits/2", {"to": "fp16", "version": 0}, 422, "version"),
        ("digits/2", {"to": "fp16", "colour": "red"}, 422, "colour"),
        ("digits/2", {"to": "int8"}, 422, "no warmup inputs and the devices kept no samples"),
        ("digits/2", {"to": "int8", "calibration": {"source": "warmup"}}, 422, "has no warmup inputs"),
        ("digits/2", {"to": "int8", "calibration": {"source": "disk"}}, 422, "calibration"),
        ("digits/2", {"to": "int8", "calibration": {"source": "fleet-samples", "limit": 0}}, 422, "limit"),
        ("digits/2", {"to": "int8", "calibration": {"source": "fleet-samples", "limit": 10001}}, 422, "limit"),
        ("digits/2", {"to": "int8", "calibration": {"source": "upload", "sha256": "xyz"}}, 422, "sha256"),
        ("digits/2", {"to": "int8", "calibration": {"source": "upload", "sha256": absent}}, 422, "no blob"),
        ("digits/2", {"to": "int8", "calibration": {"source": "upload", "sha256": not_npz}}, 422, "not an .npz"),
        ("digits/2", {"to": "int8", "calibration": {"source": "upload", "sha256": wrong_input}}, 422, "pixels"),
        ("digits/2", {"to": "int8", "calibration": {"source": "upload", "sha256": wrong_shape}}, 422, "do not fit"),
        ("Digits/2", {"to": "fp16"}, 422, "model name"),
    ]


def test_bad_requests_are_refused_with_their_reason_and_register_nothing(cloud: CompressCloud, tmp_path: Path) -> None:
    cases = _bad_requests(cloud, tmp_path)
    blobs_before = sorted((Path(cloud.registry.blobs.root) / "sha256").rglob("*"))  # type: ignore[attr-defined]
    for path, body, status, word in cases:
        answer = _compress(cloud, body, path)
        assert answer.status_code == status, (path, body, answer.text)
        assert word in answer.text, (path, body, answer.text)
    assert cloud.versions() == [2]
    assert sorted((Path(cloud.registry.blobs.root) / "sha256").rglob("*")) == blobs_before  # type: ignore[attr-defined]
    assert cloud.audit.query(action="model.compress") == []


def test_a_variant_is_not_a_parent_and_a_broken_or_huge_parent_is_refused(
    cloud: CompressCloud, digits2: tuple[bytes, dict[str, Any]]
) -> None:
    assert _compress(cloud, {"to": "fp16"}).status_code == 201  # digits:3, a variant
    again = _compress(cloud, {"to": "int8-dynamic"}, "digits/3")
    assert again.status_code == 409 and "itself a fp16 variant of digits:2: compress that version" in again.text
    _, manifest = digits2
    broken = b"\x08\x07" + bytes(500)  # an ONNX-looking header, then nothing a runtime can load
    cloud.push(broken, {**manifest, "version": 10, "sha256": hashlib.sha256(broken).hexdigest(), "size": len(broken)})
    refused = _compress(cloud, {"to": "fp16"}, "digits/10")
    assert refused.status_code == 409 and "ONNX Runtime cannot load the parent digits:10" in refused.text
    huge = bytes(MAX_PARENT_BYTES + 1)
    cloud.push(huge, {**manifest, "version": 11, "sha256": hashlib.sha256(huge).hexdigest(), "size": len(huge)})
    too_big = _compress(cloud, {"to": "fp16"}, "digits/11")
    assert too_big.status_code == 413 and f"at most {MAX_PARENT_BYTES}" in too_big.text
    assert cloud.versions() == [2, 3, 10, 11]


def test_only_an_operator_compresses(cloud: CompressCloud) -> None:
    url = f"{cloud.url}/v1/models/digits/2/compress"
    assert httpx.post(url, json={"to": "fp16"}, trust_env=False).status_code == 401
    viewer = httpx.post(url, json={"to": "fp16"}, headers={"Authorization": f"Bearer {VIEWER}"}, trust_env=False)
    assert viewer.status_code == 403
    assert cloud.versions() == [2]


def test_the_samples_the_devices_kept_calibrate_by_default(cloud: CompressCloud, training_rows: np.ndarray) -> None:
    from cloud_sync.store import ResultStore
    from tests.cloud_sync.samples.conftest import Fleet, sampled

    fleet = Fleet(cloud.db, ResultStore(cloud.db), cloud.devices)
    kept = [sampled({"pixels": row[None]}, reason="uncertain") for row in training_rows[:100]]
    fleet.upload("cam-1", kept, version=2)
    # A sample of another input shape (another model's inputs under the name) is left out, not an error.
    fleet.upload("cam-2", [sampled({"pixels": np.zeros((1, 32), np.float32)})], version=1)
    answer = _compress(cloud, {"to": "int8"})
    assert answer.status_code == 201, answer.text
    calibration = answer.json()["manifest"]["lineage"]["calibration"]
    assert calibration["source"] == "fleet-samples" and calibration["samples"] == 100
    assert calibration["query"] == {"model": "digits", "limit": 512}
    assert answer.json()["report"]["evaluated_on"] == "calibration"
    chosen = _compress(cloud, {"to": "int8", "calibration": {"source": "fleet-samples", "limit": 40}})
    assert chosen.status_code == 201, chosen.text
    # The newest 40 samples are read; cam-2's, the newest, does not fit and is left out.
    assert chosen.json()["manifest"]["lineage"]["calibration"]["samples"] == 39
    # The samples were kept in 2023 (the helper's device clock): none in the last hour.
    recent = _compress(cloud, {"to": "int8", "calibration": {"source": "fleet-samples", "since_s": 3600}})
    assert recent.status_code == 422 and "kept no samples of digits" in recent.text
    assert cloud.versions() == [2, 3, 4]
