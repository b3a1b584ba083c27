"""The in-process inference API over real ONNX Runtime sessions: serving, validation, switching versions."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from structlog.testing import capture_logs

from edge_runtime import InferRequest, ModelRepository
from edge_runtime.config import AgentConfig, InferencePolicy
from edge_runtime.errors import (
    EngineError,
    InvalidInput,
    ModelNotFound,
    ModelNotReady,
    PackageError,
    RequestTooLarge,
    ShuttingDown,
)
from edge_runtime.models.package import MANIFEST_FILE, MODEL_FILE, write_package
from edge_runtime.models.served import ModelState
from models.build import digits_holdout
from tests.waiting import wait_for

Factory = Callable[..., ModelRepository]


@pytest.fixture
def repo_factory(make_config: Callable[..., AgentConfig]) -> Iterator[Factory]:
    opened: list[ModelRepository] = []

    def open_repo(**sections: Any) -> ModelRepository:
        repo = ModelRepository(make_config(**sections))
        opened.append(repo)
        return repo

    yield open_repo
    for repo in opened:
        repo.close(timeout=5)


@pytest.fixture
def digits(repo_factory: Factory, model_packages: dict[str, Path]) -> ModelRepository:
    repo = repo_factory()
    repo.install(model_packages["digits:1"])
    return repo


def holdout(n: int) -> np.ndarray[Any, Any]:
    return digits_holdout()[0][:n]


def test_answers_match_onnxruntime_run_directly(digits: ModelRepository, model_packages: dict[str, Path]) -> None:
    x, labels = (a[:256] for a in digits_holdout())
    response = digits.infer(InferRequest("digits", {"pixels": x}))
    session = ort.InferenceSession(str(model_packages["digits:1"] / MODEL_FILE))
    (expected,) = session.run(None, {"pixels": x})
    assert response.model_name == "digits" and response.model_version == "1"
    np.testing.assert_allclose(response.outputs["probabilities"], expected, rtol=1e-5, atol=1e-6)
    accuracy = float((response.outputs["probabilities"].argmax(1) == labels).mean())
    assert accuracy > 0.8


def test_several_models_are_served_at_once(digits: ModelRepository, model_packages: dict[str, Path]) -> None:
    digits.install(model_packages["mobilenet-bench:1"])
    image = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    logits = digits.infer(InferRequest("mobilenet-bench", {"input": image})).outputs["logits"]
    assert logits.shape == (1, 1000) and np.isfinite(logits).all()
    assert digits.infer(InferRequest("digits", {"pixels": holdout(2)})).outputs["probabilities"].shape == (
        2,
        10,
    )
    assert {(s.name, s.version, s.active) for s in digits.status()} == {
        ("digits", 1, True),
        ("mobilenet-bench", 1, True),
    }
    assert digits.ready()


def test_only_the_requested_outputs_come_back(digits: ModelRepository) -> None:
    response = digits.infer(InferRequest("digits", {"pixels": holdout(1)}, outputs=("probabilities",), id="r1"))
    assert list(response.outputs) == ["probabilities"] and response.id == "r1"


@pytest.mark.parametrize(
    ("request_", "error", "reason"),
    [
        (InferRequest("nope", {}), ModelNotFound, "unknown model 'nope'"),
        (InferRequest("digits", {}, model_version="7"), ModelNotFound, "version 7 is not loaded"),
        (InferRequest("digits", {}, model_version="one"), InvalidInput, "versions are positive integers"),
        (InferRequest("digits", {}, model_version="\u00b2"), InvalidInput, "versions are positive integers"),
        (InferRequest("digits", {}, model_version="\u0661"), InvalidInput, "versions are positive integers"),
        (InferRequest("digits", {"pixels": np.zeros((1, 64))}), InvalidInput, "convert it with .astype"),
        (InferRequest("digits", {"pixels": np.zeros((1, 63), np.float32)}), InvalidInput, "expects"),
        (InferRequest("digits", {"pixels": np.zeros((64,), np.float32)}), InvalidInput, "rank 2"),
        (InferRequest("digits", {"pixels": np.zeros((0, 64), np.float32)}), InvalidInput, "at least 1"),
        (InferRequest("digits", {"pixels": np.zeros((257, 64), np.float32)}), InvalidInput, "at most 256"),
        (InferRequest("digits", {"pixels": [[0.0] * 64]}), InvalidInput, "must be a numpy array"),
        (InferRequest("digits", {}), InvalidInput, "missing input 'pixels'"),
        (
            InferRequest("digits", {"pixels": np.zeros((1, 64), np.float32), "extra": np.zeros(1)}),
            InvalidInput,
            "unknown input 'extra'",
        ),
        (
            InferRequest("digits", {"pixels": np.zeros((1, 64), np.float32)}, outputs=("logits",)),
            InvalidInput,
            "unknown output 'logits'",
        ),
        (
            InferRequest("digits", {"pixels": np.zeros((1, 64), np.float32)}, priority=3),
            InvalidInput,
            "priority 3 is outside 1..2",
        ),
    ],
)
def test_bad_requests_get_their_own_error(
    digits: ModelRepository, request_: InferRequest, error: type[Exception], reason: str
) -> None:
    with pytest.raises(error, match=reason):
        digits.infer(request_)
    with pytest.raises(error, match=reason):
        digits.submit(request_)
    assert digits.infer(InferRequest("digits", {"pixels": holdout(1)})).outputs  # still serving


def test_an_oversized_request_names_the_limit(repo_factory: Factory, model_packages: dict[str, Path]) -> None:
    repo = repo_factory(server={"max_request_bytes": 4096})
    repo.install(model_packages["digits:1"])
    with pytest.raises(RequestTooLarge, match="limit of 4096 bytes"):
        repo.infer(InferRequest("digits", {"pixels": np.zeros((17, 64), np.float32)}))
    assert repo.model("digits").stats.snapshot().failures == {}  # not an invalid input: a size limit


def test_bad_requests_are_counted_as_failures(digits: ModelRepository) -> None:
    with pytest.raises(InvalidInput):
        digits.infer(InferRequest("digits", {"pixels": np.zeros((1, 2), np.float32)}))
    assert digits.model("digits").stats.snapshot().failures == {"invalid_input": 1}


def test_a_new_version_takes_over_and_queued_requests_finish_on_the_old(
    digits: ModelRepository, model_packages: dict[str, Path]
) -> None:
    x = holdout(1)
    queued = [digits.submit(InferRequest("digits", {"pixels": x}))[1] for _ in range(200)]
    digits.install(model_packages["digits:2"])
    results = [f.result(timeout=30) for f in queued]
    assert {r.model_version for r in results} == {"1"}
    assert digits.infer(InferRequest("digits", {"pixels": x})).model_version == "2"
    assert digits.active_version("digits") == 2
    with pytest.raises(ModelNotFound, match="version 1 is not loaded"):
        digits.infer(InferRequest("digits", {"pixels": x}, model_version="1"))


def test_switching_versions_under_load_drops_no_request(
    digits: ModelRepository, model_packages: dict[str, Path]
) -> None:
    digits.store.install(model_packages["digits:2"])
    x = holdout(1)
    stop = threading.Event()
    seen: list[str] = []
    errors: list[BaseException] = []

    def hammer() -> None:
        while not stop.is_set():
            try:
                seen.append(digits.infer(InferRequest("digits", {"pixels": x})).model_version)
            except BaseException as exc:  # any failure at all is what this test looks for
                errors.append(exc)

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    for version in (2, 1, 2):
        digits.activate("digits", version)
        answered = len(seen)
        # Let the hammering reach the version just activated before switching again.
        wait_for(lambda v=str(version), n=answered: v in seen[n:], what=f"a request served by version {version}")
    stop.set()
    for t in threads:
        t.join(10)
    assert errors == []
    assert {"1", "2"} <= set(seen)


def test_rollback_returns_to_the_previous_version_and_survives_a_restart(
    digits: ModelRepository, model_packages: dict[str, Path], make_config: Callable[..., AgentConfig]
) -> None:
    digits.install(model_packages["digits:2"])
    digits.rollback("digits")
    assert digits.active_version("digits") == 1
    digits.close()
    restarted = ModelRepository.open(make_config())
    try:
        assert restarted.active_version("digits") == 1
        assert restarted.infer(InferRequest("digits", {"pixels": holdout(1)})).model_version == "1"
    finally:
        restarted.close()


def test_rollback_without_a_previous_version_says_so(digits: ModelRepository) -> None:
    with pytest.raises(ModelNotFound, match="no previous version"):
        digits.rollback("digits")


def broken_package(tmp_path: Path, source: Path, payload: bytes | None = None, **manifest_changes: Any) -> Path:
    """A package that verifies (checksum matches) but whose model cannot serve."""
    target = tmp_path / "broken"
    shutil.copytree(source, target)
    import json

    from edge_runtime.models.package import parse_manifest

    m = parse_manifest((target / MANIFEST_FILE).read_bytes())
    data = json.loads((target / MANIFEST_FILE).read_text())
    data.update(manifest_changes)
    inputs = [type(m.inputs[0])(**{**t, "shape": tuple(t["shape"])}) for t in data["inputs"]]
    outputs = [type(m.outputs[0])(**{**t, "shape": tuple(t["shape"])}) for t in data["outputs"]]
    write_package(
        target,
        payload if payload is not None else (target / MODEL_FILE).read_bytes(),
        name=data["name"],
        version=data["version"],
        inputs=inputs,
        outputs=outputs,
        max_batch_size=data["max_batch_size"],
    )
    return target


def test_a_version_that_fails_to_load_is_failed_with_its_reason_and_the_old_one_keeps_serving(
    digits: ModelRepository, model_packages: dict[str, Path], tmp_path: Path
) -> None:
    garbage = broken_package(tmp_path, model_packages["digits:2"], payload=b"this is not an onnx file")
    with pytest.raises(EngineError, match="onnxruntime cannot load"):
        digits.install(garbage)
    failed = [s for s in digits.status() if s.version == 2]
    assert failed and failed[0].state is ModelState.FAILED and "cannot load" in failed[0].reason
    assert digits.infer(InferRequest("digits", {"pixels": holdout(1)})).model_version == "1"
    assert digits.ready()
    with pytest.raises(ModelNotReady, match="failed to load"):
        digits.infer(InferRequest("digits", {"pixels": holdout(1)}, model_version="2"))


def test_a_manifest_that_does_not_describe_its_model_is_refused(
    digits: ModelRepository, model_packages: dict[str, Path], tmp_path: Path
) -> None:
    lying = broken_package(
        tmp_path,
        model_packages["digits:2"],
        inputs=[{"name": "image", "datatype": "FP32", "shape": [-1, 64]}],
    )
    with pytest.raises(PackageError, match=r"manifest inputs \['image'\] do not match the model's \['pixels'\]"):
        digits.install(lying)
    assert digits.active_version("digits") == 1


def test_batching_is_planned_from_a_profile_that_is_cached(
    repo_factory: Factory, model_packages: dict[str, Path]
) -> None:
    with capture_logs() as logs:
        repo = repo_factory()
        repo.install(model_packages["digits:1"])
        served = repo.model("digits")
        assert served.batcher.plan.max_batch_size > 1, served.batcher.plan  # a tiny MLP gains from batching
        assert [p.batch_size for p in served.profile][:2] == [1, 2]
        repo.close()
        again = repo_factory()
        again.load_active()
    assert [e["event"] for e in logs].count("model.profiled") == 1
    assert again.model("digits").profile == served.profile


def test_adaptive_off_uses_the_configured_batch(repo_factory: Factory, model_packages: dict[str, Path]) -> None:
    repo = repo_factory(inference={"adaptive": False, "max_batch_size": 4, "max_queue_delay_ms": 1})
    repo.install(model_packages["digits:1"])
    plan = repo.model("digits").batcher.plan
    assert (plan.max_batch_size, plan.max_queue_delay_s) == (4, 0.001)


def test_a_policy_change_applies_live_without_dropping_requests(digits: ModelRepository) -> None:
    x = holdout(1)
    futures = [digits.submit(InferRequest("digits", {"pixels": x}))[1] for _ in range(100)]
    digits.apply_policy(InferencePolicy(adaptive=False, max_batch_size=2, instances=2, max_queue_depth=1000))
    futures += [digits.submit(InferRequest("digits", {"pixels": x}))[1] for _ in range(5)]
    assert all(f.result(timeout=30).outputs for f in futures)
    batcher = digits.model("digits").batcher
    assert batcher.plan.max_batch_size == 2
    assert max(digits.model("digits").stats.snapshot().batches) <= 32


def test_close_refuses_new_work(digits: ModelRepository) -> None:
    digits.close()
    with pytest.raises(ShuttingDown, match="closed"):
        digits.infer(InferRequest("digits", {"pixels": holdout(1)}))
    assert not digits.ready()
