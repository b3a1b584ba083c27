"""GET /v1/samples and /v1/samples/export on a real admin API over a real store: the list pages with its
cursor; an export round-trips the exact tensors through np.load and pyarrow, carries its manifest, is bounded
(422/413 naming what to narrow), needs the operator role, and is an audit record; bad input changes nothing."""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest

from edgefleet.proto.edgefleet.v1 import results_pb2
from tests.cloud_sync.samples.conftest import (
    OPERATOR,
    TEST_MAX_EXPORT_BYTES,
    VIEWER,
    SamplesApi,
    image,
    probabilities,
    sampled,
)


def _fill(api: SamplesApi) -> list[np.ndarray[Any, Any]]:
    """cam-1: 2 random, 2 uncertain; cam-2: 1 disagreement; each with its own image and answer. The images."""
    rng = np.random.default_rng(3)
    images = [rng.random((1, 1, 28, 28), dtype=np.float32) for _ in range(5)]
    answers = [{"probabilities": probabilities(i)} for i in range(5)]
    reasons = ["", "", "uncertain", "uncertain"]
    api.fleet.upload(
        "cam-1",
        [
            sampled({"x": images[i]}, answers[i], reason=r, measure="margin" if r else "", score=0.1 * i)
            for i, r in enumerate(reasons)
        ],
    )
    api.fleet.upload(
        "cam-2",
        [sampled({"x": images[4]}, answers[4], reason="disagreement", engine="tensorrt/10.3.0", shadow_version=2)],
    )
    return images


def test_the_list_pages_oldest_first_without_tensors(samples_api: SamplesApi) -> None:
    _fill(samples_api)
    with samples_api.client(VIEWER) as viewer:
        first = viewer.get("/v1/samples", params={"model": "digits", "limit": 3})
        assert first.status_code == 200, first.text
        page = first.json()
        assert [(s["device_id"], s["seq"], s["reason"]) for s in page["samples"]] == [
            ("cam-1", 1, "random"),
            ("cam-1", 2, "random"),
            ("cam-1", 3, "uncertain"),
        ]
        assert page["more"] and "payload" not in page["samples"][0] and page["samples"][0]["payload_bytes"] > 3136
        rest = viewer.get("/v1/samples", params={"model": "digits", "after_id": page["next_after_id"]}).json()
        assert [(s["device_id"], s["seq"]) for s in rest["samples"]] == [("cam-1", 4), ("cam-2", 1)]
        assert not rest["more"]
        hard = viewer.get("/v1/samples", params={"model": "digits", "reason": "disagreement"}).json()["samples"]
        assert [(s["engine"], s["shadow_version"]) for s in hard] == [("tensorrt/10.3.0", 2)]
        assert viewer.get("/v1/samples", params={"model": "digits", "device": "cam-2"}).json()["samples"][0]["seq"] == 1
        recent = viewer.get("/v1/samples", params={"model": "digits", "since_s": 60}).json()
        assert recent["samples"] == []  # created_at_ms of the test records is in 2023


