"""Resumable downloads: bytes on the wire per byte of model file when the connection is cut 10 times.

A real cloud-sync (in this process, SQLite in a temporary directory) serves a registered model through
edgefleet.v1.Artifacts; a small TCP proxy in front of it counts the bytes it passes to the client and cuts the
connection after a random number of them, `--cuts` times. The client (a minimal downloader: the device's own is
edge_runtime/control/download.py) keeps what it received and asks again from that offset on a new connection.
Reported: wire bytes / file size with the cuts (goal <= 1.1) and for one uninterrupted stream (the baseline:
gRPC and HTTP/2 framing alone). Writes bench/results/download_resume.json.

    python -m bench.bench_download_resume [--size-mib 64] [--cuts 10] [--seed 1]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import grpc

from cloud_sync.config import config_from_dict
from cloud_sync.process import CloudSync
from cloud_sync.store import DeviceRegistry, open_database
from edgefleet.proto.edgefleet.v1 import services_pb2, services_pb2_grpc
from edgefleet.proto.edgefleet.v1.models_pb2 import ModelRef

__all__ = ["main"]

RESULTS = Path(__file__).parent / "results" / "download_resume.json"
GOAL = 1.1


class CuttingProxy:
    """TCP proxy on its own loop thread: counts server->client bytes; cuts a connection after `budget` of them."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.sent = 0
        self.budget: int | None = None  # for the next connection; None: never cut
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="proxy", daemon=True)
        self._thread.start()
        self.port = asyncio.run_coroutine_threadsafe(self._listen(), self.loop).result()

    async def _listen(self) -> int:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection(*self.target)
        budget, self.budget = self.budget, None

        async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, count: bool) -> None:
            nonlocal budget
            try:
                while data := await reader.read(65536):
                    if count:
                        if budget is not None and len(data) >= budget:
                            data = data[:budget]
                            writer.write(data)
                            self.sent += len(data)
                            await writer.drain()
                            raise ConnectionResetError("cut")
                        if budget is not None:
                            budget -= len(data)
                        self.sent += len(data)
                    writer.write(data)
                    await writer.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                for w in (client_w, server_w):
                    w.transport.abort()

        await asyncio.gather(pump(server_r, client_w, True), pump(client_r, server_w, False))

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self._server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)


def _download(target: str, token: str, name: str, version: int, out: Path) -> tuple[int, int]:
    """One call from the offset `out` holds, on a new channel: (bytes written, total size); raises on a cut."""
    offset = out.stat().st_size if out.exists() else 0
    total = -1
    with grpc.insecure_channel(target) as channel, out.open("ab") as f:
        stub = services_pb2_grpc.ArtifactsStub(channel)
        request = services_pb2.DownloadRequest(model=ModelRef(name=name, version=version), offset=offset)
        for chunk in stub.Download(request, metadata=[("authorization", f"Bearer {token}")], timeout=120):
            total = chunk.total_size
            if chunk.WhichOneof("body") == "data":
                if chunk.offset != offset:
                    raise RuntimeError(f"chunk at {chunk.offset}, file ends at {offset}")
                f.write(chunk.data)
                offset += len(chunk.data)
    return offset, total


def _cloud(workdir: Path) -> tuple[CloudSync, asyncio.AbstractEventLoop, threading.Thread]:
    config = config_from_dict(
        {
            "server": {"data_dir": str(workdir / "data"), "shutdown_grace_s": 1.0},
            "grpc": {"listen": "127.0.0.1:0"},
            "http": {"listen": "127.0.0.1:0"},
        }
    )
    app = CloudSync(config)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_until_complete, args=(app.run(handle_signals=False),), daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not (app.endpoints.grpc_port and app.endpoints.http_port and app.reconciler is not None):
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("cloud-sync did not start")
        time.sleep(0.01)
    return app, loop, thread


