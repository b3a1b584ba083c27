"""Shadow evaluation over real ONNX Runtime sessions: mirroring off the critical path, the comparison rules,
the counts in telemetry, and the converger setting and clearing a shadow from the desired state."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_runtime import InferRequest, ModelRepository
from edge_runtime.config import AgentConfig
from edge_runtime.errors import InvalidInput, ModelNotFound, PackageError
from edge_runtime.inference.tensors import TensorSpec
from edge_runtime.models.package import ModelManifest
from edge_runtime.models.shadow import (
    DEFAULT_TOLERANCE,
    MERGE_ROWS,
    Comparator,
    ShadowCounts,
    Tolerance,
    tolerance_of,
)
from edge_runtime.telemetry import TelemetryCollector
from edgefleet.proto.edgefleet.v1.state_pb2 import (
    MODEL_ROLE_ACTIVE,
    MODEL_ROLE_SHADOW,
    MODEL_STATE_ACTIVE,
    MODEL_STATE_READY,
    DesiredState,
    ModelAssignment,
)
from models.build import digits_holdout
from tests.edge_runtime.control.test_converge import (  # noqa: F401  (fixtures)
    DEVICE,
    Harness,
    artifacts,
    harness,
    sha,
    signer,
)
from tests.waiting import wait_for

Array = np.ndarray[Any, Any]


# -- the comparison rules (pure) --------------------------------------------------------------------------------


def manifest(
    outputs: tuple[TensorSpec, ...], *, labels: tuple[str, ...] = (), batch: int = 8, **extra: Any
) -> ModelManifest:
    return ModelManifest(
        name="m",
        version=2,
        inputs=(TensorSpec("x", "FP32", (-1, 4)),),
        outputs=outputs,
        sha256="0" * 64,
        size=1,
        max_batch_size=batch,
        labels=labels,
        extra=extra,
    )


def test_a_classifier_is_compared_by_top_1_per_row() -> None:
    c = Comparator(manifest((TensorSpec("p", "FP32", (-1, 3)),), labels=("a", "b", "c")))
    a = np.array([[0.1, 0.8, 0.1], [0.6, 0.3, 0.1], [0.2, 0.2, 0.6]], np.float32)
    b = np.array([[0.0, 0.9, 0.1], [0.1, 0.8, 0.1], [0.1, 0.1, 0.8]], np.float32)  # row 1's top-1 differs
    assert c.rule == "top-1 of p"
    assert c.compare({"p": a}, {"p": b}) == (3, 2)


def test_a_single_output_whose_last_axis_is_classes_is_a_classifier_without_labels() -> None:
    c = Comparator(manifest((TensorSpec("logits", "FP32", (-1, 5)),)))
    a = np.eye(5, dtype=np.float32)
    assert c.compare({"logits": a}, {"logits": a * 3 + 0.1}) == (5, 5)  # far apart, same top-1


def test_other_models_are_compared_elementwise_within_the_manifest_tolerance() -> None:
    outputs = (TensorSpec("y", "FP32", (-1, 2)), TensorSpec("z", "FP32", (-1, 1)))
    a = {"y": np.array([[1.0, 2.0], [3.0, 4.0]], np.float32), "z": np.array([[0.0], [1.0]], np.float32)}
    close = {"y": a["y"] * (1 + 5e-4), "z": a["z"]}
    far = {"y": a["y"], "z": np.array([[0.0], [1.1]], np.float32)}
    default = Comparator(manifest(outputs))
    assert default.tolerance == DEFAULT_TOLERANCE and default.classes_output is None
    assert default.compare(a, close) == (2, 2)
    assert default.compare(a, far) == (2, 1)  # row 1's z is off: the row disagrees
    loose = Comparator(manifest(outputs, shadow_tolerance={"atol": 0.2}))
    assert loose.tolerance == Tolerance(rtol=1e-3, atol=0.2) and loose.compare(a, far) == (2, 2)


def test_a_missing_output_or_another_shape_disagrees_on_every_row() -> None:
    c = Comparator(manifest((TensorSpec("y", "FP32", (-1, 2)), TensorSpec("z", "FP32", (-1, 2)))))
    a = {"y": np.zeros((3, 2), np.float32), "z": np.zeros((3, 2), np.float32)}
    assert c.compare(a, {"y": a["y"]}) == (3, 0)
    assert c.compare(a, {"y": np.zeros((3, 3), np.float32), "z": a["z"]}) == (3, 0)


def test_a_model_without_a_batch_axis_counts_one_comparison_a_request() -> None:
    c = Comparator(manifest((TensorSpec("y", "FP32", (4, 2)), TensorSpec("z", "FP32", (1,))), batch=0))
    a = {"y": np.ones((4, 2), np.float32), "z": np.ones(1, np.float32)}
    assert c.compare(a, a) == (1, 1)


@pytest.mark.parametrize(
    ("tolerance", "error"),
    [
        ("tight", "must be an object"),
        ({"rtol": -1}, "rtol must be a finite number >= 0"),
        ({"atol": float("nan")}, "atol must be a finite number >= 0"),
        ({"atol": True}, "atol must be a finite number >= 0"),
        ({"rtol": 1e-3, "slack": 1}, "must be an object"),
    ],
)
def test_a_bad_shadow_tolerance_is_refused_naming_it(tolerance: Any, error: str) -> None:
    with pytest.raises(PackageError, match=error):
        tolerance_of(manifest((TensorSpec("y", "FP32", (-1, 2)),), shadow_tolerance=tolerance))


# -- the repository: mirroring ----------------------------------------------------------------------------------


@pytest.fixture
def repo(make_config: Callable[..., AgentConfig], model_packages: dict[str, Path]) -> Iterator[ModelRepository]:
    r = ModelRepository(make_config())
    r.install(model_packages["digits:1"])
    r.install(model_packages["digits:2"], activate=False)
    r.prepare("digits", 2)
    yield r
    r.close(timeout=5)


def rows(n: int, start: int = 0) -> list[Array]:
    pixels = digits_holdout()[0]
    return [pixels[i : i + 1] for i in range(start, start + n)]


def counts(repo: ModelRepository) -> ShadowCounts:
    return next(c for (name, _), (_, c) in repo.shadow_counts().items() if name == "digits")


def settled(repo: ModelRepository, n: int) -> ShadowCounts:
    """The counts once `n` mirrors were all compared, failed or dropped."""

    def done() -> ShadowCounts | None:
        c = counts(repo)
        return c if c.compared + c.failed + c.dropped >= n else None

    return wait_for(done, 20, f"{n} mirrors settled")


def test_every_answered_request_is_mirrored_at_rate_1_and_the_answers_compared(repo: ModelRepository) -> None:
    x, labels = digits_holdout()
    assert repo.set_shadow("digits", 2, 1.0) == ShadowCounts(2, 1.0)
    answers = [repo.infer(InferRequest("digits", {"pixels": r})) for r in rows(100)]
    assert {a.model_version for a in answers} == {"1"}  # the active version answers; the shadow never does
    c = settled(repo, 100)
    assert (c.mirrored, c.compared, c.failed, c.dropped) == (100, 100, 0, 0)
    v1 = np.array([a.outputs["probabilities"].argmax() for a in answers])
    v2 = repo.infer(InferRequest("digits", {"pixels": x[:100]}, model_version="2")).outputs["probabilities"]
    assert c.agreed == int((v1 == v2.argmax(1)).sum())  # exactly the rows where the two versions' top-1 agree
    assert 50 < c.agreed < 100 and labels is not None
    shadow = repo.model("digits", "2").stats.snapshot()
    # 100 mirrored rows (gathered into runs of up to MERGE_ROWS) + the 100-row request.
    assert shadow.inference_count == 200 and 1 + 100 / MERGE_ROWS <= shadow.success.count <= 101


def test_a_batch_request_counts_one_comparison_per_row(repo: ModelRepository) -> None:
    repo.set_shadow("digits", 2, 1.0)
    repo.infer(InferRequest("digits", {"pixels": digits_holdout()[0][:32]}))
    c = settled(repo, 32)
    assert (c.mirrored, c.compared) == (1, 32)


def test_a_disagreeing_candidate_shows_as_low_agreement(repo: ModelRepository, model_packages: dict[str, Path]) -> None:
    repo.install(model_packages["digits:3"], activate=False)
    repo.prepare("digits", 3)
    repo.set_shadow("digits", 3, 1.0)
    for r in rows(100):
        repo.infer(InferRequest("digits", {"pixels": r}))
    c = settled(repo, 100)
    assert c.compared == 100 and c.agreed < 30


def test_requests_through_submit_are_mirrored_once_answered(repo: ModelRepository) -> None:
    repo.set_shadow("digits", 2, 1.0)
    futures: list[Future[Any]] = [repo.submit(InferRequest("digits", {"pixels": r}))[1] for r in rows(50)]
    assert all(f.result(10).model_version == "1" for f in futures)
    c = settled(repo, 50)
    assert (c.mirrored, c.compared) == (50, 50)


def test_a_sample_rate_mirrors_about_that_share(repo: ModelRepository) -> None:
    repo.set_shadow("digits", 2, 0.25)
    for r in rows(400):
        repo.infer(InferRequest("digits", {"pixels": r}))

    def compared() -> ShadowCounts | None:
        c = counts(repo)
        return c if c.compared == c.mirrored else None

    c = wait_for(compared, 20, "mirrors compared")
    assert 50 <= c.mirrored <= 150  # binomial(400, 0.25): 100 +- 5.8 sigma


def test_requests_naming_the_shadow_or_failing_are_not_mirrored(repo: ModelRepository) -> None:
    repo.set_shadow("digits", 2, 1.0)
    repo.infer(InferRequest("digits", {"pixels": rows(1)[0]}, model_version="2"))
    with pytest.raises(InvalidInput):
        repo.infer(InferRequest("digits", {"pixels": np.zeros((1, 3), np.float32)}))
    assert counts(repo).mirrored == 0


def test_a_slow_shadow_has_mirrors_dropped_never_the_active_requests_slowed(
    make_config: Callable[..., AgentConfig], model_packages: dict[str, Path]
) -> None:
    repo = ModelRepository(make_config(inference={"max_queue_depth": 4}))
    try:
        repo.install(model_packages["digits:1"])
        repo.install(model_packages["digits:4"], activate=False)
        repo.prepare("digits", 4)
        repo.set_shadow("digits", 4, 1.0)
        assert repo._shadows["digits"].max_in_flight == 2
        answers = [repo.infer(InferRequest("digits", {"pixels": r})) for r in rows(300)]
        assert len(answers) == 300 and {a.model_version for a in answers} == {"1"}
        c = settled(repo, 300)
        assert c.dropped > 0 and c.mirrored + c.dropped == 300 and c.failed == 0
        assert c.compared == c.mirrored
        # Dropped before the shadow's queue: no queue_full counted against the candidate.
        assert repo.model("digits", "4").stats.snapshot().fail.count == 0
    finally:
        repo.close(timeout=10)


def test_mirrors_copy_their_inputs_so_a_reused_buffer_does_not_change_them(repo: ModelRepository) -> None:
    repo.set_shadow("digits", 2, 1.0)
    seen = rows(50)
    buffer = seen[0].copy()
    for following in [*seen[1:], np.zeros_like(buffer)]:
        repo.infer(InferRequest("digits", {"pixels": buffer}))
        buffer[:] = following  # the app reuses its buffer as soon as the answer is back
    c = settled(repo, 50)
    x = np.concatenate(seen)
    v1, v2 = (
        repo.infer(InferRequest("digits", {"pixels": x}, model_version=v)).outputs["probabilities"].argmax(1)
        for v in ("1", "2")
    )
    assert (c.compared, c.agreed) == (50, int((v1 == v2).sum()))  # judged on what the active version saw


@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        (("digits", 2, 1.5), InvalidInput, "within 0..1"),
        (("digits", 2, float("nan")), InvalidInput, "within 0..1"),
        (("digits", 1, 0.5), InvalidInput, "cannot shadow itself"),
        (("digits", 7, 0.5), ModelNotFound, "not loaded"),
        (("nope", 1, 0.5), ModelNotFound, "unknown model"),
    ],
)
def test_a_bad_shadow_is_refused_and_changes_nothing(
    repo: ModelRepository, args: tuple[str, int, float], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        repo.set_shadow(*args)
    assert repo.shadow_counts() == {} and repo.shadow_version("digits") is None


def test_setting_the_same_shadow_again_changes_the_rate_and_keeps_the_counts(repo: ModelRepository) -> None:
    repo.set_shadow("digits", 2, 1.0)
    repo.infer(InferRequest("digits", {"pixels": rows(1)[0]}))
    settled(repo, 1)
    assert repo.set_shadow("digits", 2, 0.0).mirrored == 1
    repo.infer(InferRequest("digits", {"pixels": rows(1)[0]}))
    assert dataclasses.astuple(counts(repo))[:3] == (2, 0.0, 1)


def test_clearing_promoting_or_unloading_the_shadow_stops_mirroring(repo: ModelRepository) -> None:
    repo.set_shadow("digits", 2, 1.0)
    final = repo.clear_shadow("digits")
    assert final is not None and final.version == 2 and repo.clear_shadow("digits") is None
    repo.infer(InferRequest("digits", {"pixels": rows(1)[0]}))
    assert repo.shadow_counts() == {} and repo.loaded_versions("digits") == [1, 2]
    repo.set_shadow("digits", 2, 1.0)
    repo.activate("digits", 2)  # promoted: it answers now (and v1 retires)
    assert repo.shadow_version("digits") is None
    repo.prepare("digits", 1)
    repo.set_shadow("digits", 1, 1.0)  # the old version may shadow the new one
    repo.unload("digits", 1)
    assert repo.shadow_version("digits") is None


# -- telemetry ------------------------------------------------------------------------------------------------


def test_telemetry_reports_the_shadow_version_with_its_role_comparisons_and_latency(repo: ModelRepository) -> None:
    collector = TelemetryCollector("cam-1", repo)
    repo.set_shadow("digits", 2, 1.0)
    for r in rows(40):
        repo.infer(InferRequest("digits", {"pixels": r}))
    c = settled(repo, 40)
    first = {(m.name, m.version): m for m in collector.collect().models}
    active, shadow = first[("digits", 1)], first[("digits", 2)]
    assert (active.role, active.requests, active.shadow_compared) == (MODEL_ROLE_ACTIVE, 40, 0)
    assert (shadow.role, shadow.inferences, shadow.errors) == (MODEL_ROLE_SHADOW, 40, 0)
    assert 40 / MERGE_ROWS <= shadow.requests <= 40  # its runs: mirrors are gathered
    assert (shadow.shadow_compared, shadow.shadow_agreed) == (40, c.agreed)
    assert 0 < shadow.latency.p50_ms <= shadow.latency.p99_ms
    again = {(m.name, m.version): m for m in collector.collect().models}[("digits", 2)]
    assert (again.shadow_compared, again.shadow_agreed, again.requests) == (0, 0, 0)  # a window, not a total
    repo.clear_shadow("digits")
    repo.set_shadow("digits", 2, 1.0)  # set anew: its counts start again
    repo.infer(InferRequest("digits", {"pixels": rows(1)[0]}))
    settled(repo, 1)
    third = {(m.name, m.version): m for m in collector.collect().models}[("digits", 2)]
    assert third.shadow_compared == 1


# -- the converger -----------------------------------------------------------------------------------------------


def state(generation: int, *models: ModelAssignment) -> DesiredState:
    return DesiredState(device_id=DEVICE, generation=generation, models=list(models), policy_hash=f"h{generation}")


def test_the_converger_mirrors_to_a_ready_shadow_at_its_rate_and_clears_it_when_it_goes(
    harness: Callable[..., Harness],  # noqa: F811
    model_packages: dict[str, Path],
) -> None:
    h = harness()
    v1 = ModelAssignment(name="digits", version=1, role=MODEL_ROLE_ACTIVE, sha256=sha(model_packages, "digits:1"))
    v2 = ModelAssignment(
        name="digits",
        version=2,
        role=MODEL_ROLE_SHADOW,
        sha256=sha(model_packages, "digits:2"),
        shadow_sample_rate=0.5,
        rollout_id="ro-0123456789",
    )
    h.offer(state(1, v1, v2))
    last = h.wait_report(lambda r: r.converged, "active v1 + shadow v2 converged")
    assert {(m.version, m.role, m.state) for m in last.models} == {
        (1, MODEL_ROLE_ACTIVE, MODEL_STATE_ACTIVE),
        (2, MODEL_ROLE_SHADOW, MODEL_STATE_READY),
    }
    assert h.repository.shadow_version("digits") == 2 and counts(h.repository).sample_rate == 0.5
    v2.shadow_sample_rate = 1.0  # the same shadow at another rate: no rebuild, the new rate
    h.offer(state(2, v1, v2))
    wait_for(lambda: counts(h.repository).sample_rate == 1.0, 20, "the new rate")
    h.offer(state(3, v1))  # the rollout moved on without it
    h.wait_report(lambda r: r.generation == 3 and r.converged, "shadow gone")
    assert h.repository.shadow_version("digits") is None
    wait_for(lambda: h.repository.loaded_versions("digits") == [1], 20, "v2 unloaded")


def test_the_converger_refuses_a_version_assigned_as_its_own_shadow(
    harness: Callable[..., Harness],  # noqa: F811
    model_packages: dict[str, Path],
) -> None:
    h = harness()
    v1 = ModelAssignment(name="digits", version=1, role=MODEL_ROLE_ACTIVE)
    h.offer(state(1, v1, ModelAssignment(name="digits", version=1, role=MODEL_ROLE_SHADOW)))
    h.wait_report(lambda r: "cannot shadow itself" in r.error, "refused")
    bad_rate = ModelAssignment(name="digits", version=2, role=MODEL_ROLE_SHADOW, shadow_sample_rate=2.0)
    h.offer(state(2, v1, bad_rate))
    h.wait_report(lambda r: "shadow_sample_rate must be within 0..1" in r.error, "refused")
    assert h.converger.generation == 0 and h.repository.shadow_version("digits") is None
