"""Each benchmark runs end to end with --quick and writes its JSON; no performance numbers are asserted here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import BENCHMARKS
from bench.__main__ import main

# The targets each benchmark reports (a benchmark that stops reporting one fails here).
TARGETS = {
    "inproc": 2,
    "serving": 4,
    "agent_footprint": 2,
    "outbox_append": 1,
    "uplink_e2e": 1,
    "backlog_drain": 1,
    "telemetry_ingest": 2,
    "control_fanout": 1,
    "download_resume": 1,
    "shadow_overhead": 1,
    "rollout": 1,
    "compression": 2,
}


def test_every_benchmark_has_its_targets_listed() -> None:
    assert set(TARGETS) == set(BENCHMARKS)


@pytest.fixture(scope="module")
def models_dir(model_packages: dict[str, Path]) -> Path:
    return model_packages["digits:2"].parents[1]


@pytest.mark.parametrize("name", BENCHMARKS)
def test_benchmark_runs_and_writes_its_result(name: str, models_dir: Path, tmp_path: Path) -> None:
    assert main(["--models", str(models_dir), "--only", name, "--quick", "--results", str(tmp_path)]) == 0

    result = json.loads((tmp_path / f"{name}.json").read_text())
    assert result["benchmark"] == name
    assert {"date", "seconds", "repetitions", "intra_op_threads", "params", "measurements", "ratios"} <= set(result)
    assert {"cpu_model", "cores", "python", "platform"} <= set(result["machine"])
    assert {"onnxruntime", "numpy", "grpcio", "edgefleet"} <= set(result["versions"])
    assert result["repetitions"] == 1 and result["quick"] is True
    assert result["measurements"] and result["ratios"]
    assert len(result["targets"]) == TARGETS[name]
    for target in result["targets"]:
        assert {"name", "measured", "limit", "unit", "comparison", "how", "reason"} <= set(target)
        assert isinstance(target["met"], bool)


def test_missing_models_dir_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--models", str(tmp_path / "absent"), "--quick", "--results", str(tmp_path)]) == 2
    assert "models.build" in capsys.readouterr().err


def test_the_cloud_store_ingest_micro_benchmark_runs(tmp_path: Path) -> None:
    # Run by hand (see its docstring), so nothing else would notice it stop working.
    from tests.cloud_sync.store.bench_ingest import main as ingest_main

    out = tmp_path / "ingest.json"
    assert ingest_main(["--reps", "1", "--batches", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["machine"]["cores"] >= 1
    assert result["records_per_s"]["sqlite"]["ingest_1_thread"]["median"] > 0
