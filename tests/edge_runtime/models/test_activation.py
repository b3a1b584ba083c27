"""A version becomes active only after it loaded, matched its manifest and passed warm-up, on every path;
a broken active version gives way to the previous one at start; warm-up runs at the package's sizes."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from onnx import TensorProto, helper
from structlog.testing import capture_logs

from edge_runtime import InferRequest, ModelRepository
from edge_runtime.config import AgentConfig
from edge_runtime.errors import EngineError, ModelNotReady, PackageError
from edge_runtime.inference.keeping import PRIORITY_EVENT, Keeper
from edge_runtime.inference.tensors import TensorSpec
from edge_runtime.models.package import MODEL_FILE, read_package, write_package
from edge_runtime.models.served import ModelState
from edge_runtime.models.store import ModelStore
from edge_runtime.outbox import Outbox
from edgefleet.proto.edgefleet.v1 import results_pb2
from models.build import digits_holdout
from tests.models import zoo

DIGITS_IN = [TensorSpec("pixels", "FP32", (-1, 64))]
DIGITS_OUT = [TensorSpec("probabilities", "FP32", (-1, 10))]


def garbage_package(directory: Path, name: str = "digits", version: int = 2, payload: bytes = b"not onnx") -> Path:
    """A package whose checksums verify but whose model.onnx is not a model (an old agent installed those)."""
    write_package(
        directory, payload, name=name, version=version, inputs=DIGITS_IN, outputs=DIGITS_OUT, max_batch_size=8
    )
    return directory


@pytest.fixture
def outbox(tmp_path: Path) -> Iterator[Outbox]:
    box = Outbox.open(tmp_path / "outbox.db", max_bytes=1 << 24, max_age_s=0)
    yield box
    box.close()


@pytest.fixture
def repos(make_config: Callable[..., AgentConfig], outbox: Outbox) -> Iterator[Callable[..., ModelRepository]]:
    opened: list[ModelRepository] = []

    def open_repo(**sections: Any) -> ModelRepository:
        repo = ModelRepository(make_config(**sections), keeper=Keeper(outbox))
        opened.append(repo)
        return repo

    yield open_repo
    for repo in opened:
        repo.close(timeout=5)


def events(outbox: Outbox) -> list[tuple[str, int, dict[str, Any]]]:
    import json

    outbox.flush().result(timeout=10)
    found = []
    for record in outbox.read_batch(100, 1 << 20).records:
        if record.kind == results_pb2.RECORD_KIND_EVENT:
            assert record.priority == PRIORITY_EVENT
            event = results_pb2.DeviceEvent.FromString(record.payload)
            found.append((event.event, event.version, json.loads(event.detail_json)))
    return found


def broken_upgrade(store: ModelStore, model_packages: dict[str, Path], tmp_path: Path) -> None:
    """digits 1 active, then a version 2 that cannot load made active by writing the store directly."""
    store.install(model_packages["digits:1"])
    store.set_active("digits", 1)
    store.install(garbage_package(tmp_path / "v2"))
    store.set_active("digits", 2)


def test_an_active_version_that_fails_at_start_gives_way_to_the_previous_and_says_so(
    repos: Callable[..., ModelRepository], model_packages: dict[str, Path], tmp_path: Path, outbox: Outbox
) -> None:
    repo = repos()
    broken_upgrade(repo.store, model_packages, tmp_path)
    with capture_logs() as logs:
        statuses = repo.load_active()
    assert repo.active_version("digits") == 1
    response = repo.infer(InferRequest("digits", {"pixels": digits_holdout()[0][:2]}))
    assert response.model_version == "1" and response.outputs["probabilities"].shape == (2, 10)
    serving, failed = statuses
    assert (failed.version, failed.state, failed.active) == (2, ModelState.FAILED, False)
    assert "onnxruntime cannot load the model" in failed.reason
    assert (serving.version, serving.state, serving.active) == (1, ModelState.READY, True)
    assert serving.reason.startswith("active version 2 failed: digits:2: onnxruntime cannot load the model")
    assert serving.reason.endswith("; serving version 1")
    fallback = [e for e in logs if e["event"] == "model.fallback"]
    assert [(e["version"], e["serving"]) for e in fallback] == [(2, 1)]
    assert [(name, version) for name, version, _ in events(outbox)] == [("model.failed", 2), ("model.fallback", 2)]
    assert repo.ready()  # a version serves the model
    with pytest.raises(ModelNotReady, match="version 2 failed to load: digits:2: onnxruntime cannot load"):
        repo.model("digits", "2")
    pointer = repo.store.active("digits")
    assert pointer is not None and (pointer.version, pointer.previous) == (2, 1)  # the operator's choice stays


def test_without_a_previous_version_a_failed_model_answers_unavailable_with_its_reason(
    repos: Callable[..., ModelRepository], tmp_path: Path
) -> None:
    repo = repos()
    repo.store.install(garbage_package(tmp_path / "v1", version=1))
    repo.store.set_active("digits", 1)
    (status,) = repo.load_active()
    assert status.state is ModelState.FAILED
    request = InferRequest("digits", {"pixels": digits_holdout()[0][:1]})
    # Caught a bug: this was ModelNotFound "version None is not loaded (loaded: [])".
    with pytest.raises(ModelNotReady, match="model digits version 1 failed to load: .*onnxruntime cannot load"):
        repo.infer(request)
    with pytest.raises(ModelNotReady, match="failed to load"):
        repo.model("digits")
    assert not repo.ready()  # strict: a model that should be served serves nothing


def test_readiness_is_strict_by_default_and_can_be_relaxed(
    repos: Callable[..., ModelRepository], model_packages: dict[str, Path], tmp_path: Path
) -> None:
    for strict in (True, False):
        repo = repos(server={"strict_readiness": strict}, agent={"data_dir": str(tmp_path / f"data-{strict}")})
        repo.install(model_packages["digits:1"])
        repo.store.install(garbage_package(tmp_path / f"broken-{strict}", name="broken", version=1))
        repo.store.set_active("broken", 1)
        repo.load_active()
        assert repo.ready() is not strict, strict
        assert repo.infer(InferRequest("digits", {"pixels": digits_holdout()[0][:1]})).outputs
        repo.close()
        assert not repo.ready()  # closed is never ready


def test_an_agent_starting_up_is_not_ready_before_its_store_was_loaded(
    repos: Callable[..., ModelRepository], model_packages: dict[str, Path]
) -> None:
    # The agent listens before it reads the store (a TensorRT build may take minutes): until load_active has
    # run, no model is wanted yet, and a strict ServerReady answered true with nothing loaded (caught by a
    # test that found no model right after the agent said it was ready).
    first = repos()
    first.install(model_packages["digits:1"])
    first.close()
    repo = repos()
    repo.expect_load()
    assert not repo.ready()
    (status,) = repo.load_active()
    assert status.active and repo.ready()


def test_a_broken_upgrade_never_becomes_active_and_a_restart_serves_the_old_version(
    repos: Callable[..., ModelRepository], model_packages: dict[str, Path], tmp_path: Path, outbox: Outbox
) -> None:
    repo = repos()
    repo.install(model_packages["digits:1"])
    with pytest.raises(EngineError, match="onnxruntime cannot load"):
        repo.install(garbage_package(tmp_path / "v2"))
    pointer = repo.store.active("digits")
    assert pointer is not None and pointer.version == 1
    repo.close()
    again = repos()
    (status,) = again.load_active()
    assert (status.version, status.active, status.reason) == (1, True, "")
    assert [(n, v) for n, v, _ in events(outbox)] == [
        ("model.activated", 1),
        ("model.failed", 2),
        ("model.activated", 1),
    ]


def test_activations_are_kept_as_events_with_the_version_they_replace(
    repos: Callable[..., ModelRepository], model_packages: dict[str, Path], outbox: Outbox
) -> None:
    repo = repos()
    repo.install(model_packages["digits:1"])
    repo.install(model_packages["digits:2"])
    assert events(outbox) == [("model.activated", 1, {"previous": None}), ("model.activated", 2, {"previous": 1})]


def test_warm_up_and_batch_profiling_run_at_the_package_shapes(
    repos: Callable[..., ModelRepository], zoo_packages: dict[str, Path]
) -> None:
    repo = repos()
    with capture_logs() as logs:
        repo.install(zoo_packages["detector"])
    served = repo.model("detector")
    # At the 1x1 a guess would use the detector cannot run at all, so a profile proves the real size.
    assert [p.batch_size for p in served.profile][:2] == [1, 2]
    (ready,) = [e for e in logs if e["event"] == "model.ready"]
    assert ready["warmup"] == "generated at the package's shapes"
    assert served.notes == ()


def _without_warmup(source: Path, target: Path) -> Path:
    package = read_package(source)
    m = package.manifest
    write_package(
        target,
        (source / MODEL_FILE).read_bytes(),
        name=m.name,
        version=m.version,
        inputs=list(m.inputs),
        outputs=list(m.outputs),
        max_batch_size=m.max_batch_size,
    )
    return target


def test_a_detector_without_warm_up_data_fails_warm_up_saying_what_to_add(
    repos: Callable[..., ModelRepository], zoo_packages: dict[str, Path], tmp_path: Path
) -> None:
    repo = repos()
    bare = _without_warmup(zoo_packages["detector"], tmp_path / "detector")
    with pytest.raises(EngineError, match=r"warm-up failed on inputs \{'images': \[1, 3, 1, 1\]\}") as info:
        repo.install(bare)
    assert "the sizes of 'images' axes [2, 3] were guessed (1)" in str(info.value)
    assert "--warmup-inputs or --shape" in str(info.value)
    (status,) = repo.status()
    assert status.state is ModelState.FAILED and "SpaceToDepth" in status.reason


def test_a_model_warmed_up_on_guessed_sizes_is_not_profiled_and_says_so(
    repos: Callable[..., ModelRepository], zoo_packages: dict[str, Path], tmp_path: Path
) -> None:
    repo = repos(inference={"max_batch_size": 8})
    with capture_logs() as logs:
        repo.install(_without_warmup(zoo_packages["encoder"], tmp_path / "encoder"))
    served = repo.model("encoder")
    assert served.profile == []
    assert served.batcher.plan.max_batch_size == 8 and served.batcher.plan.reason == "configured (no profile)"
    (status,) = repo.status()
    assert status.state is ModelState.READY and status.active
    assert "warm-up guessed size 1 for 'input_ids' axes [1], 'attention_mask' axes [1]" in status.reason
    assert "batch size not profiled" in status.reason
    assert [e["event"] for e in logs].count("model.warmup_guessed") == 1
    assert "model.profiled" not in [e["event"] for e in logs]


def test_a_manifest_declaring_a_non_tensor_output_is_refused(
    repos: Callable[..., ModelRepository], tmp_path: Path
) -> None:
    write_package(
        tmp_path / "tabular",
        zoo.tabular(),
        name="tabular",
        version=1,
        inputs=[TensorSpec("features", "FP32", (-1, 4))],
        outputs=[TensorSpec("label", "INT64", (-1,)), TensorSpec("probabilities", "FP32", (-1, 3))],
        max_batch_size=8,
    )
    with pytest.raises(
        PackageError, match=r"output 'probabilities' is seq\(map\(int64,tensor\(float\)\)\) in the model"
    ):
        repos().install(tmp_path / "tabular")


def _unranked_identity() -> bytes:
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "identity",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


@pytest.mark.parametrize(
    ("output", "reason"),
    [
        ((-1, 4), ""),
        ((-1, 4, 1), r"warm-up output 'y' has shape \[1, 4\], the manifest declares \[-1, 4, 1\]"),
        ((-1, 5), r"warm-up output 'y' has shape \[1, 4\], the manifest declares \[-1, 5\]"),
    ],
)
def test_warm_up_checks_outputs_whose_rank_the_file_does_not_declare(
    repos: Callable[..., ModelRepository], tmp_path: Path, output: tuple[int, ...], reason: str
) -> None:
    write_package(
        tmp_path / "identity",
        _unranked_identity(),
        name="identity",
        version=1,
        inputs=[TensorSpec("x", "FP32", (-1, 4))],
        outputs=[TensorSpec("y", "FP32", output)],
        max_batch_size=4,
    )
    repo = repos()
    if not reason:
        repo.install(tmp_path / "identity")
        x = np.arange(8, dtype=np.float32).reshape(2, 4)
        np.testing.assert_array_equal(repo.infer(InferRequest("identity", {"x": x})).outputs["y"], x)
        return
    with pytest.raises(EngineError, match=reason):
        repo.install(tmp_path / "identity")
