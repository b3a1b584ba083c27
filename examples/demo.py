"""The end-to-end demo behind `make demo`: a cloud-sync and three edge-agents doing real inference.

Everything runs as real processes under build/demo: cloud-sync (SQLite store), a Mosquitto broker for
telemetry and presence when one is installed, and three agents serving digits and mobilenet-bench to
"apps" over their Unix sockets. The apps classify held-out digits and ask to keep the results; the agents
upload them; fleetctl shows them arriving in the cloud store, exactly once, with the counts reconciled.
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from edge_runtime.kserve import KServeClient
from models.build import digits_holdout

ROOT = Path(__file__).resolve().parent.parent
DEVICES = ("cam-1", "cam-2", "cam-3")


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def toml(data: dict[str, dict[str, Any]]) -> str:
    return "\n".join(f"[{s}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in kv.items()) for s, kv in data.items())


class Proc:
    """A program of ours in the background, its JSON log in a file; waits for a named log event."""

    def __init__(self, argv: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.log = log
        self.proc = subprocess.Popen(
            argv, stdout=log.open("wb"), stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, **(env or {})}
        )

    def wait_event(self, name: str, timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.log.read_text(errors="replace").splitlines():
                if f'"{name}"' in line:
                    event: dict[str, Any] = json.loads(line)
                    return event
            if self.proc.poll() is not None:
                raise SystemExit(f"{self.log.name}: exited before {name}; see {self.log}")
            time.sleep(0.05)
        raise SystemExit(f"{self.log.name}: no {name} within {timeout} s; see {self.log}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=30)


def run(argv: list[str], **kwargs: Any) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True, cwd=ROOT, **kwargs).stdout


def start_broker(workdir: Path) -> tuple[Proc | None, str]:
    mosquitto = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else "")
    if not mosquitto:
        print("no mosquitto installed: telemetry and presence are skipped (results still flow over gRPC)")
        return None, ""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    conf = workdir / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_queued_messages 0\n")
    broker = Proc([mosquitto, "-c", str(conf)], workdir / "mosquitto.log")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return broker, f"mqtt://127.0.0.1:{port}"
        time.sleep(0.05)
    raise SystemExit("mosquitto did not start")


def app(socket_path: Path, pixels: np.ndarray[Any, Any]) -> tuple[int, float, int]:
    """One app on a device: classify every held-out digit, asking to keep each result."""
    latencies: list[float] = []
    kept = 0
    predictions = []
    with KServeClient(f"unix:{socket_path}") as client:
        for i in range(len(pixels)):
            started = time.perf_counter()
            reply = client.infer(
                "digits", {"pixels": pixels[i : i + 1]}, keep=True, request_id=f"{socket_path.stem}-{i}"
            )
            latencies.append(time.perf_counter() - started)
            kept += reply.parameters.get("edgefleet.kept") is True
            predictions.append(int(reply.outputs["probabilities"].argmax()))
    correct = int(np.sum(np.array(predictions) == digits_holdout()[1]))
    return correct, statistics.median(latencies), kept


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, default=ROOT / "build" / "models", help="built model packages")
    parser.add_argument("--workdir", type=Path, default=ROOT / "build" / "demo", help="demo state (recreated)")
    args = parser.parse_args()
    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)
    py = sys.executable
    procs: list[Proc] = []
    try:
        say("cloud-sync (SQLite store) and a broker")
        broker, mqtt_url = start_broker(args.workdir)
        procs += [broker] if broker else []
        cs_conf = args.workdir / "cloud-sync.toml"
        cs_conf.write_text(
            toml(
                {
                    "server": {"data_dir": str(args.workdir / "cloud")},
                    "grpc": {"listen": "127.0.0.1:0"},
                    "http": {"listen": "127.0.0.1:0"},
                    "mqtt": {"url": mqtt_url},
                }
            )
        )
        cloud = Proc([py, "-m", "cloud_sync.cli", "run", "--config", str(cs_conf)], args.workdir / "cloud-sync.log")
        procs.append(cloud)
        ready = cloud.wait_event("cloud_sync.ready")
        admin = run([py, "-m", "cloud_sync.cli", "admin-token", "--config", str(cs_conf)]).strip()
        fleet_env = {**os.environ, "FLEETCTL_URL": str(ready["http"]), "FLEETCTL_TOKEN": admin, "COLUMNS": "140"}
        fleetctl = [py, "-m", "cloud_sync.fleetctl"]
        print(f"cloud-sync: devices on {ready['grpc']}, admin API on {ready['http']}")

        say(f"{len(DEVICES)} devices: register, install models, start edge-agent")
        sockets = []
        for device in DEVICES:
            home = args.workdir / device
            home.mkdir()
            token = run([*fleetctl, "devices", "add", device, "--labels", "site=demo"], env=fleet_env).strip()
            (home / "device-token").write_text(token + "\n")
            sockets.append(home / f"{device}.sock")
            conf = home / "edge-agent.toml"
            conf.write_text(
                toml(
                    {
                        "agent": {"data_dir": str(home / "data")},
                        "server": {"unix_socket": str(sockets[-1]), "tcp_address": "", "metrics_address": ""},
                        "engine": {"backend": "auto", "intra_op_threads": 1},
                        "upload": {"interval_s": 0.2},
                        "telemetry": {"interval_s": 1.0},
                        "cloud": {
                            "grpc_target": str(ready["grpc"]),
                            "device_id": device,
                            "token_file": str(home / "device-token"),
                        },
                        "mqtt": {"url": mqtt_url},
                    }
                )
            )
            for package in ("digits/1", "mobilenet-bench/1"):
                run([py, "-m", "edge_runtime.agent.cli", "install", str(args.models / package), "--config", str(conf)])
            procs.append(Proc([py, "-m", "edge_runtime.agent.cli", "run", "--config", str(conf)], home / "agent.log"))
        for proc, device in zip(procs[-len(DEVICES) :], DEVICES, strict=True):
            event = proc.wait_event("agent.ready")
            print(f"{device}: ready in {event['seconds']} s serving {event['models']}")

        say("apps classify the held-out digits on every device, keeping each result")
        pixels = digits_holdout()[0]
        started = time.perf_counter()
        with ThreadPoolExecutor(len(sockets)) as pool:
            outcomes = list(pool.map(lambda s: app(s, pixels), sockets))
        for device, (correct, p50, kept) in zip(DEVICES, outcomes, strict=True):
            print(f"{device}: accuracy {correct / len(pixels):.3f}, p50 {p50 * 1e3:.2f} ms, {kept} results kept")
        print(f"{len(pixels) * len(sockets)} requests in {time.perf_counter() - started:.1f} s")
        with KServeClient(f"unix:{sockets[0]}") as client:
            try:
                client.infer("digits", {"pixels": np.zeros((1, 64), np.float64)})
            except grpc.RpcError as exc:
                print(f"a bad request gets its own error: {exc.code().name}: {exc.details()}")

        say("the results arrive in the cloud store (fleetctl results tail)")
        want = len(pixels)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            shown = [json.loads(run([*fleetctl, "--json", "devices", "show", d], env=fleet_env)) for d in DEVICES]
            if all(s["uplink"]["stored"] >= want for s in shown):
                break
            time.sleep(0.2)
        print(run([*fleetctl, "results", "tail", "--last", "5"], env=fleet_env), end="")
        for s in shown:
            up = s["uplink"]
            print(
                f"{s['device_id']}: stored {up['stored']} + evicted {up['evicted']} + rejected {up['rejected']} = "
                f"produced {up['device_produced']} (duplicates ignored: {up['duplicates_total']})"
            )
        if mqtt_url:
            say("telemetry and presence (MQTT)")
            print(run([*fleetctl, "devices", "list"], env=fleet_env), end="")
            print(run([*fleetctl, "devices", "show", DEVICES[0]], env=fleet_env), end="")
    finally:
        say("stopping (SIGTERM: each program drains and exits)")
        codes = [p.stop() for p in reversed(procs)]
        print(f"exit codes {codes}; logs in {os.path.relpath(args.workdir)}")
    return 0 if all(c == 0 for c in codes) else 1


if __name__ == "__main__":
    sys.exit(main())
