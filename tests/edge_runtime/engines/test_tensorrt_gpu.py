"""The TensorRT backend on a real GPU: build from ONNX, agree with ONNX Runtime, engine cache, threads."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from structlog.testing import capture_logs

from edge_runtime.config import EngineSection
from edge_runtime.engines.engine_cache import EngineCache, tensorrt_major
from edge_runtime.engines.tensorrt import TensorRTEngine, tensorrt_available
from edge_runtime.errors import EngineError
from edge_runtime.inference.tensors import TensorSpec
from edge_runtime.models.package import ModelPackage, write_package

pytestmark = pytest.mark.gpu
trt = pytest.importorskip("tensorrt")
pytest.importorskip("pycuda.driver")
_available, _why = tensorrt_available()
if not _available:
    pytest.skip(_why, allow_module_level=True)

MAX_BATCH, IN, OUT = 8, 16, 8
# FP32 on GPUs with TF32 (Ampere and later, Orin included) rounds matmul inputs to 10-bit mantissas.
RTOL = ATOL = 1e-2
Reference = Callable[[np.ndarray[Any, Any]], np.ndarray[Any, Any]]


def _write_model(directory: Path, nodes: list[Any], initializers: list[Any], opsets: list[Any]) -> ModelPackage:
    graph = helper.make_graph(
        nodes, "model",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", IN])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", OUT])],
        initializer=initializers,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8  # what the ONNX parser of TensorRT 10.0 already reads
    return write_package(
        directory, model.SerializeToString(), name="matmul-relu", version=1, max_batch_size=MAX_BATCH,
        inputs=[TensorSpec("x", "FP32", (-1, IN))], outputs=[TensorSpec("y", "FP32", (-1, OUT))],
    )  # fmt: skip


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> ModelPackage:
    """y = relu(x @ w + b) with a dynamic batch axis."""
    rng = np.random.default_rng(7)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["xw"]),
        helper.make_node("Add", ["xw", "b"], ["z"]),
        helper.make_node("Relu", ["z"], ["y"]),
    ]
    weights = [
        numpy_helper.from_array(rng.standard_normal((IN, OUT)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.standard_normal(OUT).astype(np.float32), "b"),
    ]
    return _write_model(tmp_path_factory.mktemp("package"), nodes, weights, [helper.make_opsetid("", 17)])


@pytest.fixture(scope="module")
def reference(package: ModelPackage) -> Reference:
    session = ort.InferenceSession(str(package.model_path), providers=["CPUExecutionProvider"])
    return lambda x: session.run(["y"], {"x": x})[0]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("engine-cache")


@pytest.fixture(scope="module")
def engine(package: ModelPackage, cache_dir: Path) -> Iterator[TensorRTEngine]:
    # Fewer slots than the concurrency test's threads, so callers also wait for a free slot.
    loaded = TensorRTEngine.load(
        package.model_file(), EngineSection(), cache_dir, max_batch_size=MAX_BATCH, instances=2
    )
    yield loaded
    loaded.close()


def _load(package: ModelPackage, cache_dir: Path, **kwargs: Any) -> TensorRTEngine:
    config = kwargs.pop("config", EngineSection())
    return TensorRTEngine.load(package.model_file(), config, cache_dir, max_batch_size=MAX_BATCH, instances=1, **kwargs)


def _events(logs: Sequence[Mapping[str, Any]]) -> list[str]:
    return [str(e["event"]) for e in logs]


def _batch(rng: np.random.Generator, size: int) -> np.ndarray[Any, Any]:
    return rng.standard_normal((size, IN)).astype(np.float32)


@pytest.mark.parametrize("size", [1, 3, MAX_BATCH])
def test_outputs_match_onnxruntime(engine: TensorRTEngine, reference: Reference, size: int) -> None:
    x = _batch(np.random.default_rng(size), size)
    out = engine.run({"x": x})
    assert list(out) == ["y"]
    assert out["y"].shape == (size, OUT) and out["y"].dtype == np.float32
    np.testing.assert_allclose(out["y"], reference(x), rtol=RTOL, atol=ATOL)


def test_engine_describes_itself(engine: TensorRTEngine) -> None:
    assert (engine.info.backend, engine.info.platform) == ("tensorrt", "tensorrt_plan")
    assert engine.info.detail.startswith(f"TensorRT {trt.__version__} on ") and " sm_" in engine.info.detail
    assert engine.inputs == (TensorSpec("x", "FP32", (-1, IN)),)
    assert engine.outputs == (TensorSpec("y", "FP32", (-1, OUT)),)


def test_concurrent_runs_from_four_threads(engine: TensorRTEngine, reference: Reference) -> None:
    def work(seed: int) -> int:
        rng = np.random.default_rng(seed)
        for _ in range(25):
            x = _batch(rng, int(rng.integers(1, MAX_BATCH + 1)))
            np.testing.assert_allclose(engine.run({"x": x})["y"], reference(x), rtol=RTOL, atol=ATOL)
        return seed

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        assert sorted(pool.map(work, range(4))) == [0, 1, 2, 3]


def test_bad_batches_are_engine_errors(engine: TensorRTEngine, reference: Reference) -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(EngineError, match="outside what the engine was built for"):
        engine.run({"x": _batch(rng, MAX_BATCH + 1)})
    with pytest.raises(EngineError, match="float64"):
        engine.run({"x": _batch(rng, 2).astype(np.float64)})
    with pytest.raises(EngineError, match="missing"):
        engine.run({})
    x = _batch(rng, 2)  # the slot that saw those failures still serves
    np.testing.assert_allclose(engine.run({"x": x})["y"], reference(x), rtol=RTOL, atol=ATOL)


def test_second_load_hits_the_cache(package: ModelPackage, tmp_path: Path, reference: Reference) -> None:
    progress: list[tuple[str, float]] = []
    with capture_logs() as first:
        _load(package, tmp_path, progress=lambda phase, fraction: progress.append((phase, fraction))).close()
    assert "engine.built" in _events(first)
    assert progress[0] == ("building", 0.0) and progress[-1] == ("building", 1.0)
    fractions = [f for _, f in progress]
    assert fractions == sorted(fractions)
    assert len(list(tmp_path.glob("*.plan"))) == 1 and len(list(tmp_path.glob("timing-*.cache"))) == 1

    with capture_logs() as second:
        again = _load(package, tmp_path)
    try:
        assert "engine.built" not in _events(second)
        assert [e["source"] for e in second if e["event"] == "engine.loaded"] == ["cache"]
        x = _batch(np.random.default_rng(1), 4)
        np.testing.assert_allclose(again.run({"x": x})["y"], reference(x), rtol=RTOL, atol=ATOL)
    finally:
        again.close()


def test_corrupted_cache_file_is_rebuilt(package: ModelPackage, tmp_path: Path, reference: Reference) -> None:
    _load(package, tmp_path).close()
    (plan,) = tmp_path.glob("*.plan")
    raw = bytearray(plan.read_bytes())
    raw[len(raw) // 2 : len(raw) // 2 + 64] = bytes(64)
    plan.write_bytes(bytes(raw[:-100]))
    with capture_logs() as logs:
        rebuilt = _load(package, tmp_path)
    try:
        assert {"engine_cache.corrupt", "engine.built"} <= set(_events(logs))
        x = _batch(np.random.default_rng(2), 5)
        np.testing.assert_allclose(rebuilt.run({"x": x})["y"], reference(x), rtol=RTOL, atol=ATOL)
    finally:
        rebuilt.close()


def test_plan_that_will_not_deserialize_is_rebuilt(package: ModelPackage, tmp_path: Path) -> None:
    _load(package, tmp_path).close()
    (plan,) = tmp_path.glob("*.plan")
    EngineCache(tmp_path).store(plan.stem, b"intact file, but not a TensorRT plan")
    with capture_logs() as logs:
        _load(package, tmp_path).close()
    events = _events(logs)
    assert "engine.cache_dropped" in events and "engine.built" in events
    assert EngineCache(tmp_path).load(plan.stem) not in (None, b"intact file, but not a TensorRT plan")


def test_fp16_follows_the_tensorrt_version(package: ModelPackage, tmp_path: Path, reference: Reference) -> None:
    with capture_logs() as logs:
        loaded = _load(package, tmp_path, config=EngineSection(tensorrt_fp16=True))
    try:
        (built,) = [e for e in logs if e["event"] == "engine.built"]
        if tensorrt_major(trt.__version__) == 10:
            assert built["fp16"] is True
            x = _batch(np.random.default_rng(3), 4)
            np.testing.assert_allclose(loaded.run({"x": x})["y"], reference(x), rtol=5e-2, atol=5e-2)
        else:
            assert built["fp16"] is False
            assert "engine.option_ignored" in _events(logs)
    finally:
        loaded.close()


def test_run_after_close_is_an_engine_error(package: ModelPackage, cache_dir: Path) -> None:
    loaded = _load(package, cache_dir)
    loaded.close()
    loaded.close()  # idempotent
    with pytest.raises(EngineError, match="closed"):
        loaded.run({"x": _batch(np.random.default_rng(4), 1)})


def test_parser_errors_are_reported(tmp_path: Path) -> None:
    nodes = [helper.make_node("Mystery", ["x"], ["y"], domain="com.example")]
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)]
    package = _write_model(tmp_path / "package", nodes, [], opsets)
    with pytest.raises(EngineError, match=r"ONNX parser rejected the model: .*Mystery"):
        _load(package, tmp_path / "cache")
    assert not list((tmp_path / "cache").glob("*.plan"))
