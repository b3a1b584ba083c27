"""Serving on one core, under issue 16's conditions: the agent pinned to one CPU with one ONNX Runtime intra-op
thread, the load (unmodified tritonclient clients, bench/_triton_load.py, batch-1 requests) pinned to another.

Measured in the same run, each repetition rotating the order:
- raw ONNX Runtime `session.run`, batch 1, one thread, on the agent's CPU (a process of its own);
- a bare grpc.aio server (bench/_echo.py) on the agent's CPU: parses ModelInfer, answers a fixed response;
- the agent over gRPC (Unix socket), 16 clients and one, for mobilenet-bench (a 600 KB input) and digits (an MLP);
- the same over Triton's system shared memory (the CNN's input in a registered region) and over HTTP/REST
  (tritonclient.http, binary tensors, loopback TCP).
Goals: CNN at 16 in flight >= 0.9x raw batch 1; CNN one client p50 within 0.3 ms of raw + bare gRPC; MLP at 16 in
flight >= 0.8x the bare server. Where a tiny model runs is decided by numbers: the same digits served by a second
agent with inference.run_on_loop = false (batches on an engine thread, a hop each) beside the first (on the
loop), and the hop's cost per request in process.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import psutil

from bench._agent import AgentProcess, install, pinned, scratch_dir, write_config
from bench._harness import Options, Report, Target, interleaved, median, percentile

__all__ = ["run"]

REPO = Path(__file__).resolve().parents[1]
CNN, MLP = "mobilenet-bench", "digits"
CONCURRENCY = 16
CNN_LIMIT = 0.9
CNN_ONE_CLIENT_MS = 0.3
MLP_LIMIT = 0.8
# digits' agent CPU per request with its batches on the event loop / with them on an engine thread.
LOOP_VS_THREAD_LIMIT = 1.0


@dataclass
class Window:
    """One run of the load generator: what completed inside its timed window, and the CPU either side spent."""

    completed: int
    seconds: float
    latencies_us: list[float]
    calls: int  # every call of the run, warm-up included
    server_cpu_s: float
    client_cpu_s: float
    errors: list[str] = field(default_factory=list)
    batches: dict[int, int] = field(default_factory=dict)  # batch size -> executions (the agent's statistics)

    @property
    def per_s(self) -> float:
        return self.completed / self.seconds if self.seconds else 0.0

    @property
    def p50_us(self) -> float:
        return median(self.latencies_us)

    @property
    def server_us_per_request(self) -> float:
        return self.server_cpu_s / max(self.calls, 1) * 1e6

    @property
    def mean_batch(self) -> float:
        executions = sum(self.batches.values())
        return sum(k * v for k, v in self.batches.items()) / executions if executions else float("nan")

    def as_dict(self) -> dict[str, Any]:
        lat = self.latencies_us
        return {
            "per_s": self.per_s,
            "completed": self.completed,
            "p50_us": self.p50_us,
            "p99_us": percentile(lat, 99),
            "server_cpu_us_per_request": self.server_us_per_request,
            "client_cpu_us_per_request": self.client_cpu_s / max(self.completed, 1) * 1e6,
            "batch_executions": {str(k): v for k, v in sorted(self.batches.items())},
            "mean_batch": self.mean_batch,
            "errors": self.errors,
        }


@dataclass
class Setup:
    options: Options
    agent: AgentProcess
    threads_agent: AgentProcess  # digits with inference.run_on_loop = false
    echo: subprocess.Popen[str]
    echo_socket: Path
    http_url: str
    inputs: dict[str, Path]  # model -> .npy of one batch-1 input
    input_names: dict[str, str]
    server_cpus: frozenset[int] | None
    client_cpus: frozenset[int] | None
    http: bool
    shm: bool
    plans: dict[str, str] = field(default_factory=dict)


def _cpus() -> tuple[frozenset[int] | None, frozenset[int] | None]:
    """One CPU for the servers, another for the load; None (unpinned) on a machine with fewer than two."""
    usable = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if len(usable) < 2:
        return None, None
    return frozenset({usable[0]}), frozenset({usable[1]})


def _cpu_s(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def _load(
    setup: Setup,
    model: str,
    threads: int,
    *,
    target: str = "agent",
    protocol: str = "grpc",
    shm: bool = False,
) -> Window:
    options = setup.options
    if target == "echo":
        url, pid = f"unix:{setup.echo_socket}", setup.echo.pid
    elif target == "threads":
        url, pid = setup.threads_agent.target, setup.threads_agent.pid
    else:
        url, pid = (setup.agent.target if protocol == "grpc" else setup.http_url), setup.agent.pid
    agent = {"agent": setup.agent, "threads": setup.threads_agent}.get(target)
    before = _batch_counts(agent, model) if agent is not None else {}
    cpu0 = _cpu_s(pid)
    command = [
        sys.executable,
        "-m",
        "bench._triton_load",
        "--protocol",
        protocol,
        "--url",
        url,
        "--model",
        model,
        "--input",
        f"{setup.input_names[model]}={setup.inputs[model]}",
        "--threads",
        str(threads),
        "--warmup",
        str(options.seconds(0.7, 0.1)),
        "--seconds",
        str(options.seconds(3.0, 0.3)),
    ]
    if shm:
        command.append("--shm")
    done = subprocess.run([*pinned(setup.client_cpus), *command], capture_output=True, text=True, cwd=REPO, timeout=300)
    cpu1 = _cpu_s(pid)
    if not done.stdout.strip():
        raise RuntimeError(f"the load generator failed: {done.stderr[-2000:]}")
    out = json.loads(done.stdout.splitlines()[-1])
    window = Window(
        out["completed"],
        out["seconds"],
        out["latency_us"],
        out["calls"],
        cpu1 - cpu0,
        out["client_cpu_s"],
        out["errors"],
    )
    if agent is not None:
        after = _batch_counts(agent, model)
        window.batches = {k: n - before.get(k, 0) for k, n in after.items() if n > before.get(k, 0)}
    return window


def _batch_counts(agent: AgentProcess, model: str) -> dict[int, int]:
    """batch size -> executions so far, from the agent's ModelStatistics."""
    from edgefleet.proto.inference import grpc_service_pb2 as pb
    from edgefleet.proto.inference import grpc_service_pb2_grpc as pb_grpc

    with grpc.insecure_channel(agent.target) as channel:
        reply = pb_grpc.GRPCInferenceServiceStub(channel).ModelStatistics(pb.ModelStatisticsRequest(name=model))
    return {b.batch_size: b.compute_infer.count for b in reply.model_stats[0].batch_stats}