def run(size_mib: int, cuts: int, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory(prefix="bench-resume-") as tmp:
        workdir = Path(tmp)
        app, _, thread = _cloud(workdir)
        try:
            assert app.model_registry is not None and app.assignment_store is not None and app.reconciler
            model = rng.randbytes(size_mib * 1024 * 1024)
            sha = hashlib.sha256(model).hexdigest()
            app.model_registry.blobs.put([model], expected_sha256=sha, max_bytes=len(model))
            manifest = {
                "name": "bench",
                "version": 1,
                "inputs": [{"name": "x", "datatype": "FP32", "shape": [1]}],
                "outputs": [{"name": "y", "datatype": "FP32", "shape": [1]}],
                "sha256": sha,
                "size": len(model),
            }
            app.model_registry.register(manifest, int(time.time() * 1000) + 3600_000)
            db = open_database(app.config.database_url)
            token = DeviceRegistry(db).add_device("bench-1")
            db.close()
            app.assignment_store.assign("bench", 1, {})
            app.reconciler.reconcile()
            proxy = CuttingProxy(("127.0.0.1", app.endpoints.grpc_port))
            target = f"127.0.0.1:{proxy.port}"
            try:
                baseline_file = workdir / "baseline.part"
                started = time.monotonic()
                _download(target, token, "bench", 1, baseline_file)
                baseline_s = time.monotonic() - started
                baseline_bytes, proxy.sent = proxy.sent, 0
                assert hashlib.sha256(baseline_file.read_bytes()).hexdigest() == sha
                resumed = workdir / "resumed.part"
                calls, started = 0, time.monotonic()
                for _ in range(cuts):
                    # Cut this connection at a random point of what is left to fetch.
                    held = resumed.stat().st_size if resumed.exists() else 0
                    if held >= len(model):
                        break
                    proxy.budget = rng.randrange(1, len(model) - held + 1)
                    calls += 1
                    try:
                        _download(target, token, "bench", 1, resumed)
                    except grpc.RpcError:
                        continue
                done = resumed.stat().st_size if resumed.exists() else 0
                while done < len(model):
                    calls += 1
                    done, _ = _download(target, token, "bench", 1, resumed)
                resumed_s = time.monotonic() - started
                assert hashlib.sha256(resumed.read_bytes()).hexdigest() == sha, "the resumed file differs"
            finally:
                proxy.close()
            return {
                "file_bytes": len(model),
                "cuts": cuts,
                "calls": calls,
                "wire_bytes_with_cuts": proxy.sent,
                "ratio_with_cuts": proxy.sent / len(model),
                "wire_bytes_baseline": baseline_bytes,
                "ratio_baseline": baseline_bytes / len(model),
                "seconds_with_cuts": round(resumed_s, 3),
                "seconds_baseline": round(baseline_s, 3),
                "goal_ratio": GOAL,
                "met": proxy.sent / len(model) <= GOAL,
            }
        finally:
            app.stop()
            thread.join(30)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_download_resume", description=__doc__)
    parser.add_argument("--size-mib", type=int, default=64, help="model file size (MiB)")
    parser.add_argument("--cuts", type=int, default=10, help="connections cut mid-download")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.size_mib < 1 or args.cuts < 0:
        print("bench_download_resume: --size-mib >= 1 and --cuts >= 0", file=sys.stderr)
        return 2
    from edgefleet.logs import configure_logging

    configure_logging("warning", sys.stderr)
    result = {
        "machine": {"cpus": os.cpu_count(), "host": socket.gethostname()},
        **run(args.size_mib, args.cuts, args.seed),
    }
    print(
        f"download of {result['file_bytes'] / 2**20:.0f} MiB, {result['cuts']} cuts, {result['calls']} calls: "
        f"wire/file {result['ratio_with_cuts']:.4f} (goal <= {GOAL}; uninterrupted {result['ratio_baseline']:.4f}); "
        f"{result['seconds_with_cuts']:.2f} s vs {result['seconds_baseline']:.2f} s"
    )
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["met"] else 1


if __name__ == "__main__":
    sys.exit(main())
