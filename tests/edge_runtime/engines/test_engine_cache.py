"""Engine cache keys, profile shapes, TensorRT 10/11 builder flags and the cache files, all without a GPU."""

from __future__ import annotations

import ast
import dataclasses
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from onnx import TensorProto, helper
from structlog.testing import capture_logs

import edge_runtime.engines.tensorrt as trt_backend
from edge_runtime.config import EngineSection
from edge_runtime.engines.engine_cache import (
    BuilderFlags,
    BuildOptions,
    EngineCache,
    EngineCacheKey,
    builder_flags,
    key_for,
    optimal_batch,
    profile_shapes,
    tensorrt_major,
)
from edge_runtime.errors import EngineError
from edge_runtime.inference.tensors import TensorSpec
from edge_runtime.models.package import write_package

SHA = "ab" * 32
GPU = ("Orin", (8, 7))


def _options(**changes: Any) -> BuildOptions:
    shapes = profile_shapes([TensorSpec("x", "FP32", (-1, 3, 8, 8))], 8)
    base = BuildOptions.create(
        tensorrt_major=10, max_batch_size=8, shapes=shapes, flags=builder_flags(10, fp16_requested=False),
        workspace_mib=1024,
    )  # fmt: skip
    return dataclasses.replace(base, **changes)


def _key(**changes: Any) -> str:
    fields: dict[str, Any] = {
        "onnx_sha256": SHA, "tensorrt_version": "10.3.0", "gpu_name": GPU[0], "compute_capability": GPU[1],
        "build_options": _options(),
    }  # fmt: skip
    fields.update(changes)
    return key_for(**fields)


# --- TensorRT versions and builder flags -------------------------------------------------------------


@pytest.mark.parametrize(("text", "major"), [("10.3.0", 10), ("10.3.0.30", 10), (" 11.0.1 ", 11), ("12.1", 12)])
def test_tensorrt_major_reads_the_first_number(text: str, major: int) -> None:
    assert tensorrt_major(text) == major


@pytest.mark.parametrize("text", ["", "ten", "10", "v10.3"])
def test_tensorrt_major_refuses_what_is_not_a_version(text: str) -> None:
    with pytest.raises(EngineError, match="TensorRT version"):
        tensorrt_major(text)


def test_tensorrt_10_without_fp16_opts_in_to_strong_typing() -> None:
    assert builder_flags(10, fp16_requested=False) == BuilderFlags(
        strongly_typed=True, fp16=False, pass_strongly_typed_flag=True
    )


def test_tensorrt_10_honours_fp16_with_a_weakly_typed_network() -> None:
    flags = builder_flags(10, fp16_requested=True)
    assert (flags.fp16, flags.strongly_typed, flags.pass_strongly_typed_flag, flags.ignored) == (
        True, False, False, ""
    )  # fmt: skip


@pytest.mark.parametrize("major", [11, 12])
def test_tensorrt_11_ignores_fp16_and_says_why(major: int) -> None:
    flags = builder_flags(major, fp16_requested=True)
    assert not flags.fp16 and flags.strongly_typed
    # Strong typing is always on from 11 and its creation flag is deprecated: it is not passed.
    assert not flags.pass_strongly_typed_flag
    assert "ignored" in flags.ignored and "strongly typed" in flags.ignored and "ModelOpt" in flags.ignored
    assert builder_flags(major, fp16_requested=False).ignored == ""


def test_tensorrt_older_than_10_is_refused() -> None:
    with pytest.raises(EngineError, match=r"TensorRT 8\.x is not supported"):
        builder_flags(8, fp16_requested=False)


def test_fp16_request_ignored_on_11_does_not_change_the_cache_key() -> None:
    shapes = profile_shapes([TensorSpec("x", "FP32", (-1, 4))], 4)
    keys = {
        key_for(SHA, "11.0.0", *GPU, BuildOptions.create(
            tensorrt_major=11, max_batch_size=4, shapes=shapes, flags=builder_flags(11, fp16_requested=fp16),
            workspace_mib=512,
        ))
        for fp16 in (False, True)
    }  # fmt: skip
    assert len(keys) == 1


# --- Profile shapes ---------------------------------------------------------------------------------


def test_profile_spans_batch_one_to_the_maximum() -> None:
    shapes = profile_shapes([TensorSpec("image", "FP32", (-1, 3, 224, 224)), TensorSpec("k", "INT64", (-1,))], 16)
    assert shapes["image"] == ((1, 3, 224, 224), (optimal_batch(16), 3, 224, 224), (16, 3, 224, 224))
    assert shapes["k"] == ((1,), (optimal_batch(16),), (16,))


def test_opt_batch_is_the_maximum() -> None:
    assert [optimal_batch(n) for n in (1, 8, 32)] == [1, 8, 32]


def test_model_without_batch_axis_gets_its_static_shape() -> None:
    assert profile_shapes([TensorSpec("x", "FP32", (2, 5))], 0) == {"x": ((2, 5), (2, 5), (2, 5))}