def test_an_npz_export_round_trips_the_exact_tensors_with_its_manifest(samples_api: SamplesApi) -> None:
    images = _fill(samples_api)
    with samples_api.client() as operator:
        response = operator.get("/v1/samples/export", params={"model": "digits", "reason": "uncertain"})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/zip"
    assert 'filename="samples.npz"' in response.headers["content-disposition"]
    with np.load(io.BytesIO(response.content)) as npz:
        np.testing.assert_array_equal(npz["inputs/x"], np.stack([images[2], images[3]]))
        assert npz["inputs/x"].dtype == np.float32
        np.testing.assert_array_equal(npz["outputs/probabilities"], np.stack([probabilities(2), probabilities(3)]))
        assert npz["row/device_id"].tolist() == ["cam-1", "cam-1"]
        assert npz["row/seq"].tolist() == [3, 4] and npz["row/reason"].tolist() == ["uncertain"] * 2
        np.testing.assert_allclose(npz["row/score"], [0.2, 0.3])
        manifest = json.loads(npz["manifest.json"])
    assert manifest["count"] == 2 and manifest["format"] == "npz"
    assert manifest["query"] == {"model": "digits", "reason": "uncertain", "after_id": 0, "limit": 1000}
    assert manifest["counts"]["reason"] == {"uncertain": 2} and manifest["counts"]["device_id"] == {"cam-1": 2}
    assert manifest["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [1, 1, 28, 28]}]
    assert manifest["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [1, 10]}]
    assert manifest["created_at_ms"]["min"] < manifest["created_at_ms"]["max"] and manifest["more"] is False


def test_a_parquet_export_round_trips_the_exact_tensors_with_its_manifest(samples_api: SamplesApi) -> None:
    images = _fill(samples_api)
    with samples_api.client() as operator:
        response = operator.get("/v1/samples/export", params={"model": "digits", "format": "parquet"})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/vnd.apache.parquet"
    table = pq.read_table(io.BytesIO(response.content))
    assert table.num_rows == 5
    rows = table.to_pylist()
    for row, expected in zip(rows, images, strict=True):
        got = np.frombuffer(row["inputs/x"], dtype=np.float32).reshape(row["inputs/x.shape"])
        np.testing.assert_array_equal(got, expected)
    assert [r["reason"] for r in rows] == ["random", "random", "uncertain", "uncertain", "disagreement"]
    assert [(r["device_id"], r["seq"]) for r in rows][-1] == ("cam-2", 1)
    manifest = json.loads(table.schema.metadata[b"edgefleet.manifest"])
    assert manifest["count"] == 5 and manifest["counts"]["engine"] == {
        "onnxruntime/CPUExecutionProvider": 4,
        "tensorrt/10.3.0": 1,
    }


def test_exports_are_for_operators_and_each_is_audited(samples_api: SamplesApi) -> None:
    _fill(samples_api)
    with samples_api.client(VIEWER) as viewer:
        refused = viewer.get("/v1/samples/export", params={"model": "digits"})
    assert refused.status_code == 403 and "operator" in refused.json()["detail"]
    assert samples_api.audit.query(action="samples.export") == []
    with samples_api.client(OPERATOR) as operator:
        assert operator.get("/v1/samples/export", params={"model": "digits", "limit": 2}).status_code == 200
    (record,) = samples_api.audit.query(action="samples.export")
    assert (record.actor, record.target, record.before) == ("token-1", "samples/digits", None)
    assert record.after is not None and record.after["count"] == 2 and record.after["format"] == "npz"


def test_an_export_past_its_bounds_is_refused_saying_what_to_narrow(samples_api: SamplesApi) -> None:
    # Each sample carries ~30 KB: 10 pass the test's 256 KiB bound.
    big = np.zeros((1, 3, 50, 50), dtype=np.float32)
    samples_api.fleet.upload("cam-1", [sampled({"x": big + i}) for i in range(10)])
    with samples_api.client() as operator:
        too_many = operator.get("/v1/samples/export", params={"model": "digits", "limit": 10_001})
        assert too_many.status_code == 422 and "narrow --since" in too_many.json()["detail"]
        too_big = operator.get("/v1/samples/export", params={"model": "digits"})
        assert too_big.status_code == 413, too_big.text
        assert "narrow --since (since_s) or lower --limit" in too_big.json()["detail"]
        assert str(TEST_MAX_EXPORT_BYTES) in too_big.json()["detail"]
        assert operator.get("/v1/samples/export", params={"model": "digits", "limit": 5}).status_code == 200
    assert len(samples_api.audit.query(action="samples.export")) == 1  # the refused ones left no record


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({}, "model"),
        ({"model": "Digits!"}, "model"),
        ({"model": "digits", "reason": "hard"}, "reason"),
        ({"model": "digits", "version": 0}, "version"),
        ({"model": "digits", "since_s": 0}, "since_s"),
        ({"model": "digits", "limit": 0}, "limit"),
        ({"model": "digits", "after_id": -1}, "after_id"),
        ({"model": "digits", "device": "no/such"}, "device"),
        ({"model": "digits", "format": "csv"}, "format"),
    ],
)
def test_bad_input_is_422_naming_the_parameter(samples_api: SamplesApi, params: dict[str, Any], field: str) -> None:
    _fill(samples_api)
    path = "/v1/samples/export" if "format" in params else "/v1/samples"
    with samples_api.client() as operator:
        response = operator.get(path, params=params)
    assert response.status_code == 422, response.text
    assert response.json()["detail"].startswith(f"{field}:") or field in response.json()["detail"]
    assert samples_api.audit.query() == []


def test_samples_of_several_shapes_export_one_array_each_and_undecodable_ones_are_named(
    samples_api: SamplesApi,
) -> None:
    batch_of_two = np.stack([image(1)[0], image(2)[0]])  # [2, 1, 28, 28]: an app that sent a batch
    bytes_input = results_pb2.SampledInference(reason="uncertain")
    bytes_input.request.inputs.add(name="x", datatype="BYTES", shape=[1])
    bytes_input.request.raw_input_contents.append(b"\x01\x00\x00\x00a")
    samples_api.fleet.upload(
        "cam-1", [sampled({"x": image(0)}), sampled({"x": batch_of_two}), bytes_input.SerializeToString()]
    )
    with samples_api.client() as operator:
        response = operator.get("/v1/samples/export", params={"model": "digits"})
    assert response.status_code == 200, response.text
    with np.load(io.BytesIO(response.content)) as npz:
        np.testing.assert_array_equal(npz["inputs/x/0"], image(0))
        np.testing.assert_array_equal(npz["inputs/x/1"], batch_of_two)
        assert npz["row/seq"].tolist() == [1, 2]
        manifest = json.loads(npz["manifest.json"])
    assert manifest["inputs"] == [{"name": "x", "datatype": "FP32", "shape": None}]
    (left_out,) = manifest["left_out"]
    assert (left_out["device_id"], left_out["seq"]) == ("cam-1", 3) and "BYTES" in left_out["why"]
    assert manifest["count"] == 2
