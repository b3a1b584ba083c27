"""Each loaded version's precision: the manifest's lineage when it has one, else read from its ONNX (QDQ or
integer ops: int8; float16 weights: fp16; else fp32), reported in the status, the reported state and
`edge-agent status`; and a bad `extra.uncertainty` fails the load naming the key."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edge_runtime import InferRequest, ModelRepository
from edge_runtime.agent.status import render
from edge_runtime.control.converge import repository_status
from edge_runtime.errors import PackageError
from edge_runtime.inference.hard import HardExamples
from edge_runtime.models.served import onnx_precision
from edgefleet.policy import SamplesPolicy
from edgefleet.proto.edgefleet.v1 import admin_pb2, state_pb2
from models.build import digits_holdout
from tests.edge_runtime.hard_examples.conftest import records, sampled


def int8_of(model: Path, out: Path) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(model), str(out), weight_type=QuantType.QInt8)
    return out


def fp16_graph(path: Path) -> Path:
    weight = numpy_helper.from_array(np.ones((4, 3), np.float16), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [1, 3])],
        [weight],
    )
    onnx.save(helper.make_model(graph), str(path))
    return path


def test_precision_is_read_from_the_onnx(model_packages: dict[str, Path], tmp_path: Path) -> None:
    digits = model_packages["digits:2"] / "model.onnx"
    assert onnx_precision(digits) == "fp32"
    assert onnx_precision(int8_of(digits, tmp_path / "int8.onnx")) == "int8"
    assert onnx_precision(fp16_graph(tmp_path / "fp16.onnx")) == "fp16"
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    assert onnx_precision(tmp_path / "junk.onnx") == ""
    assert onnx_precision(tmp_path / "missing.onnx") == ""


def variant(source: Path, out: Path, version: int, model: Path | None = None, **manifest: Any) -> Path:
    """A copy of the package `source` as another version, with `model` as its ONNX and `manifest` changes."""
    shutil.copytree(source, out)
    data = json.loads((out / "manifest.json").read_text())
    if model is not None:
        shutil.copyfile(model, out / "model.onnx")
    raw = (out / "model.onnx").read_bytes()
    data.update(version=version, sha256=hashlib.sha256(raw).hexdigest(), size=len(raw), **manifest)
    (out / "manifest.json").write_text(json.dumps(data))
    return out


def test_the_status_and_reported_state_carry_each_versions_precision(
    make_repo: Callable[..., ModelRepository],
    model_packages: dict[str, Path],
    tmp_path: Path,
    outbox: Any,
    hard: HardExamples,
) -> None:
    source = model_packages["digits:2"]
    parent = json.loads((source / "manifest.json").read_text())["sha256"]
    int8 = variant(source, tmp_path / "v6", 6, int8_of(source / "model.onnx", tmp_path / "q.onnx"))
    lineage = {"parent": {"name": "digits", "version": 2, "sha256": parent}, "method": "fp16"}
    declared = variant(source, tmp_path / "v7", 7, lineage=lineage)  # fp32 bytes, but its lineage says fp16
    repo = make_repo()
    repo.install(source)
    repo.install(int8, activate=False)
    repo.install(declared, activate=False)
    repo.prepare("digits", 6)
    repo.prepare("digits", 7)
    assert {s.version: s.precision for s in repo.status()} == {2: "fp32", 6: "int8", 7: "fp16"}
    assert {repository_status(s).precision for s in repo.status() if s.version == 6} == {"int8"}

    # A hard example names the precision of the version that answered it (top1 < 1: every answer is hard).
    hard.apply(SamplesPolicy(hard_bytes_per_window=1 << 20, measure="top1", threshold=1.0))
    repo.activate("digits", 6)
    repo.infer(InferRequest("digits", {"pixels": np.full((1, 64), 8, np.float32)}))
    (record,) = records(outbox)
    assert (record.version, sampled(record).precision) == (6, "int8")


def test_edge_agent_status_shows_the_precision_of_what_converges() -> None:
    status = admin_pb2.AgentStatus(
        converging=[
            state_pb2.ModelStatus(
                name="digits",
                version=6,
                role=state_pb2.MODEL_ROLE_SHADOW,
                state=state_pb2.MODEL_STATE_READY,
                progress=1.0,
                precision="int8",
            )
        ]
    )
    lines = render(status).splitlines()
    header = next(line for line in lines if line.startswith("ASSIGNED"))
    row = next(line for line in lines if line.startswith("digits"))
    assert "PRECISION" in header.split() and "int8" in row.split()


@pytest.mark.parametrize(
    ("uncertainty", "error"),
    [
        ({"measure": "gini"}, "extra.uncertainty.measure must be one of margin, top1, entropy"),
        ({"measure": "margin", "threshold": 2}, "extra.uncertainty.threshold must be a number within 0..1"),
        ("margin", "extra.uncertainty must be an object"),
    ],
)
def test_a_bad_uncertainty_in_the_manifest_fails_the_load_naming_the_key(
    uncertainty: Any,
    error: str,
    make_repo: Callable[..., ModelRepository],
    model_packages: dict[str, Path],
    tmp_path: Path,
) -> None:
    source = model_packages["digits:2"]
    extra = {**json.loads((source / "manifest.json").read_text()).get("extra", {}), "uncertainty": uncertainty}
    bad = variant(source, tmp_path / "v8", 8, extra=extra)
    repo = make_repo()
    repo.install(source)
    with pytest.raises(PackageError, match=f"digits:8: {error}"):
        repo.install(bad)
    failed = {s.version: s for s in repo.status()}[8]
    assert failed.state.value == "FAILED" and error in failed.reason
    assert repo.active_version("digits") == 2  # nothing changed


def test_a_manifest_declared_measure_is_used_for_its_model(
    make_repo: Callable[..., ModelRepository], model_packages: dict[str, Path], tmp_path: Path, outbox: Any
) -> None:
    source = model_packages["digits:1"]
    extra = {"uncertainty": {"measure": "entropy", "threshold": 0.3}}
    declared = variant(source, tmp_path / "v9", 9, extra=extra)
    repo = make_repo()
    repo.install(declared)
    repo.infer(InferRequest("digits", {"pixels": digits_holdout()[0][:64]}))
    (record,) = records(outbox)
    assert sampled(record).measure == "entropy" and sampled(record).score > 0.3


def test_loading_a_model_does_not_import_the_onnx_package(model_packages: dict[str, Path], tmp_path: Path) -> None:
    # onnx costs every agent 9+ MiB of resident memory (the agent's budget is 150 MiB with a CNN): precision is
    # read through edgefleet.v1.OnnxModel instead. A process of its own: this one imported onnx long ago.
    script = f"""
import sys
from pathlib import Path
from edge_runtime.config import AgentConfig, config_from_dict
from edge_runtime.models.repository import ModelRepository
off = {{key: "" for key in ("unix_socket", "tcp_address", "http_unix_socket", "http_tcp_address", "metrics_address")}}
config = config_from_dict(AgentConfig, {{"agent": {{"data_dir": {str(tmp_path)!r}}}, "server": off}})
repo = ModelRepository(config)
served = repo.install(Path({str(model_packages["digits:2"])!r}))
print(repo.model("digits").precision, "onnx" in sys.modules)
repo.close()
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-2:] == ["fp32", "False"]
