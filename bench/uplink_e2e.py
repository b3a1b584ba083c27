"""End to end: records in the agent's outbox -> uploader -> cloud-sync's Uplink -> cloud store (SQLite, PostgreSQL).

Ours: an outbox pre-filled with N records (200-byte payloads) drained by the agent's real Uploader into a
real `cloud-sync run` process; the clock stops when the outbox's acked_seq reaches its last seq (everything
stored, acknowledged and deleted). Once on the default SQLite store (the target), once on PostgreSQL (a schema
of its own in database `test` at 127.0.0.1:5432, dropped after; skipped, saying why, when unreachable).
Baseline ("raw grpc stream"): the same ResultBatch messages streamed by a bare grpc.aio client to a bare
grpc.aio server that only counts them, in the same run. Target: >= 100,000 records/s on SQLite; the ratio says
how much of the transport's rate survives storing exactly once. bench/backlog_drain.py reuses the parts.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from bench._harness import Options, Report, Target, interleaved, median
from edge_runtime.config import CloudSection, UploadPolicy
from edge_runtime.outbox import Outbox, OutboxRecord
from edge_runtime.sync.uplink import Uploader
from edgefleet.proto.edgefleet.v1 import results_pb2, services_pb2, services_pb2_grpc
from tests.processes import CLOUD_SYNC, REPO_ROOT, CloudSyncProcess, toml_text

__all__ = ["CloudUnderTest", "drain", "fill_outbox", "postgres_schema", "raw_stream", "read_messages", "run"]

TARGET_RECORDS_PER_S = 100_000
PAYLOAD = os.urandom(200)
BATCH = 1000
KIND = results_pb2.RECORD_KIND_RESULT
POSTGRES_CONNINFO = "host=127.0.0.1 port=5432 dbname=test user=postgres connect_timeout=3"
POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def fill_outbox(path: Path, n: int) -> Outbox:
    """An outbox holding `n` records of PAYLOAD, appended through its real writer (checksums and all)."""
    outbox = Outbox.open(path, max_bytes=1 << 40, max_age_s=0)
    now = time.time_ns() // 1_000_000
    last = None
    for i in range(n):
        last = outbox.append(OutboxRecord(now + i, "digits", 1, 100, KIND, "inference.ModelInferResponse", PAYLOAD))
        if i % 10_000 == 9_999:
            last.result(timeout=600)  # stay under the append queue's bound
    assert last is not None
    last.result(timeout=600)
    return outbox


def read_messages(outbox: Outbox, limit: int) -> list[results_pb2.ResultBatch]:
    """The outbox's first batches of BATCH records, as the uploader would send them (up to `limit` records)."""
    messages: list[results_pb2.ResultBatch] = []
    taken = 0
    while taken < limit:
        after = messages[-1].through_seq if messages else 0
        batch = outbox.read_batch(BATCH, 1 << 30, after_seq=after)
        if batch.empty:
            break
        messages.append(batch.message)
        taken += len(batch.records)
    return messages


async def drain(
    outbox: Outbox, target: str, token: str, *, timeout: float, tick: Callable[[], None] | None = None
) -> float:
    """Seconds the real Uploader takes to get everything in `outbox` stored and acknowledged; TimeoutError past
    `timeout` (a benchmark that hangs measures nothing). `tick` is called at each poll."""
    policy = UploadPolicy(batch_max_records=BATCH, interval_s=0.01)
    uploader = Uploader(outbox, CloudSection(grpc_target=target), policy, token)
    last = outbox.counters().last_seq
    started = time.perf_counter()
    task = asyncio.ensure_future(uploader.run())
    try:
        while outbox.counters().acked_seq < last:
            if time.perf_counter() - started > timeout:
                raise TimeoutError(f"the outbox was not drained in {timeout:.0f} s: {outbox.counters()}")
            if task.done():
                task.result()
            if tick is not None:
                tick()
            await asyncio.sleep(0.005)  # polling a counter; the work happens on the uploader's task
        return time.perf_counter() - started
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