def _raw(setup: Setup, model: str) -> dict[str, float]:
    """Raw session.run at batch 1 in a process of its own on the servers' CPU."""
    path = setup.options.package(model) / "model.onnx"
    seconds = setup.options.seconds(2.0, 0.2)
    command = [sys.executable, "-m", "bench.serving", "raw", str(path), str(setup.inputs[model]), str(seconds)]
    command.append(str(setup.options.threads))
    done = subprocess.run([*pinned(setup.server_cpus), *command], capture_output=True, text=True, cwd=REPO, timeout=300)
    if not done.stdout.strip():
        raise RuntimeError(f"the raw ONNX Runtime run failed: {done.stderr[-2000:]}")
    result: dict[str, float] = json.loads(done.stdout.splitlines()[-1])
    return result


def _raw_main(model: str, input_npy: str, seconds: float, threads: int) -> None:
    from bench.inproc import raw_session

    session = raw_session(Path(model), threads)
    name = session.get_inputs()[0].name
    outputs = [o.name for o in session.get_outputs()]
    feed = {name: np.load(input_npy)}
    for _ in range(5):
        session.run(outputs, feed)
    latencies = []
    clock = time.perf_counter
    start = clock()
    end = start + seconds
    while (t0 := clock()) < end:
        session.run(outputs, feed)
        latencies.append(clock() - t0)
    print(json.dumps({"per_s": len(latencies) / (clock() - start), "p50_us": median(latencies) * 1e6}))


