"""cloud_sync/compress.py on digits:2: each method through ONNX Runtime's own tooling, the signature kept, the
variant smaller and agreeing with its parent on the held-out split, and what it must refuse."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from cloud_sync.compress import Calibration, calibration_digest, compress
from cloud_sync.errors import FailedPrecondition, InvalidArgument
from edge_runtime.models.package import parse_manifest
from models.build import digits_holdout


def _session(model: bytes) -> ort.InferenceSession:
    return ort.InferenceSession(model, providers=["CPUExecutionProvider"])


def _signature(session: ort.InferenceSession) -> list[tuple[str, str, int]]:
    return [(a.name, a.type, len(a.shape)) for a in [*session.get_inputs(), *session.get_outputs()]]


def _top1(model: bytes, pixels: np.ndarray) -> np.ndarray:
    (probabilities,) = _session(model).run(["probabilities"], {"pixels": pixels})
    top1: np.ndarray = np.asarray(probabilities).argmax(axis=1)
    return top1


def _calibration(rows: np.ndarray) -> Calibration:
    inputs = {"pixels": rows}
    return Calibration("upload", inputs, calibration_digest(inputs))


# (method, at least this agreement with the parent on the holdout, at most this share of the parent's bytes)
EXPECTED = [("fp16", 0.99, 0.6), ("int8-dynamic", 0.99, 0.5), ("int8-static", 0.98, 0.5)]


@pytest.mark.parametrize(("method", "agreement", "size"), EXPECTED, ids=[e[0] for e in EXPECTED])
def test_each_method_keeps_the_signature_shrinks_the_model_and_agrees_on_the_holdout(
    digits2: tuple[bytes, dict[str, Any]], training_rows: np.ndarray, method: str, agreement: float, size: float
) -> None:
    model, manifest = digits2
    variant = compress(model, manifest, method, version=7, calibration=_calibration(training_rows))
    assert _signature(_session(variant.model)) == _signature(_session(model))
    assert len(variant.model) <= size * len(model)
    pixels, labels = digits_holdout()
    parent_top1, variant_top1 = _top1(model, pixels), _top1(variant.model, pixels)
    assert np.mean(parent_top1 == variant_top1) >= agreement
    assert np.mean(variant_top1 == labels) >= np.mean(parent_top1 == labels) - 0.01
    report = variant.report
    assert report.method == method and report.variant_bytes == len(variant.model) and report.parent_bytes == len(model)
    assert report.evaluated_on == "calibration" and report.compared == len(training_rows)
    assert report.agreement >= agreement and report.rule == "top-1 of probabilities"
    assert report.parent_latency_ms > 0 and report.variant_latency_ms > 0


def test_the_variant_manifest_is_the_parents_with_its_lineage_and_parses(
    digits2: tuple[bytes, dict[str, Any]], training_rows: np.ndarray
) -> None:
    model, manifest = digits2
    calibration = _calibration(training_rows)
    variant = compress(model, manifest, "int8-static", version=7, calibration=calibration)
    parsed = parse_manifest(__import__("json").dumps(variant.manifest).encode())
    assert parsed.version == 7 and parsed.sha256 == variant.sha256 and parsed.size == len(variant.model)
    assert parsed.labels == tuple(manifest["labels"]) and parsed.max_batch_size == manifest["max_batch_size"]
    assert [t.to_dict() for t in parsed.inputs] == manifest["inputs"]
    assert [t.to_dict() for t in parsed.outputs] == manifest["outputs"]
    assert parsed.description == "int8 (static, QDQ) variant of digits:2"
    lineage = variant.manifest["lineage"]
    assert lineage["parent"] == {"name": "digits", "version": 2, "sha256": manifest["sha256"]}
    assert lineage["method"] == "int8-static" and lineage["precision"] == "int8"
    assert lineage["tool"].startswith(f"onnxruntime {ort.__version__} quantize_static QDQ")
    assert lineage["calibration"] == {"source": "upload", "samples": 512, "sha256": calibration.sha256}
    # fp16 and dynamic int8 take no calibration: their lineage names none.
    fp16 = compress(model, manifest, "fp16", version=8, calibration=calibration)
    assert "calibration" not in fp16.manifest["lineage"] and fp16.manifest["lineage"]["precision"] == "fp16"


def test_static_int8_is_qdq_symmetric_and_leaves_the_probabilities_in_float(
    digits2: tuple[bytes, dict[str, Any]], training_rows: np.ndarray
) -> None:
    model, manifest = digits2
    variant = compress(model, manifest, "int8-static", version=7, calibration=_calibration(training_rows))
    graph = onnx.load_from_string(variant.model).graph
    ops = [n.op_type for n in graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    assert not {"QLinearMatMul", "QLinearConv", "MatMulInteger"} & set(ops)  # QDQ, not the operator format
    # TensorRT takes zero points of 0 only: every zero point is 0, every quantized tensor int8.
    initializers = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    zero_points = [initializers[n.input[2]] for n in graph.node if n.op_type == "QuantizeLinear" and len(n.input) > 2]
    assert zero_points and all(z.dtype == np.int8 and not z.any() for z in zero_points)
    (softmax,) = [n for n in graph.node if n.op_type == "Softmax"]
    assert softmax.output[0] == "probabilities"  # no QDQ pair after it


def test_static_int8_without_calibration_is_refused(digits2: tuple[bytes, dict[str, Any]]) -> None:
    model, manifest = digits2
    with pytest.raises(InvalidArgument, match="needs calibration data"):
        compress(model, manifest, "int8-static", version=7)


def test_without_calibration_agreement_is_measured_on_seeded_inputs(digits2: tuple[bytes, dict[str, Any]]) -> None:
    model, manifest = digits2
    variant = compress(model, manifest, "int8-dynamic", version=7)
    assert variant.report.evaluated_on == "random" and variant.report.compared == 64


@pytest.mark.parametrize(
    ("inputs", "word"),
    [
        ({"image": np.zeros((4, 64), np.float32)}, "no array for input"),
        ({"pixels": np.zeros((4, 64), np.float32), "extra": np.zeros((4, 1), np.float32)}, "not an input"),
        ({"pixels": np.zeros((4, 64), np.float64)}, "the model takes FP32"),
        ({"pixels": np.zeros((4, 63), np.float32)}, "do not fit"),
        ({"pixels": np.zeros((0, 64), np.float32)}, "at least one"),
    ],
    ids=["missing", "unknown", "dtype", "shape", "empty"],
)
def test_calibration_that_does_not_fit_the_inputs_is_refused(
    digits2: tuple[bytes, dict[str, Any]], inputs: dict[str, np.ndarray], word: str
) -> None:
    model, manifest = digits2
    with pytest.raises(InvalidArgument, match=word):
        compress(model, manifest, "int8-static", version=7, calibration=Calibration("upload", inputs))


def test_a_model_onnx_runtime_cannot_load_is_refused(digits2: tuple[bytes, dict[str, Any]]) -> None:
    _, manifest = digits2
    with pytest.raises(FailedPrecondition, match="ONNX Runtime cannot load the parent digits:2"):
        compress(b"not an onnx model at all", manifest, "fp16", version=7)
    truncated = digits2[0][: len(digits2[0]) // 2]
    with pytest.raises(FailedPrecondition, match="cannot load"):
        compress(truncated, manifest, "int8-dynamic", version=7)


def test_a_variant_is_not_compressed_again(digits2: tuple[bytes, dict[str, Any]]) -> None:
    model, manifest = digits2
    variant = compress(model, manifest, "fp16", version=7)
    with pytest.raises(FailedPrecondition, match="itself a fp16 variant of digits:2"):
        compress(variant.model, variant.manifest, "int8-dynamic", version=8)


def test_an_unknown_method_is_refused(digits2: tuple[bytes, dict[str, Any]]) -> None:
    model, manifest = digits2
    with pytest.raises(InvalidArgument, match="not one of fp16, int8-static, int8-dynamic"):
        compress(model, manifest, "int4", version=7)


def test_a_changed_signature_is_refused(digits2: tuple[bytes, dict[str, Any]]) -> None:
    from cloud_sync.compress import _check_signature

    model, _ = digits2
    renamed = onnx.load_from_string(model)
    renamed.graph.output[0].name = "scores"
    renamed.graph.node[-1].output[0] = "scores"
    with pytest.raises(FailedPrecondition, match="changed the model's signature.*probabilities.*scores"):
        _check_signature(_session(model), _session(renamed.SerializeToString()), "fp16")


def test_a_model_without_a_batch_axis_is_calibrated_and_compared_a_request_a_row() -> None:
    from onnx import TensorProto, helper

    rng = np.random.default_rng(1)
    weight = numpy_helper.from_array(rng.standard_normal((8, 3)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "unbatched",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        initializer=[weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    manifest = {
        "name": "pairs",
        "version": 1,
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 8]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [2, 3]}],
        "sha256": "0" * 64,
        "size": 1,
    }
    rows = rng.standard_normal((20, 2, 8)).astype(np.float32)  # 20 requests, each of the input's own shape
    variant = compress(
        model.SerializeToString(), manifest, "int8-static", version=2, calibration=_calibration_of({"x": rows})
    )
    assert variant.report.compared == 20 and variant.report.agreement >= 0.9
    assert variant.report.rule == "top-1 of y" and variant.manifest["lineage"]["calibration"]["samples"] == 20
    with pytest.raises(InvalidArgument, match="do not fit"):
        compress(
            model.SerializeToString(), manifest, "int8-static", version=2, calibration=_calibration_of({"x": rows[0]})
        )


def _calibration_of(inputs: dict[str, np.ndarray]) -> Calibration:
    return Calibration("upload", inputs, calibration_digest(inputs))