def test_dynamic_dimension_besides_batch_is_refused_with_the_input_and_axis() -> None:
    with pytest.raises(EngineError, match=r"'tokens'.*axis \[1\]"):
        profile_shapes([TensorSpec("tokens", "INT64", (-1, -1))], 8)


def test_dynamic_dimension_is_accepted_when_given() -> None:
    shapes = profile_shapes([TensorSpec("tokens", "INT64", (-1, -1, 4))], 8, fixed_dims={"tokens": [-1, 128, 4]})
    assert shapes["tokens"] == ((1, 128, 4), (8, 128, 4), (8, 128, 4))


@pytest.mark.parametrize("given_shape", [[1, 128], [1, 128, 5], [1, 0, 4]])
def test_given_dimensions_must_fit_the_declared_shape(given_shape: list[int]) -> None:
    with pytest.raises(EngineError, match="tokens"):
        profile_shapes([TensorSpec("tokens", "INT64", (-1, -1, 4))], 8, fixed_dims={"tokens": given_shape})


def test_batched_model_needs_a_dynamic_first_axis() -> None:
    with pytest.raises(EngineError, match="batch axis"):
        profile_shapes([TensorSpec("x", "FP32", (1, 4))], 8)


def test_negative_batch_size_is_refused() -> None:
    with pytest.raises(EngineError, match="max_batch_size"):
        profile_shapes([TensorSpec("x", "FP32", (-1, 4))], -1)


@given(
    dims=st.lists(st.integers(1, 64), min_size=0, max_size=4),
    max_batch=st.integers(1, 4096),
)
def test_profile_is_ordered_and_keeps_every_other_dimension(dims: list[int], max_batch: int) -> None:
    (low, opt, high) = profile_shapes([TensorSpec("x", "FP32", (-1, *dims))], max_batch)["x"]
    assert 1 == low[0] <= opt[0] <= high[0] == max_batch
    assert low[1:] == opt[1:] == high[1:] == tuple(dims)


# --- Cache keys ---------------------------------------------------------------------------------------


def test_key_is_stable() -> None:
    assert _key() == _key()
    # Pinned: an accidental change (field order, JSON spacing) would make every device rebuild every engine
    # after an upgrade, minutes each on a Jetson. Change it on purpose only, with CACHE_FORMAT.
    assert _key() == "4d9409485b36198a47c7d909cb36bb7fee9efabad9b76963ecac873c2e577642"


def test_key_changes_with_every_input() -> None:
    variants = {
        "base": _key(),
        "onnx_sha256": _key(onnx_sha256="cd" * 32),
        "tensorrt_version": _key(tensorrt_version="10.3.1"),
        "gpu_name": _key(gpu_name="Orin Nano"),
        "compute_capability": _key(compute_capability=(8, 6)),
    }
    option_changes: dict[str, Any] = {
        "tensorrt_major": 11, "max_batch_size": 4, "fp16": True, "strongly_typed": False,
        "workspace_mib": 2048, "profile": (("x", (1, 3, 8, 8), (4, 3, 8, 8), (8, 3, 8, 8)),),
    }  # fmt: skip
    for name, value in option_changes.items():
        variants[f"build_options.{name}"] = _key(build_options=_options(**{name: value}))
    # Every field is varied, so a field added later cannot be left out of the key unnoticed.
    key_fields = {k for k in variants if k != "base" and "." not in k} | {"build_options"}
    option_fields = {k.split(".", 1)[1] for k in variants if k.startswith("build_options.")}
    assert key_fields == {f.name for f in dataclasses.fields(EngineCacheKey)}
    assert option_fields == {f.name for f in dataclasses.fields(BuildOptions)}
    assert len(set(variants.values())) == len(variants)


def test_key_refuses_a_bad_onnx_digest() -> None:
    with pytest.raises(EngineError, match="onnx_sha256"):
        _key(onnx_sha256="not-a-digest")


def test_key_is_a_hex_digest_usable_as_a_file_name(tmp_path: Path) -> None:
    assert EngineCache(tmp_path).path_for(_key()) == tmp_path / f"{_key()}.plan"


# --- Cache files --------------------------------------------------------------------------------------


def test_store_then_load_round_trips(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path / "nested" / "cache")
    plan = bytes(range(256)) * 100
    path = cache.store(_key(), plan)
    assert path.exists()
    assert cache.load(_key()) == plan
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left behind


