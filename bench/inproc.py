"""In-process API at batch 1 with a sequential caller: `ModelRepository.infer` against raw `session.run`.

Targets: mobilenet-bench p50 <= 1.05x raw p50; digits p50 overhead (ours - raw) <= 30 us. The digits run
also times each layer of our path (engine wrapper, batcher, validation), to show where the overhead goes.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from bench._harness import Options, Report, Samples, Target, median
from edge_runtime import InferRequest, ModelRepository
from edge_runtime.config import AgentConfig, config_from_dict

__all__ = ["raw_session", "repository_config", "run"]

Array = np.ndarray[Any, Any]
OVERHEAD_LIMIT_US = 30.0
RATIO_LIMIT = 1.05


def raw_session(model: Path, threads: int) -> ort.InferenceSession:
    """A bare session with the options OnnxRuntimeEngine.load sets (edge_runtime/engines/onnxruntime.py)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(str(model), sess_options=options, providers=["CPUExecutionProvider"])


def repository_config(data_dir: str, threads: int) -> AgentConfig:
    """An in-process ModelRepository's config: no servers, ONNX Runtime with `threads` intra-op threads."""
    return config_from_dict(
        AgentConfig,
        {
            "agent": {"data_dir": data_dir},
            "server": {"unix_socket": "", "tcp_address": "", "metrics_address": ""},
            "engine": {"backend": "onnxruntime", "intra_op_threads": threads},
        },
    )


def _round_robin(n: int, calls: Mapping[str, Callable[[int], object]], run: int) -> dict[str, Samples]:
    """Latency of n sequential calls of each path, alternating runs of `run` calls, the order rotating.

    Fine-grained alternation lets every path see the same load on a shared box, where other processes
    come and go within seconds; runs of a few ms keep each path's caches as warm as in a tight loop.
    """
    clock = time.perf_counter
    names = list(calls)
    out: dict[str, list[float]] = {name: [] for name in names}
    for turn, start in enumerate(range(0, n, run)):
        k = turn % len(names)
        for name in names[k:] + names[:k]:
            call, samples = calls[name], out[name]
            for i in range(start, min(start + run, n)):
                t0 = clock()
                call(i)
                samples.append(clock() - t0)
    return {name: Samples(values) for name, values in out.items()}


def _run_length(name: str) -> int:
    # digits: runs of 100 calls (a few ms); mobilenet-bench: alternate at every call (each is ~10 ms).
    return 100 if name == "digits" else 1


def _inputs(name: str) -> tuple[str, list[Array]]:
    if name == "digits":
        from models.build import digits_holdout

        pixels, _ = digits_holdout()  # real held-out digits, one row per request
        return "pixels", [pixels[i : i + 1] for i in range(len(pixels))]
    rng = np.random.default_rng(0)
    return "input", [rng.random((1, 3, 224, 224), dtype=np.float32) for _ in range(4)]


