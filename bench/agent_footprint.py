"""Agent footprint with mobilenet-bench: resident memory after serving, and spawn-to-ModelReady, cold and cached.

The baseline is a bare Python process that loads the same model into an onnxruntime session with the same
options, warms it up as the agent does and runs the same number of inferences: the least any server pays.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from bench._agent import AgentProcess, install, scratch_dir, write_config
from bench._harness import Options, Report, Target, interleaved, median
from edge_runtime.kserve.client import KServeClient, build_request

__all__ = ["run"]

MODEL = "mobilenet-bench"
RSS_LIMIT_MIB = 150.0
START_LIMIT_S = 1.5
CONCURRENCY = 16
MIB = 2**20
# Diagnostic arm, not a target: glibc's dynamic mmap threshold rises after the first large free, so later
# 600 KB request buffers come from the heap and stay resident; a fixed threshold keeps them mmapped.
FIXED_MMAP_THRESHOLD = {"MALLOC_MMAP_THRESHOLD_": "131072"}

# The baseline server: only numpy and onnxruntime, the session options of OnnxRuntimeEngine.load, three
# warm-up runs (engine.warmup_inferences' default); "ready" once it could answer, then N inferences on "serve".
RAW_SCRIPT = """
import sys
import numpy as np
import onnxruntime as ort
path, threads, warmups = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
o = ort.SessionOptions()
o.intra_op_num_threads = threads
o.inter_op_num_threads = 1
o.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
o.log_severity_level = 3
s = ort.InferenceSession(path, sess_options=o, providers=["CPUExecutionProvider"])
x = np.random.default_rng(0).random((1, 3, 224, 224), dtype=np.float32)
for _ in range(warmups):
    s.run(None, {"input": x})
print("ready", flush=True)
for line in sys.stdin:
    for _ in range(int(line.split()[1])):
        s.run(None, {"input": x})
    print("served", flush=True)
"""


def _serve(agent: AgentProcess, requests: int) -> None:
    """`requests` ModelInfer calls, CONCURRENCY in flight, through the project's KServe client."""
    image = np.random.default_rng(0).random((1, 3, 224, 224), dtype=np.float32)
    message = build_request(MODEL, {"input": image})
    with KServeClient(agent.target) as client, ThreadPoolExecutor(CONCURRENCY) as pool:
        list(pool.map(lambda _: client.infer_raw(message), range(requests)))


def _agent_start(config: Path, requests: int, env: dict[str, str] | None = None) -> dict[str, Any]:
    """One start of the agent on `config`'s data dir: times to READY, memory when ready and after serving."""
    agent = AgentProcess.spawn(config, env)
    try:
        ready_s = agent.wait_model_ready(MODEL)
        logged = agent.wait_event("agent.ready")
        at_ready = agent.memory()
        _serve(agent, requests)
        served = agent.memory()
    finally:
        agent.stop()
    profiled = any(e.get("event") == "model.profiled" for e in agent.events)
    return {
        "spawn_to_model_ready_s": ready_s,
        "agent_ready_log_s": float(logged["seconds"]),
        "profiled_at_start": profiled,
        "rss_ready_mib": at_ready["rss"] / MIB,
        "rss_served_mib": served["rss"] / MIB,
        "peak_rss_mib": served["peak_rss"] / MIB,
        "requests_served": requests,
    }