def test_load_of_a_missing_entry_is_none(tmp_path: Path) -> None:
    assert EngineCache(tmp_path).load(_key()) is None


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda raw: raw[: len(raw) // 2], id="truncated"),
        pytest.param(lambda raw: raw[:10], id="truncated-header"),
        pytest.param(lambda raw: raw[:-1] + bytes([raw[-1] ^ 0xFF]), id="flipped-byte"),
        pytest.param(lambda raw: b"not an engine", id="foreign-file"),
        pytest.param(lambda raw: b"", id="empty"),
    ],
)
def test_damaged_file_is_a_miss_and_removed(tmp_path: Path, damage: Any) -> None:
    cache = EngineCache(tmp_path)
    path = cache.store(_key(), b"\x01\x02\x03" * 1000)
    path.write_bytes(damage(path.read_bytes()))
    with capture_logs() as logs:
        assert cache.load(_key()) is None
    assert not path.exists()
    assert [e["event"] for e in logs] == ["engine_cache.corrupt"]
    assert logs[0]["path"] == str(path)


def test_failed_store_keeps_the_previous_engine(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path)
    cache.store(_key(), b"old engine")
    with pytest.raises(TypeError):
        cache.store(_key(), object())  # type: ignore[arg-type]
    assert cache.load(_key()) == b"old engine"
    assert len(list(tmp_path.iterdir())) == 1


def test_store_replaces_an_entry(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path)
    cache.store(_key(), b"first")
    cache.store(_key(), b"second")
    assert cache.load(_key()) == b"second"


def test_drop_forgets_an_entry_and_tolerates_a_missing_one(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path)
    cache.store(_key(), b"plan")
    cache.drop(_key())
    assert cache.load(_key()) is None
    cache.drop(_key())


@pytest.mark.parametrize("key", ["../etc/passwd", "AB" * 32, "ab" * 31, ""])
def test_paths_come_only_from_cache_keys(tmp_path: Path, key: str) -> None:
    with pytest.raises(EngineError, match="not an engine cache key"):
        EngineCache(tmp_path).path_for(key)


def test_timing_cache_is_per_tensorrt_version_and_gpu(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path)
    base = cache.timing_cache_path("10.3.0", *GPU)
    assert base == cache.timing_cache_path("10.3.0", *GPU)
    others = {
        cache.timing_cache_path("10.3.1", *GPU),
        cache.timing_cache_path("10.3.0", "Orin Nano", GPU[1]),
        cache.timing_cache_path("10.3.0", GPU[0], (8, 6)),
    }
    assert base not in others and len(others) == 3
    assert base.parent == tmp_path and not base.name.endswith(".plan")


def test_timing_cache_round_trips_and_survives_damage(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path)
    assert cache.load_timing_cache("10.3.0", *GPU) is None
    cache.store_timing_cache("10.3.0", *GPU, b"timings")
    assert cache.load_timing_cache("10.3.0", *GPU) == b"timings"
    path = cache.timing_cache_path("10.3.0", *GPU)
    path.write_bytes(path.read_bytes()[:-2])
    assert cache.load_timing_cache("10.3.0", *GPU) is None


# --- The TensorRT module without TensorRT -----------------------------------------------------------


def _identity_package(directory: Path) -> Any:
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "identity",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    return write_package(
        directory, model.SerializeToString(), name="identity", version=1, max_batch_size=4,
        inputs=[TensorSpec("x", "FP32", (-1, 4))], outputs=[TensorSpec("y", "FP32", (-1, 4))],
    )  # fmt: skip


def test_module_imports_neither_tensorrt_nor_pycuda_at_top_level() -> None:
    tree = ast.parse(Path(trt_backend.__file__).read_text())
    top = [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)]
    names = {a.name for n in top if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module or "" for n in top if isinstance(n, ast.ImportFrom)}
    assert not {n for n in names if n.split(".")[0] in ("tensorrt", "pycuda")}


def test_without_tensorrt_load_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # makes `import tensorrt` fail, as on a CPU box
    package = _identity_package(tmp_path / "pkg")
    with pytest.raises(EngineError, match=r"pip install 'edgefleet\[tensorrt\]'"):
        trt_backend.TensorRTEngine.load(
            package.model_file(), EngineSection(), tmp_path / "cache", max_batch_size=4, instances=1
        )
    assert not (tmp_path / "cache").exists()


def test_without_tensorrt_availability_is_false_with_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    ok, why = trt_backend.tensorrt_available()
    assert not ok
    assert "edgefleet[tensorrt]" in why and "python3-libnvinfer" in why


def test_without_pycuda_availability_is_false_with_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", _FakeModule(__version__="10.3.0"))
    monkeypatch.setitem(sys.modules, "pycuda", None)
    monkeypatch.setitem(sys.modules, "pycuda.driver", None)
    ok, why = trt_backend.tensorrt_available()
    assert not ok and "pycuda" in why and "edgefleet[tensorrt]" in why


class _FakeModule:
    """Stands in for an importable tensorrt whose pycuda companion is missing."""

    def __init__(self, **attrs: Any) -> None:
        self.__dict__.update(attrs)


def test_identity_package_is_a_valid_onnx_model(tmp_path: Path) -> None:
    package = _identity_package(tmp_path)
    onnx.checker.check_model(str(package.model_path))
    assert np.dtype(package.manifest.inputs[0].dtype) == np.float32