def _compare(report: Report, repo: ModelRepository, name: str, package: Path, iterations: int) -> dict[str, Any]:
    """Interleaved blocks of ours and raw; per repetition the p50 of each and their paired difference."""
    options = report.options
    input_name, rows = _inputs(name)
    session = raw_session(package / "model.onnx", options.threads)
    output_names = [o.name for o in session.get_outputs()]
    k = len(rows)

    def ours(i: int) -> object:
        return repo.infer(InferRequest(name, {input_name: rows[i % k]}))

    def raw(i: int) -> object:
        return session.run(output_names, {input_name: rows[i % k]})

    check = repo.infer(InferRequest(name, {input_name: rows[0]})).outputs[output_names[0]]
    same = bool(np.allclose(check, raw(0)[0], rtol=1e-5, atol=1e-6))  # type: ignore[index]
    paths = {"ours": ours, "raw": raw}
    run = _run_length(name)
    _round_robin(max(iterations // 10, 3), paths, run)  # warm caches and allocators
    reps = [_round_robin(iterations, paths, run) for _ in range(options.repeat)]
    blocks = {path: [rep[path] for rep in reps] for path in paths}
    ours_p50 = [b.p50 * 1e6 for b in blocks["ours"]]
    raw_p50 = [b.p50 * 1e6 for b in blocks["raw"]]
    result = {
        "iterations_per_block": iterations,
        "outputs_match_raw": same,
        "ours_p50_us": ours_p50,
        "raw_p50_us": raw_p50,
        "ours_blocks": [b.summary() for b in blocks["ours"]],
        "raw_blocks": [b.summary() for b in blocks["raw"]],
        "ours_samples_us": [[round(v * 1e6, 2) for v in b.values] for b in blocks["ours"]],
        "raw_samples_us": [[round(v * 1e6, 2) for v in b.values] for b in blocks["raw"]],
        "paired_overhead_us": [o - r for o, r in zip(ours_p50, raw_p50, strict=True)],
        "paired_ratio": [o / r for o, r in zip(ours_p50, raw_p50, strict=True)],
    }
    report.say(
        f"{name}: p50 ours {median(ours_p50):.1f} us, raw {median(raw_p50):.1f} us "
        f"({options.repeat} x {iterations} calls each, alternating runs of {run}; outputs match raw: {same})"
    )
    return result


def _layers(report: Report, repo: ModelRepository, iterations: int) -> dict[str, float]:
    """p50 of each layer of the digits path, innermost first (alternating like the comparison)."""
    input_name, rows = _inputs("digits")
    served = repo.model("digits")
    session = raw_session(served.package.model_path, report.options.threads)
    output_names = [o.name for o in session.get_outputs()]
    prepared = served.prepare(InferRequest("digits", {input_name: rows[0]}))
    k = len(rows)
    calls: dict[str, Callable[[int], object]] = {
        "raw session.run": lambda i: session.run(output_names, {input_name: rows[i % k]}),
        "engine.run": lambda i: served.engine.run({input_name: rows[i % k]}),
        "batcher.run (prepared request)": lambda i: served.batcher.run(prepared),
        "prepare (validation only)": lambda i: served.prepare(InferRequest("digits", {input_name: rows[i % k]})),
        "repository.infer": lambda i: repo.infer(InferRequest("digits", {input_name: rows[i % k]})),
    }
    reps = [_round_robin(iterations, calls, _run_length("digits")) for _ in range(report.options.repeat)]
    layers = {n: median([rep[n].p50 * 1e6 for rep in reps]) for n in calls}
    report.say("digits layers, p50 us: " + ", ".join(f"{n} {v:.1f}" for n, v in layers.items()))
    return layers


def run(options: Options) -> Report:
    digits_n = options.count(3000, 50)
    mobilenet_n = options.count(120, 3)
    report = Report(
        "inproc",
        options,
        {
            "caller": "one thread, sequential, batch 1",
            "iterations": {"digits": digits_n, "mobilenet-bench": mobilenet_n},
            "raw_baseline": "onnxruntime.InferenceSession.run with OnnxRuntimeEngine's session options",
            "statistic": "ours and raw alternate in runs of 100 calls (digits) or 1 (mobilenet-bench); "
            "median over repetitions of each one's p50; "
            "overhead and ratio paired per repetition",
        },
    )
    with tempfile.TemporaryDirectory(prefix="efb-inproc-") as data_dir:
        repo = ModelRepository(repository_config(data_dir, options.threads))
        try:
            for name in ("digits", "mobilenet-bench"):
                repo.install(options.package(name))
            digits = _compare(report, repo, "digits", options.package("digits"), digits_n)
            mobilenet = _compare(report, repo, "mobilenet-bench", options.package("mobilenet-bench"), mobilenet_n)
            layers = _layers(report, repo, digits_n)
        finally:
            repo.close()
    report.measurements = {"digits": digits, "mobilenet-bench": mobilenet, "digits_layers_p50_us": layers}
    _judge(report, digits, mobilenet, layers)
    return report


def _judge(report: Report, digits: dict[str, Any], mobilenet: dict[str, Any], layers: dict[str, float]) -> None:
    ratio = median(mobilenet["paired_ratio"])
    report.ratio("mobilenet_p50", median(mobilenet["ours_p50_us"]), median(mobilenet["raw_p50_us"]), "mobilenet p50")
    report.ratios["mobilenet_p50_paired"] = ratio
    report.ratio("digits_p50", median(digits["ours_p50_us"]), median(digits["raw_p50_us"]), "digits p50")
    overhead = median(digits["paired_overhead_us"])
    engine = layers["engine.run"] - layers["raw session.run"]
    batcher = layers["batcher.run (prepared request)"] - layers["engine.run"]
    rest = layers["repository.infer"] - layers["batcher.run (prepared request)"]
    where = (
        f"engine wrapper {engine:.1f} us, batcher + stats + response {batcher:.1f} us, "
        f"validation + request {rest:.1f} us (layer p50 differences)"
    )
    report.target(
        Target(
            "inproc mobilenet-bench p50 / raw p50",
            ratio,
            RATIO_LIMIT,
            "x",
            "lower",
            how="median over repetitions of ours p50 / raw p50 in the same repetition",
            reason=f"our path adds {median(mobilenet['paired_overhead_us']):.0f} us per call; {where}",
        )
    )
    report.target(
        Target(
            "inproc digits p50 overhead (ours - raw)",
            overhead,
            OVERHEAD_LIMIT_US,
            "us",
            "lower",
            how="median over repetitions of ours p50 - raw p50 in the same repetition",
            reason=where,
        )
    )
