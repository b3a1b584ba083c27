"""Control fan-out: one policy change to N devices, until every device's report of it is stored in the cloud.

Ours: a real cloud-sync process (SQLite, its MQTT control link) and a Mosquitto this benchmark starts (its
own config: no connection limit, the queue settings of deploy/mosquitto/edgefleet.conf). N devices are
registered directly in the cloud store (one transaction) with the label `bench=control-fanout`, and N hollow
devices (bench/hollow.py, in a child process: paho's external-loop API on one selector, no thread per
device) connect as them. A round is `PUT /v1/policies/bench-control-fanout` with a new
`telemetry.interval_s`: the clock starts before the PUT (cloud-sync's reconciler recomputes and commits every
device's desired state, its control link publishes them retained QoS 1, each hollow device answers with a
retained QoS 1 ReportedState, cloud-sync stores the reports in batches) and stops when the cloud store holds,
for every device, a desired state issued after the start and a reported generation at least as high (this
process polls the SQLite file read-only every 50 ms). Per round also: when every desired state was
committed, when the last device received its state (the hollow fleet's clock), and the CPU seconds of
cloud-sync, Mosquitto and the hollow fleet (psutil), per device.
Raw: the same broker and hollow fleet, cloud-sync stopped; one paho client here publishes N prepared
DesiredStates (retained, QoS 1) and a paho subscriber here (the same shared-subscription form, Receive
Maximum 65535) counts the N reports: the floor the broker, paho and the hollow devices set, with no
database, reconciler or checks. Raw rounds run after ours (a raw state's generation would make the devices
ignore cloud-sync's lower ones), all in the same run.
Targets (the issue's, on this 2-core machine): 1 000 devices in < 10 s, 10 000 in < 60 s. `make bench` runs
1 000; `python -m bench.bench_control_fanout --devices 10000` runs the large one.
"""

from __future__ import annotations

import argparse
import getpass
import importlib.metadata
import json
import os
import secrets
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import psutil
from paho.mqtt.client import Client, MQTTMessage
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from bench._harness import Options, Report, Target, median
from bench.hollow import HollowProcess, device_ids, raise_fd_limit
from edgefleet.proto.edgefleet.v1.state_pb2 import DesiredState, ReportedState

__all__ = ["run"]

NAME = "control_fanout"
PREFIX = "edgefleet/v1"
LABELS = {"bench": "control-fanout"}
POLICY = "bench-control-fanout"
DEVICE_PREFIX = "hollow-"
RECEIVE_MAXIMUM = 65535
POLL_S = 0.05  # the cloud store is polled this often (each poll reads N rows: coarser would blur short runs)
# The goals: (devices up to, seconds).
GOALS = ((1_000, 10.0), (10_000, 60.0))


