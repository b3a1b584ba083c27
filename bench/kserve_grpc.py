"""KServe v2 gRPC throughput on the Unix socket of a real agent, 16 requests in flight from one grpc.aio client.

(a) mobilenet-bench against raw onnxruntime's best batch size (in-process session.run, same threads);
(b) digits with the adaptive batcher against batching off. A bare grpc.aio echo server gives the transport floor.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
import psutil

from bench._agent import AgentProcess, install, scratch_dir, write_config
from bench._harness import Options, Report, Samples, Target, median
from bench.inproc import raw_session
from edge_runtime.kserve.client import build_request
from edgefleet.proto.inference import grpc_service_pb2 as pb
from edgefleet.proto.inference import grpc_service_pb2_grpc as pb_grpc

__all__ = ["run"]

T = TypeVar("T")
CONCURRENCY = 16
BATCH_SIZES = (1, 2, 4, 8, 16, 32)
MOBILENET_LIMIT = 0.85
BATCHING_LIMIT = 5.0
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]


@dataclass
class Window:
    """One timed window of CONCURRENCY clients calling ModelInfer back to back."""

    seconds: float
    latencies: Samples
    batches: dict[int, int] = field(default_factory=dict)  # batch size (rows) -> executions
    # Engine time of those executions (ModelStatistics compute_infer); they include warm-up and tail calls.
    compute_s: float = 0.0
    server_cpu_s: float = 0.0
    client_cpu_s: float = 0.0

    @property
    def throughput(self) -> float:
        """Requests completed per second (each carries one row, so also inferences per second)."""
        return len(self.latencies.values) / self.seconds

    @property
    def engine_s_per_row(self) -> float:
        rows = sum(k * v for k, v in self.batches.items())
        return self.compute_s / rows if rows else 0.0

    def as_dict(self) -> dict[str, Any]:
        done = max(len(self.latencies.values), 1)
        return {
            "requests_per_s": self.throughput,
            "inferences_per_s": self.throughput,
            "completed": len(self.latencies.values),
            "seconds": self.seconds,
            "latency_us": self.latencies.summary(),
            "batch_executions": {str(k): v for k, v in sorted(self.batches.items())},
            "mean_batch_size": _mean_batch(self.batches),
            "engine_us_per_execution": self.compute_s / max(sum(self.batches.values()), 1) * 1e6,
            "engine_busy_fraction": self.engine_s_per_row * len(self.latencies.values) / self.seconds,
            "server_cpu_us_per_request": self.server_cpu_s / done * 1e6,
            "client_cpu_us_per_request": self.client_cpu_s / done * 1e6,
        }


def _mean_batch(batches: Mapping[int, int]) -> float:
    executions = sum(batches.values())
    return sum(k * v for k, v in batches.items()) / executions if executions else float("nan")


async def _window(
    channel: grpc.aio.Channel,
    model: str,
    requests: Sequence[pb.ModelInferRequest],
    warmup: float,
    seconds: float,
    server: psutil.Process,
) -> Window:
    """Completions inside [warm-up end, +seconds] count; the server's batch sizes come from ModelStatistics."""
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    before = await _batch_counts(stub, model)
    clock = time.perf_counter
    begin = clock() + warmup
    end = begin + seconds
    latencies: list[float] = []
    cpu: dict[str, float] = {}

    async def client(i: int) -> None:
        k = i
        while (t0 := clock()) < end:
            await stub.ModelInfer(requests[k % len(requests)], timeout=60)
            t1 = clock()
            if begin <= t1 <= end:
                latencies.append(t1 - t0)
            k += CONCURRENCY

    async def cpu_marks() -> None:
        await asyncio.sleep(max(0.0, begin - clock()))
        cpu["server"], cpu["client"] = _cpu(server), _cpu(psutil.Process())
        await asyncio.sleep(max(0.0, end - clock()))
        cpu["server"], cpu["client"] = _cpu(server) - cpu["server"], _cpu(psutil.Process()) - cpu["client"]

    await asyncio.gather(cpu_marks(), *(client(i) for i in range(CONCURRENCY)))
    after = await _batch_counts(stub, model)
    batches = {k: n - before.get(k, (0, 0))[0] for k, (n, _) in after.items() if n > before.get(k, (0, 0))[0]}
    compute_s = sum(ns - before.get(k, (0, 0))[1] for k, (_, ns) in after.items()) / 1e9
    return Window(seconds, Samples(latencies), batches, compute_s, cpu["server"], cpu["client"])


