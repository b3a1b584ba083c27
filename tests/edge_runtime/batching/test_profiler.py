"""The batch-size profile: measured on a real engine, robust to a burst, cached across restarts."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_runtime.batching import profiler
from edge_runtime.batching.policy import ProfilePoint, plan_batching
from edge_runtime.batching.profiler import ProfileCache, profile_engine
from edge_runtime.engines.onnxruntime import OnnxRuntimeEngine
from edge_runtime.inference.tensors import TensorSpec
from edge_runtime.models.package import read_package


def test_a_real_engine_is_profiled_from_batch_one_up(model_packages: dict[str, Path]) -> None:
    engine = OnnxRuntimeEngine.load(read_package(model_packages["digits:1"]).model_file(), intra_op_threads=1)
    try:
        points = profile_engine(engine, cap=8, slo_s=0.0)
    finally:
        engine.close()
    sizes = [p.batch_size for p in points]
    assert sizes == sorted(sizes) and sizes[0] == 1 and set(sizes) <= {1, 2, 4, 8}
    assert all(0 < p.latency_s < 1.0 for p in points)


class _Clock:
    """Stands in for the profiler's time module: advances only when the fake engine runs."""

    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now


class _NoGainEngine:
    """A CNN-on-CPU shape: each row costs 10 ms at any batch size. Its first `burst` runs are 1.5x slower,
    as when another process takes the CPU while the agent starts."""

    inputs = (TensorSpec("x", "FP32", (-1, 4)),)
    outputs = (TensorSpec("y", "FP32", (-1, 4)),)

    def __init__(self, clock: _Clock, burst: int) -> None:
        self.clock = clock
        self.burst = burst
        self.runs = 0

    def run(self, inputs: Mapping[str, np.ndarray[Any, Any]], *, release_memory: bool = False) -> dict[str, Any]:
        rows = len(inputs["x"])
        self.clock.now += 0.010 * rows * (1.5 if self.runs < self.burst else 1.0)
        self.runs += 1
        return {"y": inputs["x"]}


def test_a_burst_while_batch_one_is_timed_does_not_plan_batching(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = _Clock()
    monkeypatch.setattr(profiler, "time", clock)
    engine = _NoGainEngine(clock, burst=7)  # batch 1's warm-up and all its timed runs
    points = profile_engine(engine, cap=32, slo_s=0.0)  # type: ignore[arg-type]
    assert points[0] == ProfilePoint(1, pytest.approx(0.010))  # timed again after the burst
    plan = plan_batching(points, cap=32, configured_delay_s=0.005, slo_s=0.0)
    assert plan.max_batch_size == 1, plan.reason


def test_profiles_survive_a_restart_and_a_damaged_one_is_measured_again(tmp_path: Path) -> None:
    cache = ProfileCache(tmp_path)
    key = ProfileCache.key("ab" * 32, "onnxruntime/CPUExecutionProvider", 1, 32)
    assert key != ProfileCache.key("ab" * 32, "onnxruntime/CPUExecutionProvider", 2, 32)  # threads matter
    points = [ProfilePoint(1, 0.01), ProfilePoint(2, 0.015)]
    cache.store(key, points)
    assert ProfileCache(tmp_path).load(key) == points
    (tmp_path / f"{key}.json").write_bytes(b'{"points": [{"batch_size": 1')
    assert cache.load(key) is None