def _raw_start(model: Path, threads: int, requests: int) -> dict[str, Any]:
    spawned = time.monotonic()
    process = subprocess.Popen(
        [sys.executable, "-c", RAW_SCRIPT, str(model), str(threads), "3"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdin is not None and process.stdout is not None
    try:
        if process.stdout.readline().strip() != "ready":
            raise RuntimeError("the raw onnxruntime baseline did not start")
        ready_s = time.monotonic() - spawned
        rss_ready = psutil.Process(process.pid).memory_info().rss
        process.stdin.write(f"serve {requests}\n")
        process.stdin.flush()
        process.stdout.readline()
        rss_served = psutil.Process(process.pid).memory_info().rss
    finally:
        process.stdin.close()
        process.wait(30)
    return {
        "spawn_to_ready_s": ready_s,
        "rss_ready_mib": rss_ready / MIB,
        "rss_served_mib": rss_served / MIB,
        "requests_served": requests,
    }


def run(options: Options) -> Report:
    requests = options.count(64, 4)
    report = Report(
        "agent_footprint",
        options,
        {
            "model": MODEL,
            "agent": f"edge-agent process, onnxruntime CPU, intra_op_threads {options.threads}, metrics on",
            "start_to_ready": "process spawn to the first ModelReady=true over the Unix socket (polled)",
            "memory": f"VmRSS via psutil after {requests} ModelInfer calls, {CONCURRENCY} in flight",
            "raw_baseline": "python -c: numpy + onnxruntime session, same options, 3 warm-ups, same inferences",
        },
    )
    package = options.package(MODEL)
    with scratch_dir() as work:
        config = write_config(work / "agent", threads=options.threads)
        install(config, package)
        cold = _agent_start(config, requests)
        runs = interleaved(
            options.repeat,
            {
                "agent_cached": lambda: _agent_start(config, requests),
                "raw": lambda: _raw_start(package / "model.onnx", options.threads, requests),
                "agent_cached_fixed_mmap_threshold": lambda: _agent_start(config, requests, FIXED_MMAP_THRESHOLD),
            },
        )
    report.measurements = {"agent_cold": cold, **runs}
    _judge(report, cold, runs["agent_cached"], runs["raw"])
    fixed = median([r["rss_served_mib"] for r in runs["agent_cached_fixed_mmap_threshold"]])
    report.measurements["summary"]["rss_fixed_mmap_threshold_mib"] = fixed
    report.say(f"diagnostic: cached RSS after serving with MALLOC_MMAP_THRESHOLD_=131072: {fixed:.1f} MiB (median)")
    return report


def _judge(report: Report, cold: dict[str, Any], cached: list[dict[str, Any]], raw: list[dict[str, Any]]) -> None:
    start = median([r["spawn_to_model_ready_s"] for r in cached])
    logged = median([r["agent_ready_log_s"] for r in cached])
    raw_start = median([r["spawn_to_ready_s"] for r in raw])
    rss = max(r["rss_served_mib"] for r in [cold, *cached])
    raw_rss = median([r["rss_served_mib"] for r in raw])
    starts = [round(r["spawn_to_model_ready_s"], 2) for r in cached]
    report.say(
        f"cold start {cold['spawn_to_model_ready_s']:.2f} s (agent.ready {cold['agent_ready_log_s']:.2f} s, "
        f"profiled: {cold['profiled_at_start']}); cached starts {starts} s"
    )
    served = [round(r["rss_served_mib"], 1) for r in cached]
    peak = max(r["peak_rss_mib"] for r in [cold, *cached])
    report.say(
        f"RSS after serving: cold {cold['rss_served_mib']:.1f} MiB, cached {served} MiB, peak {peak:.1f} MiB; "
        f"raw {raw_rss:.1f} MiB"
    )
    report.ratio("start_vs_raw", start, raw_start, "spawn to ready (cached)")
    report.ratio("rss_vs_raw", rss, raw_rss, "RSS after serving (MiB)")
    imports = start - logged
    at_ready = median([r["rss_ready_mib"] for r in cached])
    growth = median([r["rss_served_mib"] - r["rss_ready_mib"] for r in cached])
    report.target(
        Target(
            "agent RSS with mobilenet-bench after serving",
            rss,
            RSS_LIMIT_MIB,
            "MiB",
            "lower",
            how="largest VmRSS over the cold and cached starts, after serving",
            reason=f"a bare onnxruntime process with the same model takes {raw_rss:.1f} MiB after serving; the agent "
            f"takes {at_ready:.1f} MiB when ready (grpc, structlog, prometheus_client, its threads) and grows "
            f"{growth:.1f} MiB while serving (freed request buffers that glibc malloc keeps; see the "
            "fixed-mmap-threshold arm)",
        )
    )
    report.target(
        Target(
            "agent spawn-to-ModelReady, cached start",
            start,
            START_LIMIT_S,
            "s",
            "lower",
            how="median over repetitions of spawn to the first ModelReady=true, second and later starts",
            reason=f"{imports:.2f} s pass before Agent.run starts (interpreter and imports), {logged:.2f} s from "
            f"there to agent.ready; the bare onnxruntime process is ready in {raw_start:.2f} s",
        )
    )
    report.measurements["summary"] = {
        "cached_start_s": start,
        "cached_agent_ready_log_s": logged,
        "before_agent_run_s": imports,
        "cold_start_s": cold["spawn_to_model_ready_s"],
        "raw_start_s": raw_start,
        "rss_mib": rss,
        "raw_rss_mib": raw_rss,
    }
    json.dumps(report.measurements)  # fail here, not at write time, if something is not JSON
