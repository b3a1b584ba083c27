"""The ONNX Runtime engine: it runs only the outputs it is given, names the ones it cannot serve, refuses
inputs it cannot feed; and no engine module knows the package format (engines take a ModelFile)."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper

import edge_runtime.engines
from edge_runtime.engines import ModelFile
from edge_runtime.engines.onnxruntime import OnnxRuntimeEngine
from edge_runtime.errors import PackageError
from edge_runtime.inference.tensors import TensorSpec
from tests.models import zoo

FEATURES = (TensorSpec("features", "FP32", (-1, 4)),)
LABEL = TensorSpec("label", "INT64", (-1,))


def model_file(path: Path, data: bytes, **fields: object) -> ModelFile:
    path.write_bytes(data)
    return ModelFile(path=path, ref="m:1", sha256="0" * 64, inputs=FEATURES, **fields)  # type: ignore[arg-type]


def test_only_the_declared_outputs_are_run_and_a_zipmap_beside_them_is_named(tmp_path: Path) -> None:
    engine = OnnxRuntimeEngine.load(model_file(tmp_path / "t.onnx", zoo.tabular(), outputs=(LABEL,), max_batch_size=8))
    try:
        assert engine.outputs == (LABEL,)  # the engine's view: every tensor output
        assert engine.unservable == {"probabilities": "seq(map(int64,tensor(float)))"}
        out = engine.run({"features": np.ones((3, 4), np.float32)})
        assert list(out) == ["label"] and out["label"].shape == (3,) and out["label"].dtype == np.int64
    finally:
        engine.close()


def test_without_declared_outputs_every_tensor_output_is_returned(tmp_path: Path) -> None:
    engine = OnnxRuntimeEngine.load(model_file(tmp_path / "c.onnx", zoo.cnn()))
    try:
        out = engine.run({"image": np.zeros((2, 3, 32, 32), np.float32)})
        assert list(out) == ["probabilities"] and out["probabilities"].shape == (2, 10)
    finally:
        engine.close()


def test_an_input_that_is_not_a_tensor_is_refused(tmp_path: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("SequenceLength", ["xs"], ["n"])],
        "seq",
        [helper.make_tensor_sequence_value_info("xs", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("n", TensorProto.INT64, [])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    with pytest.raises(PackageError, match=r"m:1: input 'xs' \(seq\(tensor\(float\)\)\) is not a tensor"):
        OnnxRuntimeEngine.load(model_file(tmp_path / "s.onnx", model.SerializeToString()))


def test_no_engine_module_imports_the_model_package_code() -> None:
    # The engines <-> models import cycle: engines take a ModelFile; models/ builds one from a package.
    for path in Path(edge_runtime.engines.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text())
        imported = {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert not [m for m in imported if m.startswith("edge_runtime.models")], path.name