def goal_seconds(n: int) -> float:
    """The goal for `n` devices: 10 s up to 1 000, 60 s up to 10 000, proportionally beyond."""
    for devices, seconds in GOALS:
        if n <= devices:
            return seconds
    return GOALS[-1][1] * n / GOALS[-1][0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def _mosquitto(directory: Path) -> Iterator[tuple[int, int]]:
    """(port, pid) of a broker on loopback: no connection limit, the deployed queue settings, no persistence."""
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    deploy = Path(__file__).resolve().parents[1] / "deploy" / "mosquitto" / "edgefleet.conf"
    queue = [line for line in deploy.read_text().splitlines() if line.startswith("max_queued_")]
    port = _free_port()
    conf = directory / "mosquitto.conf"
    lines = [f"listener {port} 127.0.0.1", "allow_anonymous true", "max_connections -1", "log_dest none", *queue]
    if os.geteuid() == 0:
        lines.append(f"user {getpass.getuser()}")  # else it switches to `mosquitto`, who cannot read our files
    conf.write_text("\n".join(lines) + "\n")
    process = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait(lambda: _accepts(port) or process.poll() is not None, 10, f"mosquitto to listen on port {port}")
        if process.poll() is not None:
            raise RuntimeError(f"mosquitto exited with {process.returncode} (config {conf})")
        yield port, process.pid
    finally:
        process.kill()
        process.wait(10)


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


def _wait(condition: Callable[[], object], timeout: float, what: str, poll: float = 0.01) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{NAME}: timed out after {timeout:g} s waiting for {what}")
        time.sleep(poll)


def _cpu(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def register_devices(database: Path, ids: Sequence[str], labels: Mapping[str, str] = LABELS) -> None:
    """The devices, labelled `labels`, in the cloud store in one transaction (as many enrollments would leave
    them)."""
    from cloud_sync.store import open_database
    from cloud_sync.store.database import now_ms
    from cloud_sync.store.devices import insert_device

    db = open_database(f"sqlite:///{database}")
    try:
        created = now_ms()

        def insert(conn: Any) -> None:
            for device_id in ids:
                insert_device(conn, device_id, dict(labels), f"efd_{secrets.token_urlsafe(32)}", created)

        db.write(insert)
    finally:
        db.close()


class CloudStore:
    """Read-only polls of cloud-sync's SQLite file: how many devices have a new desired state / reported it."""

    def __init__(self, database: Path) -> None:
        self._conn = sqlite3.connect(f"file:{database}?mode=ro", uri=True, check_same_thread=False)

    def progress(self, since_ms: int) -> tuple[int, int]:
        """(desired states issued at or after since_ms, of which reported at that generation or later)."""
        row = self._conn.execute(
            "SELECT COUNT(*), COALESCE(SUM(r.generation >= d.generation), 0) FROM desired_state d "
            "LEFT JOIN reported_state r ON r.device_id = d.device_id "
            "WHERE d.issued_at_ms >= ? AND d.device_id LIKE ?",
            (since_ms, f"{DEVICE_PREFIX}%"),
        ).fetchone()
        return int(row[0]), int(row[1])

    def close(self) -> None:
        self._conn.close()


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def ours_round(
    http: httpx.Client, store: CloudStore, fleet: HollowProcess, pids: dict[str, int], n: int, value: float
) -> dict[str, float]:
    """One policy change to every device; seconds and CPU per device until all reports are stored."""
    timeout = 10 * goal_seconds(n)
    cpu = {name: _cpu(pid) for name, pid in pids.items()}
    cpu["hollow"] = fleet.stats().cpu_s
    start_wall = time.time()
    since = _now_ms() - 1
    start = time.perf_counter()
    response = http.put(
        f"/v1/policies/{POLICY}",
        json={"selector": LABELS, "priority": 0, "document": {"telemetry": {"interval_s": value}}},
    )
    if response.status_code != 200:
        raise RuntimeError(f"{NAME}: PUT /v1/policies/{POLICY} answered {response.status_code}: {response.text}")
    put_s = time.perf_counter() - start
    written_s = float("nan")
    deadline = start + timeout
    while True:
        written, reported = store.progress(since)
        now = time.perf_counter()
        if written >= n and written_s != written_s:  # NaN: not yet seen
            written_s = now - start
        if reported >= n:
            break
        if now > deadline:
            raise RuntimeError(
                f"{NAME}: after {timeout:g} s the cloud store holds {written} of {n} new desired states and "
                f"{reported} reports of them (is cloud-sync's MQTT control link running? see its log)"
            )
        time.sleep(POLL_S)
    stored_s = time.perf_counter() - start
    hollow = fleet.stats()
    used = {name: _cpu(pid) - cpu[name] for name, pid in pids.items()}
    used["hollow"] = hollow.cpu_s - cpu["hollow"]
    return {
        "seconds": stored_s,
        "put_s": put_s,
        "desired_committed_s": written_s,
        "last_delivered_s": max(0.0, hollow.last_desired_at - start_wall),
        **{f"{name}_cpu_us_per_device": seconds / n * 1e6 for name, seconds in used.items()},
    }


class RawCloud:
    """The raw baseline's cloud side: a paho publisher and a paho shared subscriber counting reports."""

    def __init__(self, port: int, rep: int) -> None:
        self._lock = threading.Lock()
        self._seen: set[str] = set()
        self._generation = 0
        self._done = threading.Event()
        self._n = 0
        subscribed = threading.Event()
        self.sub = _client(f"bench-raw-sub-{rep}")
        self.sub.on_message = self._on_message
        self.sub.on_subscribe = lambda *_: subscribed.set()
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.ReceiveMaximum = RECEIVE_MAXIMUM
        self.sub.connect("127.0.0.1", port, properties=props)
        self.sub.loop_start()
        self.sub.subscribe(f"$share/bench-raw/{PREFIX}/devices/+/reported", qos=1)
        self.pub = _client(f"bench-raw-pub-{rep}")
        self.pub.connect("127.0.0.1", port)
        self.pub.loop_start()
        _wait(lambda: subscribed.is_set() and self.pub.is_connected(), 10, "the raw clients to connect")

    def _on_message(self, _c: Client, _u: object, message: MQTTMessage) -> None:
        try:
            state = ReportedState.FromString(bytes(message.payload))
        except Exception:
            return
        with self._lock:
            if state.generation >= self._generation and self._generation:
                self._seen.add(state.device_id)
                if len(self._seen) >= self._n:
                    self._done.set()

    def round(self, ids: Sequence[str], generation: int, timeout: float) -> float:
        """Seconds from the first publish until every device's report of `generation` arrived."""
        payloads = [
            DesiredState(
                device_id=device_id,
                generation=generation,
                models=[],
                policy_json=json.dumps({"telemetry": {"interval_s": 10.0}}),
                policy_hash="raw",
                issued_at_ms=_now_ms(),
            ).SerializeToString()
            for device_id in ids
        ]
        topics = [f"{PREFIX}/devices/{device_id}/desired" for device_id in ids]
        with self._lock:
            self._seen.clear()
            self._generation, self._n = generation, len(ids)
            self._done.clear()
        start = time.perf_counter()
        for topic, payload in zip(topics, payloads, strict=True):
            self.pub.publish(topic, payload, qos=1, retain=True)
        if not self._done.wait(timeout):
            raise RuntimeError(f"{NAME}: raw: {len(self._seen)} of {len(ids)} reports arrived in {timeout:g} s")
        return time.perf_counter() - start

    def close(self) -> None:
        for client in (self.pub, self.sub):
            client.disconnect()
            client.loop_stop()


def _client(client_id: str) -> Client:
    return Client(
        callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id, protocol=MQTTProtocolVersion.MQTTv5
    )


def _start_cloud(work: Path, port: int) -> tuple[Any, str, str]:
    """cloud-sync on the bench's database and broker: (process, admin API url, admin token)."""
    from cloud_sync.process import admin_token
    from tests.processes import CloudSyncProcess, toml_text

    config = work / "cloud-sync.toml"
    config.write_text(
        toml_text(
            {
                "server": {"data_dir": str(work / "cloud")},
                "grpc": {"listen": "127.0.0.1:0"},
                "http": {"listen": "127.0.0.1:0"},
                "mqtt": {"url": f"mqtt://127.0.0.1:{port}", "topic_prefix": PREFIX, "client_id": "cloud-sync-bench"},
            }
        )
    )
    cloud = CloudSyncProcess(config)
    try:
        ready = cloud.wait_ready(60)
    except BaseException:
        cloud.kill()
        raise
    return cloud, str(ready["http"]), admin_token(work / "cloud")


def measure(n: int, rounds: int, raw_rounds: int, shards: int) -> dict[str, Any]:
    """Everything one run measures: ours (rounds) and raw (raw_rounds) on the same broker and hollow fleet."""
    limit = raise_fd_limit(2 * n + 1024)
    if limit < n + 256:
        raise RuntimeError(
            f"{NAME}: {n} devices need about {n + 256} open files in the broker and the hollow fleet, but the "
            f"hard limit is {limit}: raise it (ulimit -Hn) or run fewer --devices"
        )
    ids = device_ids(n, DEVICE_PREFIX)
    with tempfile.TemporaryDirectory(prefix="efb-fanout-") as tmp, _mosquitto(Path(tmp)) as (port, broker_pid):
        work = Path(tmp)
        (work / "cloud").mkdir()
        database = work / "cloud" / "cloud-sync.db"
        began = time.perf_counter()
        register_devices(database, ids)
        registered_s = time.perf_counter() - began
        began = time.perf_counter()
        with HollowProcess("127.0.0.1", port, ids, topic_prefix=PREFIX, shards=shards, timeout=30 + n / 100) as fleet:
            connected_s = time.perf_counter() - began
            cloud, url, token = _start_cloud(work, port)
            store = CloudStore(database)
            try:
                pids = {"cloud_sync": cloud.pid, "mosquitto": broker_pid}
                with httpx.Client(base_url=url, headers={"authorization": f"Bearer {token}"}, timeout=600) as http:
                    warmup = ours_round(http, store, fleet, pids, n, 10.0)  # first states; imports; page cache
                    ours = [ours_round(http, store, fleet, pids, n, 10.0 + r + 1) for r in range(rounds)]
            finally:
                store.close()
                cloud.signal()
                cloud.finish(60)
            raw_cloud = RawCloud(port, 0)
            try:
                raw_cpu = time.process_time()
                raw = [raw_cloud.round(ids, 10**9 + r, 10 * goal_seconds(n)) for r in range(raw_rounds + 1)][1:]
                raw_cpu = time.process_time() - raw_cpu
            finally:
                raw_cloud.close()
            hollow = fleet.stats()
    return {
        "registered_s": registered_s,
        "hollow_connected_s": connected_s,
        "warmup": warmup,
        "ours": ours,
        "raw_seconds": raw,
        "raw_cloud_cpu_us_per_device": raw_cpu / ((raw_rounds + 1) * n) * 1e6,
        "hollow": hollow.as_dict(),
    }


def run(options: Options, devices: int | None = None, rounds: int | None = None, shards: int = 1) -> Report:
    n = devices if devices is not None else options.count(1_000, 50)
    rounds = rounds if rounds is not None else options.repeat
    report = Report(
        NAME,
        options,
        {
            "devices": n,
            "rounds": rounds,
            "hollow_shards": shards,
            "ours": "PUT /v1/policies (a new telemetry.interval_s for every device) to a cloud-sync process -> "
            "reconciler -> desired states committed -> MQTT retained QoS 1 -> hollow devices -> reported "
            "states retained QoS 1 -> cloud-sync stores them; clock stops when the cloud store (SQLite, polled "
            f"every {POLL_S * 1000:.0f} ms) holds every device's report of its new generation",
            "raw_baseline": "cloud-sync stopped; one paho client publishes N prepared DesiredStates (retained, "
            "QoS 1) to the same hollow devices, a paho shared subscriber counts their N reports",
            "hollow_devices": "bench/hollow.py: paho external-loop API, one selector thread per shard process",
            "broker": "mosquitto on loopback, max_connections -1, queue settings of deploy/mosquitto/edgefleet.conf",
            "statistic": "median over rounds after a warm-up round (the devices' first desired state)",
            "paho_mqtt": importlib.metadata.version("paho-mqtt"),
            "cores": os.cpu_count(),
        },
    )
    result = measure(n, rounds, rounds, shards)
    ours = result["ours"]
    seconds = median([r["seconds"] for r in ours])
    raw = median(result["raw_seconds"])
    per_device = {
        name: median([r[f"{name}_cpu_us_per_device"] for r in ours]) for name in ("cloud_sync", "mosquitto", "hollow")
    }
    report.measurements = result
    report.say(
        f"{n} devices ({shards} hollow shard(s), connected in {result['hollow_connected_s']:.1f} s): a policy change "
        f"until every report is stored {seconds:.2f} s (desired committed at "
        f"{median([r['desired_committed_s'] for r in ours]):.2f} s, last device received it at "
        f"{median([r['last_delivered_s'] for r in ours]):.2f} s); raw paho round trip {raw:.2f} s"
    )
    report.say(
        "CPU per device: cloud-sync {cloud_sync:.0f} us, mosquitto {mosquitto:.0f} us, hollow devices {hollow:.0f} us;"
        " raw cloud side {raw:.0f} us".format(**per_device, raw=result["raw_cloud_cpu_us_per_device"])
    )
    report.ratio("fanout_seconds_vs_raw", seconds, raw, f"seconds until {n} reports are in")
    report.ratio(
        "cloud_cpu_per_device_vs_raw",
        per_device["cloud_sync"],
        result["raw_cloud_cpu_us_per_device"],
        "cloud side CPU per device",
    )
    report.target(
        Target(
            f"policy change to {n} devices until every report is stored",
            seconds,
            goal_seconds(n),
            "s",
            "lower",
            how=f"median of {rounds} rounds after a warm-up: PUT /v1/policies -> every device's report of its new "
            "generation in cloud-sync's SQLite store; hollow devices answer at once",
            reason="see the phases in measurements: reconciler and commits (desired_committed_s), publishing "
            "(last_delivered_s), report storage (the rest); the cloud-sync CPU per device bounds it on 2 cores "
            "shared with mosquitto and the hollow fleet",
        )
    )
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_control_fanout", description=__doc__.split("\n")[0])
    parser.add_argument("--devices", type=int, default=1_000, help="hollow devices (default 1000)")
    parser.add_argument("--rounds", type=int, default=3, help="measured policy changes (and raw rounds)")
    parser.add_argument("--shards", type=int, default=1, help="hollow-device processes (default 1)")
    parser.add_argument("--results", type=Path, default=None, help="where the JSON goes (default bench/results)")
    args = parser.parse_args(argv)
    if args.devices < 1 or args.rounds < 1 or not 1 <= args.shards <= args.devices:
        print(f"{parser.prog}: --devices and --rounds must be >= 1, --shards within 1..--devices", file=sys.stderr)
        return 2
    from bench._harness import RESULTS_DIR
    from edgefleet.logs import configure_logging

    configure_logging("warning", sys.stderr)
    options = Options(Path("build/models"), repeat=args.rounds, results=args.results or RESULTS_DIR)
    run(options, devices=args.devices, rounds=args.rounds, shards=args.shards).write()
    return 0


if __name__ == "__main__":
    sys.exit(main())
