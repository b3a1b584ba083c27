"""models/build.py: the sample packages build, validate, run in onnxruntime, and rebuild only when stale."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from edge_runtime.models.package import MANIFEST_FILE, MODEL_FILE, ModelPackage, read_package
from models.build import build_all, builder_hash, digits_holdout

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="module")
def built(out: Path) -> dict[str, ModelPackage]:
    """Every sample package, built once for the module."""
    return {p.manifest.ref: p for p in build_all(out)}


def _session(package: ModelPackage) -> ort.InferenceSession:
    return ort.InferenceSession(str(package.model_path), providers=["CPUExecutionProvider"])


def _accuracy(package: ModelPackage) -> float:
    pixels, labels = digits_holdout()
    (probabilities,) = _session(package).run(["probabilities"], {"pixels": pixels})
    return float(np.mean(np.argmax(probabilities, axis=1) == labels))


def test_build_all_writes_every_package_in_its_directory(out: Path, built: dict[str, ModelPackage]) -> None:
    assert sorted(built) == [*["digits:1", "digits:2", "digits:3", "digits:4", "digits:5"], "mobilenet-bench:1"]
    for ref, package in built.items():
        name, version = ref.split(":")
        assert package.directory == out / name / version
        assert read_package(package.directory, verify=True).manifest == package.manifest
        assert package.manifest.extra["builder"] == builder_hash()


def test_digits_holdout_is_raw_pixels_with_labels() -> None:
    pixels, labels = digits_holdout()
    assert pixels.dtype == np.float32 and pixels.shape[1] == 64 and pixels.shape[0] == labels.shape[0] > 400
    assert pixels.min() == 0 and pixels.max() == 16
    assert set(labels.tolist()) == set(range(10))


@pytest.mark.parametrize("version", [1, 2])
def test_digits_manifest(built: dict[str, ModelPackage], version: int) -> None:
    manifest = built[f"digits:{version}"].manifest
    assert [(t.name, t.datatype, t.shape) for t in manifest.inputs] == [("pixels", "FP32", (-1, 64))]
    assert [(t.name, t.datatype, t.shape) for t in manifest.outputs] == [("probabilities", "FP32", (-1, 10))]
    assert manifest.max_batch_size == 256
    assert manifest.labels == tuple(str(d) for d in range(10))


def test_digits_v2_is_clearly_more_accurate_than_v1(built: dict[str, ModelPackage]) -> None:
    v1, v2 = _accuracy(built["digits:1"]), _accuracy(built["digits:2"])
    assert 0.75 < v1 < 0.93
    assert v2 > 0.95
    assert v2 - v1 > 0.04
    # The manifest records what onnxruntime measured, not what scikit-learn believed.
    assert built["digits:1"].manifest.extra["holdout_accuracy"] == pytest.approx(v1, abs=1e-4)
    assert built["digits:2"].manifest.extra["holdout_accuracy"] == pytest.approx(v2, abs=1e-4)


@pytest.mark.parametrize("version", [1, 2])
def test_digits_takes_any_batch_size_up_to_the_maximum(built: dict[str, ModelPackage], version: int) -> None:
    session = _session(built[f"digits:{version}"])
    pixels, _ = digits_holdout()
    for n in range(1, 257):
        (probabilities,) = session.run(["probabilities"], {"pixels": pixels[:n]})
        assert probabilities.shape == (n, 10) and probabilities.dtype == np.float32
        np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)


def test_mobilenet_has_mobilenet_v2_parameter_count(built: dict[str, ModelPackage]) -> None:
    model = onnx.load(str(built["mobilenet-bench:1"].model_path))
    parameters = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    assert 3_000_000 < parameters < 4_000_000
    assert built["mobilenet-bench:1"].manifest.extra["parameters"] == parameters
    assert {n.op_type for n in model.graph.node} >= {"Conv", "Clip", "Add", "GlobalAveragePool", "Gemm"}
    assert any(
        n.op_type == "Conv" and any(a.name == "group" and a.i > 1 for a in n.attribute) for n in model.graph.node
    )


@pytest.mark.parametrize("batch", [1, 2])
def test_mobilenet_runs_with_finite_varied_logits(built: dict[str, ModelPackage], batch: int) -> None:
    manifest = built["mobilenet-bench:1"].manifest
    assert manifest.max_batch_size == 32
    assert manifest.inputs[0].shape == (-1, 3, 224, 224) and manifest.outputs[0].shape == (-1, 1000)
    images = np.random.default_rng(batch).random((batch, 3, 224, 224), dtype=np.float32)
    (logits,) = _session(built["mobilenet-bench:1"]).run(["logits"], {"input": images})
    assert logits.shape == (batch, 1000) and logits.dtype == np.float32
    assert np.all(np.isfinite(logits))
    assert np.all(logits.std(axis=1) > 1e-2)


def test_each_bad_candidate_has_its_fault_and_nothing_else(built: dict[str, ModelPackage]) -> None:
    pixels, _ = digits_holdout()
    (v2,) = _session(built["digits:2"]).run(["probabilities"], {"pixels": pixels})
    (v3,) = _session(built["digits:3"]).run(["probabilities"], {"pixels": pixels})
    assert np.mean(v3.argmax(axis=1) == v2.argmax(axis=1)) < 0.05  # disagrees: a shadow gate stops it
    slow = _session(built["digits:4"])
    (v4,) = slow.run(["probabilities"], {"pixels": pixels})
    assert np.array_equal(v4.argmax(axis=1), v2.argmax(axis=1))  # the same answers as v2, only slower
    assert len(slow.get_inputs()) == 1 and built["digits:4"].manifest.size > 50 * built["digits:2"].manifest.size
    with pytest.raises(Exception, match="NoSuchOp"):  # fails to load: an apply-failure gate stops it
        _session(built["digits:5"])
    for version in (3, 4, 5):
        assert "bad_candidate" in built[f"digits:{version}"].manifest.extra


def test_second_build_is_cached_and_rewrites_nothing(
    out: Path, built: dict[str, ModelPackage], capsys: pytest.CaptureFixture[str]
) -> None:
    files = [p.directory / f for p in built.values() for f in (MODEL_FILE, MANIFEST_FILE)]
    before = {f: f.stat().st_mtime_ns for f in files}
    capsys.readouterr()
    again = build_all(out)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 6 and all(" cached " in line for line in lines), lines
    assert {f: f.stat().st_mtime_ns for f in files} == before
    assert [p.manifest for p in again] == [built[p.manifest.ref].manifest for p in again]


def test_package_from_another_builder_is_rebuilt(
    out: Path, built: dict[str, ModelPackage], capsys: pytest.CaptureFixture[str]
) -> None:
    manifest_path = built["digits:1"].directory / MANIFEST_FILE
    stale = json.loads(manifest_path.read_bytes())
    stale["extra"]["builder"] = "0" * 64
    manifest_path.write_text(json.dumps(stale))
    capsys.readouterr()
    v1, *_ = build_all(out, only=["digits"])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["digits:1", "digits:2", "digits:3", "digits:4", "digits:5"]
    assert [" built " in lines[0], " cached " in lines[1]] == [True, True], lines
    assert read_package(v1.directory, verify=True).manifest.extra["builder"] == builder_hash()


def test_corrupt_model_file_is_rebuilt(out: Path, built: dict[str, ModelPackage]) -> None:
    model = built["digits:2"].model_path
    model.write_bytes(model.read_bytes()[:-1])
    (v2,) = [p for p in build_all(out, only=["digits"]) if p.manifest.version == 2]
    assert read_package(v2.directory, verify=True).manifest.extra["builder"] == builder_hash()


def test_build_all_rejects_an_unknown_name(out: Path) -> None:
    with pytest.raises(ValueError, match="unknown model resnet"):
        build_all(out, only=["resnet"])


def test_cli_rejects_an_unknown_model_with_exit_2(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "models.build", "--out", str(tmp_path), "--only", "resnet"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 2
    assert "invalid choice: 'resnet'" in result.stderr
    assert not any(tmp_path.iterdir())


def test_cli_builds_the_named_model(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "models.build", "--out", str(tmp_path), "--only", "digits"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    built = [line.split()[0] for line in result.stdout.splitlines()]
    assert built == ["digits:1", "digits:2", "digits:3", "digits:4", "digits:5"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digits"]