def _cpu(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system + times.children_user + times.children_system


async def _batch_counts(stub: pb_grpc.GRPCInferenceServiceStub, model: str) -> dict[int, tuple[int, int]]:
    """batch size -> (executions, engine ns) so far."""
    if not model:
        return {}
    reply = await stub.ModelStatistics(pb.ModelStatisticsRequest(name=model), timeout=10)
    return {b.batch_size: (b.compute_infer.count, b.compute_infer.ns) for b in reply.model_stats[0].batch_stats}


def raw_best(model: Path, threads: int, sizes: Sequence[int], seconds_per_size: float) -> dict[int, float]:
    """Inferences/s of in-process session.run at each batch size (after one run at that shape)."""
    session = raw_session(model, threads)
    input_name = session.get_inputs()[0].name
    output_names = [o.name for o in session.get_outputs()]
    rng = np.random.default_rng(0)
    out = {}
    for size in sizes:
        feed = {input_name: rng.random((size, 3, 224, 224), dtype=np.float32)}
        session.run(output_names, feed)
        runs, t0 = 0, time.perf_counter()
        while runs < 2 or time.perf_counter() - t0 < seconds_per_size:
            session.run(output_names, feed)
            runs += 1
        out[size] = size * runs / (time.perf_counter() - t0)
    return out


async def _interleaved(repeat: int, runs: Mapping[str, Callable[[], Awaitable[T]]]) -> dict[str, list[T]]:
    """Each measurement once per repetition, the order rotating (bench._harness.interleaved, awaited)."""
    names = list(runs)
    results: dict[str, list[T]] = {name: [] for name in names}
    for rep in range(repeat):
        k = rep % len(names)
        for name in names[k:] + names[:k]:
            results[name].append(await runs[name]())
    return results


def _digits_requests() -> list[pb.ModelInferRequest]:
    from models.build import digits_holdout

    pixels, _ = digits_holdout()
    return [build_request("digits", {"pixels": pixels[i : i + 1]}) for i in range(len(pixels))]


def _mobilenet_requests() -> list[pb.ModelInferRequest]:
    rng = np.random.default_rng(1)
    images = [rng.random((1, 3, 224, 224), dtype=np.float32) for _ in range(4)]
    return [build_request("mobilenet-bench", {"input": image}) for image in images]


@dataclass
class Servers:
    adaptive: AgentProcess  # mobilenet-bench and digits, default (adaptive) batching
    batch_off: AgentProcess  # digits with [inference] adaptive = false, max_batch_size = 1
    echo: subprocess.Popen[str]  # bare grpc.aio server answering ModelInfer with a fixed response
    echo_target: str
    plans: dict[str, str] = field(default_factory=dict)


async def _measure(report: Report, servers: Servers) -> dict[str, Any]:
    options = report.options
    warmup, seconds = options.seconds(0.5, 0.05), options.seconds(3.0, 0.2)
    sizes = BATCH_SIZES if not options.quick else BATCH_SIZES[:2]
    loop = asyncio.get_running_loop()
    mobilenet_model = options.package("mobilenet-bench") / "model.onnx"
    digits, mobilenet = _digits_requests(), _mobilenet_requests()
    agent, off = psutil.Process(servers.adaptive.pid), psutil.Process(servers.batch_off.pid)
    echo = psutil.Process(servers.echo.pid)
    async with (
        grpc.aio.insecure_channel(servers.adaptive.target, options=CHANNEL_OPTIONS) as ch_agent,
        grpc.aio.insecure_channel(servers.batch_off.target, options=CHANNEL_OPTIONS) as ch_off,
        grpc.aio.insecure_channel(servers.echo_target, options=CHANNEL_OPTIONS) as ch_echo,
    ):
        a = await _interleaved(
            options.repeat,
            {
                "raw": lambda: loop.run_in_executor(
                    None, raw_best, mobilenet_model, options.threads, sizes, seconds / 6
                ),
                "ours": lambda: _window(ch_agent, "mobilenet-bench", mobilenet, warmup, seconds, agent),
            },
        )
        b = await _interleaved(
            options.repeat,
            {
                "adaptive": lambda: _window(ch_agent, "digits", digits, warmup, seconds, agent),
                "batch_off": lambda: _window(ch_off, "digits", digits, warmup, seconds, off),
                "grpc_floor": lambda: _window(ch_echo, "", digits, warmup, seconds, echo),
            },
        )
    return {"a": a, "b": b}


def _spawn(work: Path, options: Options) -> Servers:
    adaptive_cfg = write_config(work / "adaptive", threads=options.threads)
    off_cfg = write_config(work / "off", threads=options.threads, inference={"adaptive": False, "max_batch_size": 1})
    for name in ("mobilenet-bench", "digits"):
        install(adaptive_cfg, options.package(name))
    install(off_cfg, options.package("digits"))
    echo_socket = work / "echo.sock"
    echo = subprocess.Popen(
        [sys.executable, "-m", "bench.kserve_grpc", "echo", str(echo_socket)], stdout=subprocess.PIPE, text=True
    )
    return Servers(AgentProcess.spawn(adaptive_cfg), AgentProcess.spawn(off_cfg), echo, f"unix:{echo_socket}")


def _wait_ready(servers: Servers) -> None:
    for label, agent in (("adaptive", servers.adaptive), ("batch_off", servers.batch_off)):
        agent.wait_event("agent.ready")
        for e in agent.events:
            if e.get("event") == "model.ready":
                servers.plans[f"{label}/{e['model']}"] = f"batch {e.get('batch')}: {e.get('plan')}"
    assert servers.echo.stdout is not None
    if servers.echo.stdout.readline().strip() != "ready":
        raise RuntimeError("the echo server did not start")


def _stop(servers: Servers) -> None:
    servers.adaptive.stop()
    servers.batch_off.stop()
    servers.echo.terminate()
    servers.echo.wait(10)


def run(options: Options) -> Report:
    report = Report(
        "kserve_grpc",
        options,
        {
            "transport": "KServe v2 gRPC over the agent's Unix socket",
            "client": f"one grpc.aio client process (the benchmark's), {CONCURRENCY} ModelInfer calls in flight, "
            "requests built before timing; it shares the 2 cores with the agent",
            "agent": f"edge-agent process, onnxruntime CPU, intra_op_threads {options.threads}, 1 instance",
            "raw_baseline": f"in-process session.run, same session options and threads, batch sizes {BATCH_SIZES}",
            "grpc_floor": "bare grpc.aio server answering ModelInfer with a fixed digits-sized response",
            "window_s": options.seconds(3.0, 0.2),
        },
    )
    with scratch_dir() as work:
        servers = _spawn(work, options)
        try:
            _wait_ready(servers)
            report.params["batch_plans"] = servers.plans
            results = asyncio.run(_measure(report, servers))
        finally:
            _stop(servers)
    _judge(report, results["a"], results["b"])
    return report


def _judge(report: Report, a: dict[str, list[Any]], b: dict[str, list[Window]]) -> None:
    raw_best_per_rep = [max(sweep.values()) for sweep in a["raw"]]
    ours = [w.throughput for w in a["ours"]]
    report.measurements["mobilenet"] = {
        "raw_inferences_per_s_by_batch": [{str(k): v for k, v in sweep.items()} for sweep in a["raw"]],
        "raw_best_inferences_per_s": raw_best_per_rep,
        "ours": [w.as_dict() for w in a["ours"]],
    }
    report.measurements["digits"] = {name: [w.as_dict() for w in windows] for name, windows in b.items()}
    best_batch = [max(sweep, key=sweep.get) for sweep in a["raw"]]
    report.say(f"mobilenet raw best per repetition: {[round(v, 1) for v in raw_best_per_rep]} /s at batch {best_batch}")
    report.say(f"mobilenet ours: {[round(v, 1) for v in ours]} req/s; batches {_merged(a['ours'])}")
    for name, windows in b.items():
        report.say(f"digits {name}: {[round(w.throughput) for w in windows]} req/s; batches {_merged(windows)}")
    paired_a = median([o / r for o, r in zip(ours, raw_best_per_rep, strict=True)])
    report.ratio("mobilenet_vs_raw_best", median(ours), median(raw_best_per_rep), "mobilenet throughput")
    report.ratios["mobilenet_vs_raw_best_paired"] = paired_a
    on, off, floor = ([w.throughput for w in b[k]] for k in ("adaptive", "batch_off", "grpc_floor"))
    paired_b = median([x / y for x, y in zip(on, off, strict=True)])
    report.ratio("digits_adaptive_vs_off", median(on), median(off), "digits throughput, adaptive vs batching off")
    report.ratios["digits_adaptive_vs_off_paired"] = paired_b
    report.ratio("digits_adaptive_vs_grpc_floor", median(on), median(floor), "digits adaptive vs bare gRPC floor")
    report.target(
        Target(
            "kserve mobilenet-bench throughput / raw best",
            paired_a,
            MOBILENET_LIMIT,
            "x",
            "higher",
            how="median over repetitions of ours req/s / raw best inferences/s in the same repetition",
            reason=_why_mobilenet(a["ours"], median([sweep[1] for sweep in a["raw"]])),
        )
    )
    report.target(
        Target(
            "kserve digits throughput adaptive / batching off",
            paired_b,
            BATCHING_LIMIT,
            "x",
            "higher",
            how="median over repetitions of adaptive req/s / batching-off req/s in the same repetition",
            reason=_why_digits(b),
        )
    )


def _merged(windows: Sequence[Window]) -> dict[int, int]:
    total: dict[int, int] = {}
    for w in windows:
        for k, v in w.batches.items():
            total[k] = total.get(k, 0) + v
    return dict(sorted(total.items()))


def _cpu_per_request(windows: Sequence[Window], side: str) -> float:
    done = sum(len(w.latencies.values) for w in windows) or 1
    return sum(w.server_cpu_s if side == "server" else w.client_cpu_s for w in windows) / done * 1e6


def _why_mobilenet(windows: Sequence[Window], raw_batch1: float) -> str:
    engine = median([w.engine_s_per_row for w in windows])
    busy = median([w.engine_s_per_row * w.throughput for w in windows])
    server, client = _cpu_per_request(windows, "server"), _cpu_per_request(windows, "client")
    return (
        f"the engine thread is busy {busy:.0%} of the window, at {engine * 1e3:.2f} ms per inference in the agent "
        f"against {1e3 / raw_batch1:.2f} ms for raw batch 1 alone: agent CPU {server:.0f} us (engine included) "
        f"and client CPU {client:.0f} us per request share the 2 cores; "
        f"mean batch {_mean_batch(_merged(windows)):.2f}"
    )


def _why_digits(b: Mapping[str, Sequence[Window]]) -> str:
    on, off, floor = b["adaptive"], b["batch_off"], b["grpc_floor"]
    best = median([w.throughput for w in floor])
    return (
        f"per-request gRPC cost bounds both: the bare grpc.aio floor is {best:.0f} req/s "
        f"({best / max(median([w.throughput for w in off]), 1e-9):.1f}x batching off, so no server can reach "
        f"{BATCHING_LIMIT:g}x here); agent CPU per request {_cpu_per_request(on, 'server'):.0f} us adaptive, "
        f"{_cpu_per_request(off, 'server'):.0f} us off, {_cpu_per_request(floor, 'server'):.0f} us echo; "
        f"client CPU {_cpu_per_request(on, 'client'):.0f} us; adaptive mean batch {_mean_batch(_merged(on)):.2f}"
    )


# --- the transport floor: a bare grpc.aio server with no inference behind it ---------------------------------


class _Echo(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self) -> None:
        self._reply = pb.ModelInferResponse(model_name="digits", model_version="2")
        self._reply.outputs.add(name="probabilities", datatype="FP32", shape=[1, 10])
        self._reply.raw_output_contents.append(bytes(40))

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        return self._reply


async def _serve_echo(socket: str) -> None:
    server = grpc.aio.server(options=CHANNEL_OPTIONS)
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(_Echo(), server)  # type: ignore[abstract]
    server.add_insecure_port(f"unix:{socket}")
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    if sys.argv[1:2] != ["echo"] or len(sys.argv) != 3:
        sys.exit("usage: python -m bench.kserve_grpc echo SOCKET")
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    asyncio.run(_serve_echo(sys.argv[2]))
