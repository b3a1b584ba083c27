"""A device in its own process: an MqttLink on an asyncio loop publishing telemetry until it is killed.

    python -m tests.edge_runtime.sync.device_process mqtt://127.0.0.1:PORT cam-1 [--interval 0.05]

Prints "connected" once the link is up. Tests kill it with SIGKILL to see the broker publish its last will.
Each message carries one model version ("digits" 1): 10 requests, 1 error, p50/p95/p99 = 1/2/3 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

from edge_runtime.config import MqttSection
from edge_runtime.sync.mqtt import MqttLink
from edgefleet.proto.edgefleet.v1.state_pb2 import MODEL_ROLE_ACTIVE
from edgefleet.proto.edgefleet.v1.telemetry_pb2 import LatencySummary, ModelVersionTelemetry, Telemetry


def telemetry(device_id: str, seq: int, agent_start_ms: int, window_s: float) -> Telemetry:
    return Telemetry(
        device_id=device_id,
        timestamp_ms=time.time_ns() // 1_000_000,
        window_s=window_s,
        seq=seq,
        agent_start_ms=agent_start_ms,
        models=[
            ModelVersionTelemetry(
                name="digits",
                version=1,
                role=MODEL_ROLE_ACTIVE,
                requests=10,
                errors=1,
                inferences=20,
                latency=LatencySummary(p50_ms=1.0, p95_ms=2.0, p99_ms=3.0),
                mean_batch_size=2.0,
                cpu_seconds=0.01,
            )
        ],
    )


async def run(url: str, device_id: str, interval: float) -> None:
    loop = asyncio.get_running_loop()
    link = MqttLink(MqttSection(url=url, keepalive_s=5), device_id, loop)
    link.start()
    started = time.time_ns() // 1_000_000
    announced = False
    seq = 0
    while True:
        seq += 1
        link.publish_telemetry(telemetry(device_id, seq, started, interval).SerializeToString())
        if link.connected and not announced:
            print("connected", flush=True)
            announced = True
        await asyncio.sleep(interval)  # the device's own pace, not a test's synchronisation


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("device_id")
    parser.add_argument("--interval", type=float, default=0.05)
    args = parser.parse_args()
    asyncio.run(run(args.url, args.device_id, args.interval))


if __name__ == "__main__":
    sys.exit(main())


class DeviceProcess:
    """Runs this module as a child process (the test's side)."""

    def __init__(self, url: str, device_id: str, interval: float = 0.05) -> None:
        import subprocess
        from pathlib import Path

        root = Path(__file__).resolve().parents[3]
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.edge_runtime.sync.device_process",
                url,
                device_id,
                "--interval",
                str(interval),
            ],
            cwd=root,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def wait_connected(self, timeout: float = 20.0) -> None:
        """Blocks until the child prints "connected" (its stdout line), or fails with its stderr."""
        import selectors

        assert self.process.stdout is not None
        with selectors.DefaultSelector() as selector:
            selector.register(self.process.stdout, selectors.EVENT_READ)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if selector.select(max(0.0, deadline - time.monotonic())):
                    line = self.process.stdout.readline()
                    if line.strip() == "connected":
                        return
                    if not line:
                        break
        # Its stderr says why; read before kill() closes the pipes (reading after hid the reason behind a
        # "closed file" error).
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)
        err = self.process.stderr.read() if self.process.stderr else ""
        code = self.process.returncode
        self.kill()
        raise AssertionError(f"the device process did not connect within {timeout}s (exit {code}): {err[-2000:]}")

    def kill(self) -> None:
        """SIGKILL: no clean close, no offline message; the broker's last will says offline."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)
        for stream in (self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()
