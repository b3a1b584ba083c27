"""The load generator of the serving benchmarks: unmodified tritonclient clients, N threads, batch-1 requests.

Run as its own process (tritonclient.grpc registers the same protobuf names as edgefleet.proto, so it cannot
share a process with our code), pinned to its own core by the caller:

    python -m bench._triton_load --protocol grpc|http --url URL --model M --input NAME=FILE.npy \
        [--threads 16] [--warmup 1] [--seconds 10] [--shm]

Prints one JSON line: completed requests, the window's seconds, each request's latency (µs) and this
process's CPU seconds. Only completions inside the window count; every thread keeps its own client (and so its
own connection), as 16 independent apps would.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import threading
import time
from typing import Any

import numpy as np


def _grpc_client(url: str, model: str, inputs: dict[str, np.ndarray[Any, Any]], shm: str) -> Any:
    import tritonclient.grpc as tc

    client = tc.InferenceServerClient(url=url)
    prepared = []
    for name, array in inputs.items():
        tensor = tc.InferInput(name, list(array.shape), _datatype(array))
        if shm:
            tensor.set_shared_memory(f"{shm}-{name}", array.nbytes)
        else:
            tensor.set_data_from_numpy(array)
        prepared.append(tensor)

    def call() -> None:
        client.infer(model, prepared)

    return call


def _http_client(url: str, model: str, inputs: dict[str, np.ndarray[Any, Any]], shm: str) -> Any:
    import tritonclient.http as th

    client = th.InferenceServerClient(url=url, connection_timeout=60, network_timeout=60)
    prepared = []
    for name, array in inputs.items():
        tensor = th.InferInput(name, list(array.shape), _datatype(array))
        tensor.set_data_from_numpy(array, binary_data=True)
        prepared.append(tensor)

    def call() -> None:
        client.infer(model, prepared)

    return call


def _datatype(array: np.ndarray[Any, Any]) -> str:
    from tritonclient.utils import np_to_triton_dtype

    return str(np_to_triton_dtype(array.dtype))


def _register_shm(url: str, inputs: dict[str, np.ndarray[Any, Any]]) -> tuple[str, list[Any]]:
    """One system shared-memory region per input holding its data, registered with the server."""
    import tritonclient.grpc as tc
    import tritonclient.utils.shared_memory as shm

    prefix = f"efbench-{os.getpid()}"
    client = tc.InferenceServerClient(url=url)
    handles = []
    for name, array in inputs.items():
        region = f"{prefix}-{name}"
        handle = shm.create_shared_memory_region(region, f"/{region}", array.nbytes)
        shm.set_shared_memory_region(handle, [np.ascontiguousarray(array)])
        client.unregister_system_shared_memory(region)
        client.register_system_shared_memory(region, f"/{region}", array.nbytes)
        handles.append(handle)
    return prefix, handles


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench._triton_load")
    parser.add_argument("--protocol", choices=("grpc", "http"), default="grpc")
    parser.add_argument("--url", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--input", action="append", required=True, metavar="NAME=FILE.npy")
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--shm", action="store_true", help="inputs travel in system shared memory (gRPC only)")
    args = parser.parse_args()
    inputs = {}
    for item in args.input:
        name, _, path = item.partition("=")
        inputs[name] = np.load(path)
    shm_prefix, handles = _register_shm(args.url, inputs) if args.shm else ("", [])
    make = _grpc_client if args.protocol == "grpc" else _http_client
    clock = time.perf_counter
    begin = end = 0.0
    latencies: list[list[float]] = [[] for _ in range(args.threads)]
    calls_made = [0] * args.threads
    errors: list[str] = []
    # Each thread makes its own client (tritonclient.http's greenlets belong to the thread that made them) and
    # calls once (connected and warm) before the clock starts.
    ready = threading.Barrier(args.threads + 1)
    go = threading.Event()  # set once the window's times are

    def worker(i: int) -> None:
        mine = latencies[i]
        try:
            call = make(args.url, args.model, inputs, shm_prefix)
            call()
        except Exception as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
            ready.abort()
            return
        ready.wait()
        go.wait()
        try:
            while (t0 := clock()) < end:
                call()
                calls_made[i] += 1
                t1 = clock()
                if begin <= t1 <= end:
                    mine.append((t1 - t0) * 1e6)
        except Exception as exc:  # reported, not raised: the caller reads the JSON
            errors.append(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(args.threads)]
    for t in threads:
        t.start()
    with contextlib.suppress(threading.BrokenBarrierError):  # a client could not connect: reported below
        ready.wait()
    begin = clock() + args.warmup
    end = begin + args.seconds
    go.set()
    cpu_at: dict[str, float] = {}

    def cpu_marks() -> None:
        time.sleep(max(0.0, begin - clock()))
        cpu_at["begin"] = time.process_time()
        time.sleep(max(0.0, end - clock()))
        cpu_at["end"] = time.process_time()

    marker = threading.Thread(target=cpu_marks)
    marker.start()
    for t in [*threads, marker]:
        t.join()
    if handles:
        import tritonclient.utils.shared_memory as shm

        for handle in handles:
            shm.destroy_shared_memory_region(handle)
    flat = [v for mine in latencies for v in mine]
    json.dump(
        {
            "completed": len(flat),
            "calls": sum(calls_made) + args.threads,  # warm-up included: what the server's CPU time covers
            "seconds": args.seconds,
            "latency_us": flat,
            "client_cpu_s": cpu_at.get("end", 0.0) - cpu_at.get("begin", 0.0),
            "errors": errors[:5],
        },
        sys.stdout,
    )
    sys.stdout.write("\n")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
