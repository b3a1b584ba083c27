"""A backlog: 1,000,000 records in the agent's outbox drained to cloud-sync while the agent serves inference.

What a device that was offline for hours does when its link comes back. Ours: an outbox pre-filled through its
real writer, drained by the real Uploader into a real `cloud-sync run` (SQLite store), while one thread of the
same process calls `ModelRepository.infer` on digits at a steady rate, as an app would; the clock stops when
the outbox's acked_seq reaches its last seq. Inference latency is measured idle (no drain) and during the
drain. Baselines in the same run: a bare grpc.aio stream of the same messages (the transport) and the idle
latencies. Target: the backlog drained in <= 20 s. One repetition (a million records take a while to fill);
--quick drains 20,000.
"""

from __future__ import annotations

import asyncio
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench._harness import Options, Report, Target, median, percentile
from bench.inproc import repository_config
from bench.uplink_e2e import PAYLOAD, CloudUnderTest, drain, fill_outbox, raw_stream, read_messages
from edge_runtime import InferRequest, ModelRepository

__all__ = ["run"]

TARGET_DRAIN_S = 20.0
INFER_PER_S = 200  # an app's steady request rate while the backlog drains
RAW_SAMPLE_RECORDS = 100_000  # the raw stream sends these messages again until it has sent as many records


class SteadyInference:
    """One caller thread running digits at a steady rate; each call's latency is kept with the phase it ran in."""

    def __init__(self, repo: ModelRepository, rows: list[np.ndarray[Any, Any]], per_s: float) -> None:
        self._repo = repo
        self._rows = rows
        self._period = 1.0 / per_s
        self.phase = "idle"
        self.latencies: dict[str, list[float]] = {"idle": [], "drain": []}
        self.late = 0  # calls that started a full period behind the schedule
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-inference", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        clock = time.perf_counter
        start = clock()
        i = 0
        while not self._stop.is_set():
            due = start + i * self._period
            wait = due - clock()
            if wait > 0:
                self._stop.wait(wait)  # the load's schedule, not a synchronisation
            elif wait < -self._period:
                self.late += 1
            row = self._rows[i % len(self._rows)]
            phase = self.phase
            t0 = clock()
            try:
                self._repo.infer(InferRequest("digits", {"pixels": row}))
            except Exception:
                self.errors += 1
            self.latencies[phase].append(clock() - t0)
            i += 1


def _summary(values: list[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "p50_us": median(values) * 1e6,
        "p99_us": percentile(values, 99) * 1e6,
        "max_us": max(values, default=float("nan")) * 1e6,
    }


def run(options: Options) -> Report:
    from models.build import digits_holdout

    n = options.count(1_000_000, 20_000)
    idle_s = options.seconds(3.0, 1.0)
    report = Report(
        "backlog_drain",
        options,
        {"records": n, "payload_bytes": len(PAYLOAD), "inference_per_s": INFER_PER_S, "repetitions": 1},
    )
    pixels, _ = digits_holdout()
    rows = [pixels[i : i + 1] for i in range(len(pixels))]
    with tempfile.TemporaryDirectory(prefix="ef-backlog-") as tmp:
        work = Path(tmp)
        started = time.perf_counter()
        outbox = fill_outbox(work / "agent.db", n)
        fill_s = time.perf_counter() - started
        report.say(f"filled the outbox with {n:,} records in {fill_s:.1f} s")
        messages = read_messages(outbox, RAW_SAMPLE_RECORDS)
        sample = sum(len(m.records) for m in messages)
        rounds = max(1, n // sample)
        raw_rate = rounds * sample / asyncio.run(raw_stream(messages, rounds))
        del messages
        repo = ModelRepository(repository_config(str(work / "agent"), options.threads))
        try:
            repo.install(options.package("digits"))
            load = SteadyInference(repo, rows, INFER_PER_S)
            with CloudUnderTest.running(work) as cloud:
                token = cloud.add_device("backlog")
                load.start()
                time.sleep(idle_s)  # idle inference, the latency baseline
                load.phase = "drain"
                cloud_before, agent_before = cloud.cpu_seconds(), time.process_time()
                drain_s = asyncio.run(drain(outbox, cloud.target, token, timeout=60 + n / 1000))
                cloud_cpu, agent_cpu = cloud.cpu_seconds() - cloud_before, time.process_time() - agent_before
                load.stop()
        finally:
            outbox.close()
            repo.close()
    idle, during = _summary(load.latencies["idle"]), _summary(load.latencies["drain"])
    rate = n / drain_s
    report.measurements = {
        "fill_seconds": fill_s,
        "drain_seconds": drain_s,
        "ours_records_per_s": rate,
        "raw_stream_records_per_s": raw_rate,
        "inference_idle": idle,
        "inference_during_drain": during,
        "inference_late_calls": load.late,
        "inference_errors": load.errors,
        "cpu_us_per_record": {"cloud": cloud_cpu / n * 1e6, "agent": agent_cpu / n * 1e6},
    }
    report.ratio("drain_vs_raw_stream", rate, raw_rate, "records/s, backlog drain vs raw grpc stream")
    report.ratio("inference_p50_drain_vs_idle", during["p50_us"], idle["p50_us"], "digits p50 us, drain vs idle")
    report.ratio("inference_p99_drain_vs_idle", during["p99_us"], idle["p99_us"], "digits p99 us, drain vs idle")
    report.say(
        f"inference while draining: {during['n']} calls, p50 {during['p50_us']:.0f} us, p99 {during['p99_us']:.0f} us "
        f"(idle: p50 {idle['p50_us']:.0f} us, p99 {idle['p99_us']:.0f} us); {load.errors} errors"
    )
    report.target(
        Target(
            f"a backlog of {n:,} records drained while serving inference",
            drain_s,
            TARGET_DRAIN_S,
            "s",
            "lower",
            how=f"real Uploader and cloud-sync (SQLite); digits at {INFER_PER_S}/s in the same process throughout",
            reason=f"{rate:,.0f} records/s: CPU a record cloud-sync {cloud_cpu / n * 1e6:.1f} us, agent "
            f"{agent_cpu / n * 1e6:.1f} us (inference included) on two shared cores; the cloud store's B-trees "
            f"grow with the backlog. Load average at the start: {report.load_before[0]:.1f}",
        )
    )
    report.write()
    return report


if __name__ == "__main__":
    import sys

    from bench.__main__ import main

    sys.exit(main(["--only", "backlog_drain", *sys.argv[1:]]))
