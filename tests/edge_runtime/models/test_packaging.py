"""Packaging an ONNX file a user brings (models/packaging.py): the decisions as plain functions, then the
zoo through package_model, and every bad input refused with its reason and nothing written."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from edge_runtime.errors import PackageError, VerificationFailed
from edge_runtime.inference.tensors import TensorSpec
from edge_runtime.models.package import MANIFEST_FILE, WARMUP_FILE, read_package
from edge_runtime.models.packaging import DEFAULT_MAX_BATCH_SIZE, PackageRequest, package_model, parse_shape
from edge_runtime.models.probe import ModelView, batch_axis_blockers, missing_sizes, rows_follow
from edge_runtime.models.warmup import load_npz
from tests.models import zoo

Array = np.ndarray[Any, Any]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("images=1x3x640x640", ("images", (1, 3, 640, 640))),
        ("ids=1X16", ("ids", (1, 16))),
        ("sr=", ("sr", ())),
        ("a=b=2x3", ("a=b", (2, 3))),  # an input name may hold '='
    ],
)
def test_shape_arguments_are_read(text: str, expected: tuple[str, tuple[int, ...]]) -> None:
    assert parse_shape(text) == expected


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("images", "must be INPUT=D1xD2"),
        ("=1x2", "must be INPUT=D1xD2"),
        ("images=1x3xHxW", "is not sizes joined by 'x'"),
        ("images=1x0x4", "at least 1"),
        ("images=1x-3", "at least 1"),
    ],
)
def test_bad_shape_arguments_are_refused(text: str, reason: str) -> None:
    with pytest.raises(PackageError, match=reason):
        parse_shape(text)


def test_batch_axis_blockers_name_every_tensor_without_a_variable_axis_0() -> None:
    view = ModelView(
        inputs=(TensorSpec("x", "FP32", (-1, 4)), TensorSpec("sr", "INT64", ()), TensorSpec("u", "FP32", ())),
        outputs=(TensorSpec("y", "FP32", (-1, 1)), TensorSpec("state", "FP32", (2, -1, 8))),
        unranked=frozenset({"u"}),
    )
    assert batch_axis_blockers(view) == ["input 'sr' is a scalar", "output 'state' has a fixed axis 0 of 2"]
    assert batch_axis_blockers(ModelView((TensorSpec("x", "FP32", (-1, 4)),), (TensorSpec("y", "FP32", (-1,)),))) == []


def test_missing_sizes_ignore_a_batch_axis_but_not_a_time_axis() -> None:
    view = ModelView(
        inputs=(
            TensorSpec("img", "FP32", (-1, 3, -1, -1)),
            TensorSpec("t", "FP32", (-1, 4)),
            TensorSpec("u", "FP32", ()),
        ),
        outputs=(TensorSpec("y", "FP32", (-1,)),),
        unranked=frozenset({"u"}),
    )
    assert missing_sizes(view, set(), batched=True) == [
        "'img' axes [2, 3] of [-1, 3, -1, -1]",
        "'u' (its rank is not declared)",
    ]
    assert missing_sizes(view, {"img", "u"}, batched=False) == ["'t' axes [0] of [-1, 4]"]


def _runs(a: Array, b: Array, both: Array) -> tuple[list[dict[str, Array]], dict[str, Array]]:
    return [{"y": a}, {"y": b}], {"y": both}


def test_rows_follow_only_when_batch_2_is_the_two_batch_1_runs() -> None:
    a, b = np.array([[1.0, 2.0]], np.float32), np.array([[3.0, 4.0]], np.float32)
    assert rows_follow(*_runs(a, b, np.concatenate([a, b])), ["y"]) == ""
    assert rows_follow(*_runs(a, b, np.concatenate([a, b + 1e-7])), ["y"]) == ""  # float rounding
    assert "row 1 of output 'y'" in rows_follow(*_runs(a, b, np.concatenate([a, a + b])), ["y"])
    assert "axis 0 of 1 at batch 1 and 1 at batch 2" in rows_follow(*_runs(a, b, a), ["y"])
    ints = np.array([[1]]), np.array([[2]])
    assert "row 0" in rows_follow(*_runs(*ints, np.array([[2], [2]])), ["y"])  # integers: exactly equal
    assert "scalar" in rows_follow(*_runs(np.array(1.0), np.array(2.0), np.array(3.0)), ["y"])


rows = st.lists(st.floats(-1e3, 1e3, width=32), min_size=1, max_size=6)


@given(rows, rows)
def test_row_wise_models_batch_and_models_that_mix_rows_do_not(a_values: list[float], b_values: list[float]) -> None:
    width = min(len(a_values), len(b_values))
    a = np.array([a_values[:width]], np.float32)
    b = np.array([b_values[:width]], np.float32)

    def row_wise(x: Array) -> dict[str, Array]:
        return {"y": np.tanh(x) * 3 + 1}

    def over_time(x: Array) -> dict[str, Array]:  # axis 0 is time: each row adds the ones before it
        return {"y": np.cumsum(x, axis=0)}

    both = np.concatenate([a, b])
    assert rows_follow([row_wise(a), row_wise(b)], row_wise(both), ["y"]) == ""
    mixed = rows_follow([over_time(a), over_time(b)], over_time(both), ["y"])
    assert (mixed == "") == bool(np.allclose(a + b, b, rtol=1e-4, atol=1e-5)), mixed  # only a ~ 0 hides it


def request(tmp_path: Path, model: bytes, name: str = "m", **changes: Any) -> PackageRequest:
    path = tmp_path / f"{name}.onnx"
    path.write_bytes(model)
    return PackageRequest(model=path, name=name, version=1, out=tmp_path / "out", **changes)


@pytest.mark.parametrize(
    ("name", "batched", "max_batch"),
    [("cnn", True, DEFAULT_MAX_BATCH_SIZE), ("detector", True, 8), ("ocr", False, 0), ("timeline", False, 0)],
)
def test_the_batch_axis_is_found_from_real_runs(tmp_path: Path, name: str, batched: bool, max_batch: int) -> None:
    case = zoo.CASES[name]
    shapes = dict(parse_shape(a) for a in case.args if a != "--shape")
    said: list[str] = []
    result = package_model(
        request(tmp_path, case.build(), name, shapes=shapes, max_batch_size=8 if name == "detector" else None),
        said.append,
    )
    assert result.verdict.batched is batched
    manifest = result.package.manifest
    assert manifest.max_batch_size == max_batch
    assert any(line.startswith("batching: yes" if batched else "batching: no") for line in said), said
    if shapes:
        assert manifest.warmup is not None and manifest.warmup.shapes == shapes and not manifest.warmup.file


def test_scalar_inputs_and_warm_up_inputs_make_an_unbatched_package_that_covers_them(tmp_path: Path) -> None:
    result = package_model(request(tmp_path, zoo.vad(), "vad", warmup_inputs=zoo.vad_warmup()))
    m = result.package.manifest
    assert not result.verdict.batched and "input 'sr' is a scalar" in result.verdict.reason
    assert [(t.name, t.shape) for t in m.inputs] == [("input", (-1, -1)), ("sr", ()), ("state", (2, -1, 128))]
    assert m.warmup is not None and m.warmup.file == WARMUP_FILE and m.warmup.shapes["sr"] == ()
    stored = load_npz(result.package.directory / WARMUP_FILE)
    assert int(stored["sr"]) == 16000 and stored["sr"].shape == ()
    # The manifest's checksum covers the warm-up data: changing it is caught like a changed model.
    (result.package.directory / WARMUP_FILE).write_bytes(b"PK" + bytes(100))
    with pytest.raises(VerificationFailed, match="warmup.npz is 102 bytes"):
        read_package(result.package.directory)


def test_non_tensor_outputs_are_left_out_and_said(tmp_path: Path) -> None:
    said: list[str] = []
    result = package_model(request(tmp_path, zoo.tabular(), "tabular"), said.append)
    assert [o.name for o in result.package.manifest.outputs] == ["label"]
    assert result.view.left_out == (("probabilities", "seq(map(int64,tensor(float)))"),)
    assert any("left out: output 'probabilities'" in line for line in said)


def _unranked(output_rank: int = 2) -> bytes:
    nodes = [helper.make_node("Relu", ["x"], ["y"])]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


def test_a_rank_the_file_leaves_open_is_taken_from_the_given_shape(tmp_path: Path) -> None:
    with pytest.raises(PackageError, match=r"'x' \(its rank is not declared\)"):
        package_model(request(tmp_path, _unranked()))
    result = package_model(request(tmp_path, _unranked(), shapes={"x": (1, 5)}))
    m = result.package.manifest
    assert [(t.name, t.shape) for t in (*m.inputs, *m.outputs)] == [("x", (-1, -1)), ("y", (-1, -1))]
    assert result.verdict.batched


def _external_data_model(directory: Path) -> bytes:
    weights = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], initializer=[weights],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = directory / "external.onnx"
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, size_threshold=0)
    return path.read_bytes()


def _pickled_npz(path: Path) -> Path:
    np.savez(path, features=np.array([{"not": "a tensor"}], dtype=object))
    return path


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("not-onnx", "is not an ONNX model"),
        ("empty", "is not a model ONNX Runtime can load"),
        ("missing-file", "cannot read"),
        ("external-data", "keeps its weights in external data files"),
        ("bad-name", "--name/--version: name must be"),
        ("unknown-shape-input", "--shape names 'imgs', which is not an input"),
        ("shape-rank", r"--shape images=1x3x64 does not fit input 'images' \[-1, 3, -1, -1\]"),
        ("shape-fixed-axis", r"--shape images=1x4x64x64 does not fit input 'images'"),
        ("shape-too-small", r"the model failed on the warm-up inputs on inputs \{'images': \[1, 3, 1, 1\]\}"),
        ("npz-unknown", "--warmup-inputs: 'audio' is not an input of the model"),
        ("npz-missing", "--warmup-inputs: input 'state' is missing"),
        ("npz-dtype", r"--warmup-inputs: 'sr' is int32, the model takes INT64 \(int64\)"),
        (
            "npz-shape",
            r"--warmup-inputs: 'state' has shape \[3, 1, 128\], which does not fit the model's \[2, -1, 128\]",
        ),
        ("npz-and-shape", "give --warmup-inputs or --shape, not both"),
        ("npz-rows", r"--warmup-inputs: the arrays disagree on the batch size \(axis 0: \[1, 2\]\)"),
        ("max-batch-unbatchable", "--max-batch-size 4 asks for batching, but axis 0 is not a batch axis"),
        ("no-tensor-output", "has no tensor output edge-agent can serve"),
    ],
)
def test_bad_input_is_refused_with_its_reason_and_nothing_is_written(tmp_path: Path, case: str, reason: str) -> None:
    vad = zoo.vad_warmup()
    detector_shape = {"images": (1, 3, 64, 96)}
    requests = {
        "not-onnx": lambda: request(tmp_path, b"\x08\x07garbage"),
        "empty": lambda: request(tmp_path, b""),
        "missing-file": lambda: PackageRequest(tmp_path / "nowhere.onnx", "m", 1, tmp_path / "out"),
        "external-data": lambda: request(tmp_path, _external_data_model(tmp_path)),
        "bad-name": lambda: request(tmp_path, zoo.cnn(), "CNN"),
        "unknown-shape-input": lambda: request(tmp_path, zoo.detector(), shapes={"imgs": (1, 3, 64, 64)}),
        "shape-rank": lambda: request(tmp_path, zoo.detector(), shapes={"images": (1, 3, 64)}),
        "shape-fixed-axis": lambda: request(tmp_path, zoo.detector(), shapes={"images": (1, 4, 64, 64)}),
        "shape-too-small": lambda: request(tmp_path, zoo.detector(), shapes={"images": (1, 3, 1, 1)}),
        "npz-unknown": lambda: request(tmp_path, zoo.vad(), warmup_inputs={**vad, "audio": vad["input"]}),
        "npz-missing": lambda: request(tmp_path, zoo.vad(), warmup_inputs={k: vad[k] for k in ("input", "sr")}),
        "npz-dtype": lambda: request(tmp_path, zoo.vad(), warmup_inputs={**vad, "sr": np.array(16000, np.int32)}),
        "npz-shape": lambda: request(
            tmp_path, zoo.vad(), warmup_inputs={**vad, "state": np.zeros((3, 1, 128), np.float32)}
        ),
        "npz-and-shape": lambda: request(tmp_path, zoo.vad(), warmup_inputs=vad, shapes=detector_shape),
        "npz-rows": lambda: request(
            tmp_path,
            zoo.encoder(),
            warmup_inputs={"input_ids": np.zeros((1, 4), np.int64), "attention_mask": np.ones((2, 4), np.int64)},
        ),
        "max-batch-unbatchable": lambda: request(
            tmp_path, zoo.ocr(), shapes={"image": (1, 1, 32, 50)}, max_batch_size=4
        ),
        "no-tensor-output": lambda: request(tmp_path, _only_zipmap()),
    }
    with pytest.raises(PackageError, match=reason):
        package_model(requests[case]())
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # no staging directory left


def _only_zipmap() -> bytes:
    model = onnx.load_model_from_string(zoo.tabular())
    del model.graph.output[0]  # keep the ZipMap output only
    return bytes(model.SerializeToString())


def test_a_pickled_warm_up_file_is_refused_unread(tmp_path: Path) -> None:
    with pytest.raises(PackageError, match="Object arrays cannot be loaded when allow_pickle=False"):
        load_npz(_pickled_npz(tmp_path / "pickled.npz"))


def test_a_warm_up_file_that_unpacks_too_large_is_refused_unread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from edge_runtime.models import warmup

    path = tmp_path / "big.npz"
    np.savez_compressed(path, x=np.zeros((1024, 1024), np.float32))  # 4 MiB that deflates to a few KiB
    monkeypatch.setattr(warmup, "MAX_WARMUP_BYTES", 1 << 20)
    with pytest.raises(PackageError, match=r"unpacks to \d+ bytes; warm-up inputs may take at most 1048576"):
        load_npz(path)
    assert path.stat().st_size < 1 << 20
    with zipfile.ZipFile(path) as archive:  # the refusal came from the directory, as the message says
        assert archive.infolist()[0].file_size > 1 << 20


def test_an_existing_package_is_replaced_only_when_asked(tmp_path: Path) -> None:
    first = package_model(request(tmp_path, zoo.cnn(), "cnn"))
    with pytest.raises(PackageError, match="exists and is not empty; choose another --out, or --force"):
        package_model(request(tmp_path, zoo.cnn(), "cnn"))
    again = package_model(request(tmp_path, zoo.cnn(), "cnn", description="again", force=True))
    assert again.package.directory == first.package.directory
    assert json.loads((again.package.directory / MANIFEST_FILE).read_text())["description"] == "again"
