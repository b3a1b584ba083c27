"""The end-to-end demo behind `make demo`: an edge-agent serving real models to local apps.

Starts `edge-agent run` as a real process with its own data dir under build/demo, installs the digits and
mobilenet-bench packages, and drives it over the Unix socket the way an app on the device would: classify
the held-out digits from several threads, show a bad request's error, read the statistics and metrics,
and stop the agent with SIGTERM (it drains and exits).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np

from edge_runtime.kserve import KServeClient
from models.build import digits_holdout

ROOT = Path(__file__).resolve().parent.parent


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def write_config(workdir: Path) -> Path:
    config = workdir / "edge-agent.toml"
    config.write_text(
        f'[agent]\ndata_dir = "{workdir / "data"}"\nshutdown_grace_s = 5.0\n'
        f'[server]\nunix_socket = "{workdir / "inference.sock"}"\ntcp_address = "127.0.0.1:0"\n'
        'metrics_address = "127.0.0.1:0"\n'
        '[engine]\nbackend = "auto"\n'
    )
    return config


def start_agent(config: Path, log_path: Path) -> tuple[subprocess.Popen[bytes], dict[str, object]]:
    log = log_path.open("wb")
    agent = subprocess.Popen(
        [sys.executable, "-m", "edge_runtime.agent.cli", "run", "--config", str(config)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for line in log_path.read_text().splitlines():
            if '"agent.ready"' in line:
                return agent, json.loads(line)
        if agent.poll() is not None:
            raise SystemExit(f"edge-agent exited early; see {log_path}")
        time.sleep(0.05)
    agent.kill()
    raise SystemExit(f"edge-agent did not become ready in 60 s; see {log_path}")


def classify(client: KServeClient) -> None:
    pixels, labels = digits_holdout()
    latencies: list[float] = []

    def one(i: int) -> int:
        started = time.perf_counter()
        probabilities = client.infer("digits", {"pixels": pixels[i : i + 1]}).outputs["probabilities"]
        latencies.append(time.perf_counter() - started)
        return int(probabilities.argmax())

    started = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        predictions = list(pool.map(one, range(len(pixels))))
    elapsed = time.perf_counter() - started
    accuracy = float(np.mean(np.array(predictions) == labels))
    cuts = statistics.quantiles(latencies, n=100)
    print(
        f"classified {len(pixels)} held-out digits from 8 threads: accuracy {accuracy:.3f}, "
        f"{len(pixels) / elapsed:.0f} requests/s, latency p50 {cuts[49] * 1e3:.2f} ms p99 {cuts[98] * 1e3:.2f} ms"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, default=ROOT / "build" / "models", help="built model packages")
    parser.add_argument("--workdir", type=Path, default=ROOT / "build" / "demo", help="demo state (recreated)")
    args = parser.parse_args()
    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)
    config = write_config(args.workdir)
    edge_agent = [sys.executable, "-m", "edge_runtime.agent.cli"]

    say("install model packages on the device (verified against their manifests)")
    for package in ("digits/1", "mobilenet-bench/1"):
        subprocess.run([*edge_agent, "install", str(args.models / package), "--config", str(config)], check=True)

    say("start edge-agent")
    agent, ready = start_agent(config, args.workdir / "agent.log")
    print(f"ready in {ready['seconds']} s, listening on {ready['listen']}")
    try:
        with KServeClient(f"unix:{args.workdir / 'inference.sock'}") as client:
            meta = client.model_metadata("digits")
            print(
                f"serving {meta.name} versions {list(meta.versions)} on {meta.platform}; server ready: {client.ready()}"
            )

            say("an app classifies digits over the local KServe v2 API")
            classify(client)
            image = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
            started = time.perf_counter()
            logits = client.infer("mobilenet-bench", {"input": image}).outputs["logits"]
            print(f"mobilenet-bench: logits {logits.shape} in {(time.perf_counter() - started) * 1e3:.1f} ms")

            say("a bad request gets its own error and changes nothing")
            try:
                client.infer("digits", {"pixels": np.zeros((1, 64), np.float64)})
            except grpc.RpcError as exc:
                print(f"{exc.code().name}: {exc.details()}")

            say("what the batcher did (ModelStatistics)")
            for stats in client.statistics().model_stats:
                sizes = {b.batch_size: b.compute_infer.count for b in stats.batch_stats}
                print(
                    f"{stats.name}:{stats.version} inferences {stats.inference_count} in "
                    f"{stats.execution_count} batches; batch sizes {sizes}"
                )

        say("Prometheus metrics")
        url = f"http://127.0.0.1:{ready['metrics_port']}/metrics"
        for line in urllib.request.urlopen(url, timeout=5).read().decode().splitlines():
            if line.startswith(("edgefleet_inference_request_success_total", "edgefleet_batcher_max_batch_size")):
                print(line)
    finally:
        say("SIGTERM: the agent drains and exits")
        agent.send_signal(signal.SIGTERM)
        code = agent.wait(timeout=30)
        print(f"edge-agent exited with {code}; log in {os.path.relpath(args.workdir / 'agent.log')}")
    return 0 if code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