# --- the hop: what handing a batch to an engine thread and its answers back costs, in process -----------------


def hop_cost(seconds: float) -> dict[str, float]:
    """µs of wall time per request through DynamicBatcher with a runner that does nothing, its batches run on
    the event loop against on an engine thread, with 1 and 16 requests in flight (one process, one loop)."""
    from edge_runtime.batching.batcher import DynamicBatcher
    from edge_runtime.batching.policy import BatchPlan
    from edge_runtime.inference.stats import ModelStats
    from edge_runtime.loop_bridge import LoopBridge

    @dataclass(frozen=True)
    class _Request:
        rows: int = 1
        priority: int = 1
        deadline: float | None = None
        group: None = None

    async def measure(on_loop: bool, in_flight: int) -> float:
        loop = asyncio.get_running_loop()
        batcher: DynamicBatcher[_Request, int] = DynamicBatcher(
            "hop",
            lambda batch: [1] * len(batch),
            BatchPlan(32, 0.0, "hop", on_loop=on_loop),
            instances=1,
            max_queue_depth=1000,
            observer=ModelStats(),
            loop=loop,
        )
        bridge = LoopBridge(loop)
        done = 0
        end = time.perf_counter() + seconds

        async def client() -> None:
            nonlocal done
            while time.perf_counter() < end:
                await bridge.wrap(batcher.submit_awaitable(_Request()))
                done += 1

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(in_flight)))
        elapsed = time.perf_counter() - started
        batcher.close()
        return elapsed / max(done, 1) * 1e6

    async def all_of_them() -> dict[str, float]:
        out = {}
        for in_flight in (1, CONCURRENCY):
            for on_loop in (False, True):
                out[f"{'loop' if on_loop else 'thread'}_{in_flight}_in_flight_us"] = await measure(on_loop, in_flight)
        return out

    return asyncio.run(all_of_them())


# --- set-up -----------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _inputs(work: Path) -> tuple[dict[str, Path], dict[str, str]]:
    from models.build import digits_holdout

    pixels, _ = digits_holdout()
    image = np.random.default_rng(1).random((1, 3, 224, 224), dtype=np.float32)
    paths = {CNN: work / "cnn.npy", MLP: work / "mlp.npy"}
    np.save(paths[CNN], image)
    np.save(paths[MLP], pixels[:1])
    return paths, {CNN: "input", MLP: "pixels"}


def _available(module: str) -> bool:
    probe = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, cwd=REPO, check=False)
    return probe.returncode == 0