class _CountingUplink:
    def __init__(self) -> None:
        self.records = 0

    async def Upload(self, batches: Any, context: Any) -> results_pb2.UploadAck:
        async for batch in batches:
            self.records += len(batch.records)
        return results_pb2.UploadAck(acked_seq=self.records)


async def raw_stream(messages: list[results_pb2.ResultBatch], rounds: int = 1) -> float:
    """Seconds for a bare grpc.aio client to stream `messages` `rounds` times to a bare server (16 a stream)."""
    from edgefleet.rpc import add_service

    server = grpc.aio.server(options=[("grpc.max_receive_message_length", -1)])
    add_service(server, services_pb2, "Uplink", _CountingUplink())
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = services_pb2_grpc.UplinkStub(channel)
            started = time.perf_counter()
            for _ in range(rounds):
                for i in range(0, len(messages), 16):
                    call = stub.Upload()
                    for message in messages[i : i + 16]:
                        await call.write(message)
                    await call.done_writing()
                    await call
            return time.perf_counter() - started
    finally:
        await server.stop(0)


@dataclass
class CloudUnderTest:
    """A real `cloud-sync run` on loopback, its config file, and its gRPC target."""

    config: Path
    process: CloudSyncProcess
    target: str

    def add_device(self, device_id: str) -> str:
        """Register `device_id` with `cloud-sync add-device`; returns its token."""
        return subprocess.run(
            [*CLOUD_SYNC, "add-device", device_id, "--config", str(self.config)],
            check=True,
            capture_output=True,
            text=True,
            cwd=REPO_ROOT,
        ).stdout.strip()

    def cpu_seconds(self) -> float:
        """CPU time the cloud-sync process used so far (user + system)."""
        fields = Path(f"/proc/{self.process.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    @classmethod
    @contextmanager
    def running(cls, work: Path, database_url: str = "") -> Iterator[CloudUnderTest]:
        """cloud-sync on a store in `work` (or at `database_url`), stopped afterwards."""
        config = work / "cloud-sync.toml"
        data: dict[str, Any] = {
            "server": {"data_dir": str(work / "cloud")},
            "grpc": {"listen": "127.0.0.1:0"},
            "http": {"listen": "127.0.0.1:0"},
        }
        if database_url:
            data["database"] = {"url": database_url}
        config.write_text(toml_text(data))
        process = CloudSyncProcess(config)
        try:
            ready = process.wait_ready(60)
            yield cls(config, process, str(ready["grpc"]))
        finally:
            process.signal()
            process.finish(30)


@contextmanager
def postgres_schema() -> Iterator[str | None]:
    """A URL of a fresh schema of the test PostgreSQL server, dropped afterwards; None when it is unreachable."""
    try:
        import psycopg

        with psycopg.connect(POSTGRES_CONNINFO, autocommit=True) as conn:
            schema = f"bench_{uuid.uuid4().hex[:12]}"
            conn.execute(f'CREATE SCHEMA "{schema}"')
    except Exception as exc:  # no driver, no server: the row is skipped, saying why
        print(f"[uplink_e2e] PostgreSQL row skipped: {str(exc).strip().splitlines()[0] if str(exc) else exc!r}")
        yield None
        return
    try:
        yield f"{POSTGRES_URL}?options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect(POSTGRES_CONNINFO, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


def _ours(cloud: CloudUnderTest, work: Path, n: int, cpu: dict[str, list[float]]) -> Callable[[], float]:
    devices = iter(range(10**6))

    def ours() -> float:
        device = f"bench-{next(devices)}"
        token = cloud.add_device(device)
        outbox = fill_outbox(work / f"{device}.db", n)
        try:
            cloud_before, device_before = cloud.cpu_seconds(), time.process_time()
            rate = n / asyncio.run(drain(outbox, cloud.target, token, timeout=60 + n / 1000))
            cpu["cloud_us_per_record"].append((cloud.cpu_seconds() - cloud_before) / n * 1e6)
            cpu["device_us_per_record"].append((time.process_time() - device_before) / n * 1e6)
            return rate
        finally:
            outbox.close()

    return ours


def run(options: Options) -> Report:
    n = options.count(100_000, 5_000)
    report = Report("uplink_e2e", options, {"records": n, "payload_bytes": len(PAYLOAD), "batch": BATCH})
    cpu: dict[str, list[float]] = {"cloud_us_per_record": [], "device_us_per_record": []}
    pg_cpu: dict[str, list[float]] = {"cloud_us_per_record": [], "device_us_per_record": []}
    with tempfile.TemporaryDirectory(prefix="ef-bench-") as tmp:
        work = Path(tmp)
        filled = fill_outbox(work / "raw.db", n)
        messages = read_messages(filled, n)
        filled.close()

        def raw() -> float:
            return n / asyncio.run(raw_stream(messages))

        (work / "sqlite").mkdir()
        with CloudUnderTest.running(work / "sqlite") as cloud:
            samples = interleaved(options.repeat, {"ours": _ours(cloud, work / "sqlite", n, cpu), "raw": raw})
        pg_samples: dict[str, list[float]] = {}
        with postgres_schema() as url:
            if url is not None:
                (work / "pg").mkdir()
                with CloudUnderTest.running(work / "pg", url) as cloud:
                    pg_repeat = max(1, min(options.repeat, 3))
                    ours = _ours(cloud, work / "pg", n, pg_cpu)
                    pg_samples = interleaved(pg_repeat, {"ours": ours, "raw": raw})
    ours_rate, raw_rate = median(samples["ours"]), median(samples["raw"])
    report.measurements = {
        "ours_records_per_s": samples["ours"],
        "raw_stream_records_per_s": samples["raw"],
        "cpu_us_per_record": cpu,
    }
    report.ratio("ours_vs_raw_stream", ours_rate, raw_rate, "records/s, outbox -> cloud store vs raw grpc stream")
    cloud_us, device_us = median(cpu["cloud_us_per_record"]), median(cpu["device_us_per_record"])
    report.say(f"CPU a record: cloud-sync {cloud_us:.1f} us, device (reader, writer, uploader) {device_us:.1f} us")
    report.target(
        Target(
            "end-to-end outbox -> cloud store (SQLite)",
            ours_rate,
            TARGET_RECORDS_PER_S,
            "records/s",
            "higher",
            how=f"{n} records of {len(PAYLOAD)} B, batches of {BATCH}, real Uploader and cloud-sync process",
            reason=f"CPU on two shared cores: cloud-sync {cloud_us:.1f} us a record (validate + CRC, SQLite insert, "
            f"commit) and the device {device_us:.1f} us (read + CRC into the protobuf, in-doubt mark, ack's "
            f"delete), overlapped; the raw stream alone runs at {raw_rate:,.0f} records/s. Load average at the "
            f"start: {report.load_before[0]:.1f} (other processes take the same cores)",
        )
    )
    if pg_samples:
        _postgres_rows(report, n, pg_samples, pg_cpu)
    report.write()
    return report


def _postgres_rows(report: Report, n: int, samples: dict[str, list[float]], cpu: dict[str, list[float]]) -> None:
    """The PostgreSQL row: measured and compared with the raw stream, without a target of its own (the issue's
    100k records/s is the default store's; PostgreSQL scales by replicas on machines of their own)."""
    ours_rate, raw_rate = median(samples["ours"]), median(samples["raw"])
    report.measurements["postgresql"] = {
        "ours_records_per_s": samples["ours"],
        "raw_stream_records_per_s": samples["raw"],
        "cpu_us_per_record": cpu,
        "how": f"{n} records, one cloud-sync on the local PostgreSQL (COPY into a staging table, then INSERT ... "
        "ON CONFLICT DO NOTHING); the server shares the two cores with the device and cloud-sync",
    }
    report.ratio("postgresql_vs_raw_stream", ours_rate, raw_rate, "records/s, outbox -> PostgreSQL vs raw grpc stream")
    report.say(
        f"PostgreSQL (no target, measured): {ours_rate:,.0f} records/s; CPU a record: cloud-sync "
        f"{median(cpu['cloud_us_per_record']):.1f} us, device {median(cpu['device_us_per_record']):.1f} us"
    )


if __name__ == "__main__":
    import sys

    from bench.__main__ import main

    sys.exit(main(["--only", "uplink_e2e", *sys.argv[1:]]))