def _start(options: Options, work: Path) -> Setup:
    server_cpus, client_cpus = _cpus()
    http = _available("tritonclient.http")
    port = _free_port()
    config = write_config(work / "agent", threads=options.threads, http=False)
    if http:  # tritonclient.http speaks TCP only
        config.write_text(config.read_text().replace('http_tcp_address = ""', f'http_tcp_address = "127.0.0.1:{port}"'))
    for name in (CNN, MLP):
        install(config, options.package(name))
    inputs, input_names = _inputs(work)
    echo_socket = work / "echo.sock"
    echo = subprocess.Popen(
        [
            *pinned(server_cpus),
            sys.executable,
            "-m",
            "bench._echo",
            str(echo_socket),
            *(str(options.package(m)) for m in (CNN, MLP)),
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    threads_config = write_config(work / "threads", threads=options.threads, inference={"run_on_loop": False})
    install(threads_config, options.package(MLP))
    agent = AgentProcess.spawn(config, cpus=server_cpus)
    threads_agent = AgentProcess.spawn(threads_config, cpus=server_cpus)
    setup = Setup(
        options,
        agent,
        threads_agent,
        echo,
        echo_socket,
        f"127.0.0.1:{port}",
        inputs,
        input_names,
        server_cpus,
        client_cpus,
        http,
        shm=Path("/dev/shm").is_dir(),
    )
    for label, process in (("", agent), ("run_on_loop=false ", threads_agent)):
        process.wait_event("agent.ready")
        for event in process.events:
            if event.get("event") == "model.ready":
                setup.plans[f"{label}{event['model']}"] = f"batch {event.get('batch')}: {event.get('plan')}"
    assert echo.stdout is not None
    if echo.stdout.readline().strip() != "ready":
        raise RuntimeError("the bare grpc.aio server did not start")
    return setup


def _stop(setup: Setup) -> None:
    setup.agent.stop()
    setup.threads_agent.stop()
    setup.echo.terminate()
    setup.echo.wait(10)


def run(options: Options) -> Report:
    with scratch_dir() as work:
        setup = _start(options, work)
        report = Report(
            "serving",
            options,
            {
                "conditions": "agent pinned to one CPU, ONNX Runtime intra-op threads as --threads (1 by default); "
                "load generator: unmodified tritonclient, batch-1 requests, pinned to another CPU",
                "server_cpus": sorted(setup.server_cpus or []) or "unpinned (fewer than 2 CPUs)",
                "client_cpus": sorted(setup.client_cpus or []) or "unpinned",
                "window_s": options.seconds(3.0, 0.3),
                "clients_in_flight": CONCURRENCY,
                "grpc": "KServe v2 gRPC over the agent's Unix socket (tritonclient.grpc, one client per thread)",
                "http": "KServe v2 HTTP/REST over loopback TCP, binary tensors (tritonclient.http)"
                if setup.http
                else "not measured: tritonclient.http does not import (pip install geventhttpclient)",
                "bare_grpc": "bench/_echo.py: grpc.aio server answering ModelInfer with a fixed response",
                "raw": "onnxruntime session.run, batch 1, same session options, on the agent's CPU",
                "batch_plans": setup.plans,
            },
        )
        try:
            results = _measure(setup)
        finally:
            _stop(setup)
    report.measurements["hop"] = hop_cost(options.seconds(1.0, 0.1))
    _judge(report, results)
    return report


def _measure(setup: Setup) -> dict[str, list[Any]]:
    repeat = 1 if setup.options.quick else min(setup.options.repeat, 3)
    runs: dict[str, Callable[[], Any]] = {
        "raw_cnn": lambda: _raw(setup, CNN),
        "cnn_16": lambda: _load(setup, CNN, CONCURRENCY),
        "cnn_1": lambda: _load(setup, CNN, 1),
        "bare_cnn_1": lambda: _load(setup, CNN, 1, target="echo"),
        "raw_mlp": lambda: _raw(setup, MLP),
        "mlp_16": lambda: _load(setup, MLP, CONCURRENCY),
        "threads_mlp_16": lambda: _load(setup, MLP, CONCURRENCY, target="threads"),
        "bare_mlp_16": lambda: _load(setup, MLP, CONCURRENCY, target="echo"),
        "mlp_1": lambda: _load(setup, MLP, 1),
        "bare_mlp_1": lambda: _load(setup, MLP, 1, target="echo"),
    }
    if setup.shm:
        runs["shm_cnn_16"] = lambda: _load(setup, CNN, CONCURRENCY, shm=True)
        runs["shm_cnn_1"] = lambda: _load(setup, CNN, 1, shm=True)
    if setup.http:
        for model, key in ((CNN, "cnn"), (MLP, "mlp")):
            runs[f"http_{key}_16"] = lambda model=model: _load(setup, model, CONCURRENCY, protocol="http")  # type: ignore[misc]
            runs[f"http_{key}_1"] = lambda model=model: _load(setup, model, 1, protocol="http")  # type: ignore[misc]
    return interleaved(repeat, runs)


# --- verdicts ---------------------------------------------------------------------------------------------------


def _paired(a: Sequence[float], b: Sequence[float]) -> float:
    return median([x / y for x, y in zip(a, b, strict=True) if y])


def _judge(report: Report, r: Mapping[str, list[Any]]) -> None:
    windows = {k: v for k, v in r.items() if not k.startswith("raw_")}
    report.measurements["windows"] = {k: [w.as_dict() for w in v] for k, v in windows.items()}
    report.measurements["raw"] = {k: v for k, v in r.items() if k.startswith("raw_")}
    raw_cnn_per_s = [x["per_s"] for x in r["raw_cnn"]]
    raw_cnn_p50 = [x["p50_us"] for x in r["raw_cnn"]]
    raw_mlp_p50 = [x["p50_us"] for x in r["raw_mlp"]]
    per_s = {k: [w.per_s for w in v] for k, v in windows.items()}
    p50 = {k: [w.p50_us for w in v] for k, v in windows.items()}
    cpu = {k: median([w.server_us_per_request for w in v]) for k, v in windows.items()}

    for key, value in sorted(per_s.items()):
        report.say(
            f"{key:12} {median(value):8.1f} inf/s  p50 {median(p50[key]) / 1e3:7.3f} ms  "
            f"server CPU {cpu[key]:7.0f} µs/request"
        )
    report.say(
        f"raw ONNX Runtime batch 1: {CNN} {median(raw_cnn_per_s):.1f}/s p50 {median(raw_cnn_p50) / 1e3:.3f} ms; "
        f"{MLP} p50 {median(raw_mlp_p50):.1f} µs"
    )
    report.say(f"hop (in process, µs per request): {report.measurements['hop']}")

    cnn = _paired(per_s["cnn_16"], raw_cnn_per_s)
    report.ratio("cnn_16_vs_raw", median(per_s["cnn_16"]), median(raw_cnn_per_s), f"{CNN} 16 in flight vs raw batch 1")
    report.ratios["cnn_16_vs_raw_paired"] = cnn
    floor = [raw + bare for raw, bare in zip(raw_cnn_p50, p50["bare_cnn_1"], strict=True)]
    over_ms = median([(ours - f) / 1e3 for ours, f in zip(p50["cnn_1"], floor, strict=True)])
    report.ratio("cnn_1_p50_vs_floor", median(p50["cnn_1"]), median(floor), f"{CNN} one client p50 vs raw + bare gRPC")
    mlp = _paired(per_s["mlp_16"], per_s["bare_mlp_16"])
    report.ratio("mlp_16_vs_bare", median(per_s["mlp_16"]), median(per_s["bare_mlp_16"]), f"{MLP} 16 in flight vs bare")
    report.ratios["mlp_16_vs_bare_paired"] = mlp
    report.ratio("mlp_1_p50_vs_bare", median(p50["mlp_1"]), median(p50["bare_mlp_1"]), f"{MLP} one client p50 vs bare")
    mean_batch = median([w.mean_batch for w in windows["mlp_16"]])
    report.say(
        f"{MLP} at 16 in flight: mean batch {mean_batch:.2f} on the loop, "
        f"{median([w.mean_batch for w in windows['threads_mlp_16']]):.2f} on an engine thread"
    )
    loop_vs_thread = _paired(
        [w.server_us_per_request for w in windows["mlp_16"]],
        [w.server_us_per_request for w in windows["threads_mlp_16"]],
    )
    on_loop, on_thread = median(per_s["mlp_16"]), median(per_s["threads_mlp_16"])
    report.ratio("mlp_16_loop_vs_threads_per_s", on_loop, on_thread, f"{MLP} 16 in flight, on the loop vs a thread")
    for key in ("shm_cnn_16", "http_cnn_16", "http_mlp_16"):
        if key in per_s:
            base = key.split("_", 1)[1]
            report.ratio(f"{key}_vs_grpc", median(per_s[key]), median(per_s[base]), f"{key} vs gRPC raw bytes")
    for key in ("shm_cnn_1", "http_cnn_1", "http_mlp_1"):
        if key in p50:
            base = key.split("_", 1)[1]
            report.ratio(f"{key}_p50_vs_grpc", median(p50[key]), median(p50[base]), f"{key} p50 vs gRPC raw bytes")

    raw_cpu_us = 1e6 / median(raw_cnn_per_s)
    report.target(
        Target(
            f"{CNN} at 16 in flight on one core / raw ONNX Runtime batch 1",
            cnn,
            CNN_LIMIT,
            "x",
            "higher",
            how="median over repetitions of agent inf/s / raw session.run inf/s on the same CPU, same repetition",
            reason=f"the agent spends {cpu['cnn_16']:.0f} µs of CPU per request against {raw_cpu_us:.0f} µs for "
            f"raw session.run: {cpu['cnn_16'] - raw_cpu_us:.0f} µs of gRPC, decoding and hand-off (the bare gRPC "
            f"server: {cpu['bare_cnn_1']:.0f} µs per 600 KB request); mean batch "
            f"{median([w.mean_batch for w in windows['cnn_16']]):.2f}",
        )
    )
    report.target(
        Target(
            f"{CNN} one client: p50 - (raw p50 + bare gRPC p50)",
            over_ms,
            CNN_ONE_CLIENT_MS,
            "ms",
            "lower",
            how="median over repetitions of agent p50 - (raw session.run p50 + bare grpc.aio p50), same repetition",
            reason=f"agent p50 {median(p50['cnn_1']) / 1e3:.3f} ms, raw {median(raw_cnn_p50) / 1e3:.3f} ms, bare "
            f"gRPC {median(p50['bare_cnn_1']) / 1e3:.3f} ms; agent CPU per request {cpu['cnn_1']:.0f} µs",
        )
    )
    report.target(
        Target(
            f"{MLP} at 16 in flight on one core / bare grpc.aio server",
            mlp,
            MLP_LIMIT,
            "x",
            "higher",
            how="median over repetitions of agent inf/s / bare grpc.aio requests/s, same repetition",
            reason=f"the bare server spends {cpu['bare_mlp_16']:.0f} µs of CPU per request in grpc.aio itself; "
            f"the agent {cpu['mlp_16']:.0f} µs (+{cpu['mlp_16'] - cpu['bare_mlp_16']:.0f} µs: decoding the "
            f"request, ONNX Runtime's run and encoding the answer, each run cold once per request, several times "
            f"their tight-loop cost, docs/performance.md); mean batch {mean_batch:.1f}: grpc.aio hands over one "
            f"call per poller round trip, so no batch amortises them",
        )
    )
    hop = report.measurements["hop"]
    report.target(
        Target(
            f"{MLP} at 16 in flight: agent CPU per request, batches on the loop / on an engine thread",
            loop_vs_thread,
            LOOP_VS_THREAD_LIMIT,
            "x",
            "lower",
            how="median over repetitions of agent CPU µs per request, run_on_loop true / false (two agents, same "
            "CPU, same load), paired by repetition",
            reason=f"on the loop {cpu['mlp_16']:.0f} µs, on a thread {cpu['threads_mlp_16']:.0f} µs per request; "
            f"in process the hop costs {hop['thread_1_in_flight_us'] - hop['loop_1_in_flight_us']:.0f} µs at 1 "
            f"in flight, {hop['thread_16_in_flight_us'] - hop['loop_16_in_flight_us']:.0f} µs at 16",
        )
    )


if __name__ == "__main__":
    if sys.argv[1:2] != ["raw"] or len(sys.argv) != 6:
        sys.exit("usage: python -m bench.serving raw MODEL.onnx INPUT.npy SECONDS THREADS")
    _raw_main(sys.argv[2], sys.argv[3], float(sys.argv[4]), int(sys.argv[5]))
