"""A bad rollout at fleet scale: from the gate breach to every touched device back on A, with hollow devices.

Ours: Mosquitto (the control fan-out's broker config), a real cloud-sync process (SQLite, its MQTT control
link and telemetry subscriber, the rollout controller) and N hollow devices (bench/hollow.py, in a child
process) that report converged states and publish telemetry per model version every `telemetry_s`, with one
version made bad (`--bad-kind errors|slow|disagree|fail`). The devices are registered directly in the cloud
store with the label `bench=rollout`; digits v1 and the candidate are pushed through the admin API (random
bytes: a hollow device downloads nothing) and v1 is assigned to every device. Once every device reports v1
and its v1 windows are stored, `POST /v1/rollouts` starts `active:1%,active:10%,active:50%,active:100%` (a
shadow first stage for `disagree`, whose gate only a shadow stage measures). The gate aborts in stage 1; the
figure is the `gate_failed` event's time to the latest `received_at_ms` of the cloud store's reports saying v1
ACTIVE (and no candidate) from every touched device, both on cloud-sync's clock. cloud-sync's CPU seconds
from the rollout's creation until then give devices per cloud-sync core (N / (CPU s / wall s)): its whole
load, the fleet's telemetry ingest included, at this telemetry interval; the same figure is also taken over
three telemetry intervals before the rollout (steady state), since the rollout itself may last a second.
Raw: the same broker and hollow devices, cloud-sync stopped: a paho client publishes the touched devices a
DesiredState naming v1 (retained, QoS 1) and a paho subscriber counts their reports (the control fan-out's
RawCloud): the floor of the same step with no database, reconciler or gate.
Target (the issue's): at most 60 s from the breach to every touched device on v1, 1,000 devices.
`python -m bench.bench_rollout --devices 1000` (the default); bench/results/rollout.json.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.metadata
import json
import os
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx

from bench._harness import Options, Report, Target, median
from bench.bench_control_fanout import RawCloud, _cpu, _mosquitto, register_devices
from bench.hollow import BAD_KINDS, Behaviour, HollowProcess, device_ids, raise_fd_limit
from edgefleet.proto.edgefleet.v1.state_pb2 import MODEL_ROLE_ACTIVE, MODEL_STATE_ACTIVE, ReportedState

__all__ = ["BAD_VERSIONS", "GATES", "GOAL_S", "RolloutRig", "gate_of", "run", "stages_for"]

NAME = "rollout"
PREFIX = "edgefleet/v1"
MODEL = "digits"
LABELS = {"bench": "rollout"}
DEVICE_PREFIX = "hollow-"
GOAL_S = 60.0
# The bad candidates' versions, as models/build.py numbers them (v6, failing requests, is hollow-only).
BAD_VERSIONS = {"disagree": 3, "slow": 4, "fail": 5, "errors": 6}
# The gate that must stop each kind.
_GATE = {
    "errors": "max_error_rate",
    "slow": "max_p99_ratio",
    "disagree": "min_shadow_agreement",
    "fail": "max_apply_failures",
}
GATES = "max_error_rate=0.05,max_p99_ratio=1.5,min_shadow_agreement=0.9,min_requests=10"
POLL_S = 0.05
STEADY_INTERVALS = 3  # telemetry intervals over which cloud-sync's steady CPU use is measured


def gate_of(kind: str) -> str:
    """The gate that stops a candidate of `kind`."""
    return _GATE[kind]


def stages_for(kind: str, bake_s: float) -> str:
    """Stages 1/10/50/100 %: active, after a shadow first stage where only a shadow can tell (`disagree`)."""
    first = "shadow" if kind == "disagree" else "active"
    return f"{first}:1%:{bake_s:g}s,active:10%:{bake_s:g}s,active:50%:{bake_s:g}s,active:100%"


def _manifest(version: int, model: bytes) -> dict[str, Any]:
    return {
        "name": MODEL,
        "version": version,
        "platform": "onnx",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 64]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 10]}],
        "labels": [],
        "max_batch_size": 8,
        "sha256": hashlib.sha256(model).hexdigest(),
        "size": len(model),
        "created": "",
        "description": f"hollow {MODEL} v{version}: random bytes, never downloaded",
    }


def _wait(condition: Callable[[], Any], timeout: float, what: str, poll: float = POLL_S) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise RuntimeError(f"{NAME}: timed out after {timeout:g} s waiting for {what}")
        time.sleep(poll)


class RolloutRig:
    """Mosquitto, cloud-sync and N hollow devices as processes, digits v1 assigned to all (a context manager).

    For this benchmark and tests/bench/test_hollow_rollouts.py. Reads the cloud store read-only (SQLite) for
    what the devices reported and what telemetry it holds; drives cloud-sync through its admin API.
    """

    def __init__(
        self,
        n: int,
        *,
        behaviour: Behaviour,
        telemetry_s: float,
        tick_s: float = 2.0,
        shards: int = 1,
        versions: Sequence[int] = (1,),
    ) -> None:
        if n < 1:
            raise ValueError("a rollout rig needs at least one device")
        self.n = n
        self.ids = device_ids(n, DEVICE_PREFIX)
        self._behaviour = behaviour
        self._telemetry_s = telemetry_s
        self._tick_s = tick_s
        self._shards = shards
        self._versions = sorted({1, *versions})
        self._stack = contextlib.ExitStack()
        self.hollow: HollowProcess | None = None
        self.cloud: Any = None
        self.broker_port = 0
        self.broker_pid = 0
        self._http: httpx.Client | None = None
        self._db: sqlite3.Connection | None = None

    # -- starting and stopping ----------------------------------------------------------------------------

    def __enter__(self) -> RolloutRig:
        try:
            self._start()
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *_: object) -> None:
        self._stack.close()

    def _start(self) -> None:
        limit = raise_fd_limit(2 * self.n + 1024)
        if limit < self.n + 256:
            raise RuntimeError(f"{NAME}: {self.n} devices need about {self.n + 256} open files; the limit is {limit}")
        work = Path(self._stack.enter_context(tempfile.TemporaryDirectory(prefix="efb-rollout-")))
        self.broker_port, self.broker_pid = self._stack.enter_context(_mosquitto(work))
        (work / "cloud").mkdir()
        database = work / "cloud" / "cloud-sync.db"
        register_devices(database, self.ids, LABELS)
        self.hollow = self._stack.enter_context(
            HollowProcess(
                "127.0.0.1",
                self.broker_port,
                self.ids,
                topic_prefix=PREFIX,
                shards=self._shards,
                timeout=30 + self.n / 100,
                telemetry_s=self._telemetry_s,
                behaviour=self._behaviour,
            )
        )
        url, token = self._start_cloud(work)
        self._http = self._stack.enter_context(
            httpx.Client(base_url=url, headers={"authorization": f"Bearer {token}"}, timeout=120)
        )
        self._db = sqlite3.connect(f"file:{database}?mode=ro", uri=True, check_same_thread=False)
        self._stack.callback(self._db.close)
        for version in self._versions:
            self.push(version)
        self.api("PUT", "/v1/assignments", {"model": MODEL, "version": 1, "selector": LABELS})

    def _start_cloud(self, work: Path) -> tuple[str, str]:
        from cloud_sync.process import admin_token
        from tests.processes import CloudSyncProcess, toml_text

        config = work / "cloud-sync.toml"
        mqtt = {"url": f"mqtt://127.0.0.1:{self.broker_port}", "topic_prefix": PREFIX, "client_id": "cloud-sync-bench"}
        config.write_text(
            toml_text(
                {
                    "server": {"data_dir": str(work / "cloud")},
                    "grpc": {"listen": "127.0.0.1:0"},
                    "http": {"listen": "127.0.0.1:0"},
                    "mqtt": mqtt,
                    "rollouts": {"tick_s": self._tick_s},
                }
            )
        )
        self.cloud = CloudSyncProcess(config)
        self._stack.callback(self._stop_cloud)
        ready = self.cloud.wait_ready(60)
        return str(ready["http"]), admin_token(work / "cloud")

    def _stop_cloud(self) -> None:
        if self.cloud is not None and self.cloud.proc.poll() is None:
            self.cloud.signal()
            with contextlib.suppress(Exception):
                self.cloud.finish(60)
            if self.cloud.proc.poll() is None:
                self.cloud.kill()

    def stop_cloud(self) -> None:
        """Stop cloud-sync (the raw baseline runs without it)."""
        self._stop_cloud()

    # -- the admin API ------------------------------------------------------------------------------------

    def api(self, method: str, path: str, body: Mapping[str, Any] | None = None) -> Any:
        assert self._http is not None
        response = self._http.request(method, path, json=body)
        if response.status_code >= 300:
            raise RuntimeError(f"{NAME}: {method} {path} answered {response.status_code}: {response.text[:500]}")
        return response.json()

    def push(self, version: int) -> None:
        """digits `version` into the registry: a random blob and its manifest."""
        assert self._http is not None
        model = os.urandom(256)
        sha = hashlib.sha256(model).hexdigest()
        response = self._http.put(f"/v1/blobs/{sha}", content=model)
        if response.status_code >= 300:
            raise RuntimeError(f"{NAME}: PUT /v1/blobs answered {response.status_code}: {response.text[:500]}")
        self.api("POST", "/v1/models", {"manifest": _manifest(version, model)})

    def create(self, to_version: int, stages: str, gates: str = GATES, shadow_sample_rate: float = 0.5) -> Any:
        body = {
            "model": MODEL,
            "to_version": to_version,
            "selector": LABELS,
            "stages": stages,
            "gates": gates,
            "shadow_sample_rate": shadow_sample_rate,
        }
        return self.api("POST", "/v1/rollouts", body)

    def rollout(self, rollout_id: str) -> Any:
        return self.api("GET", f"/v1/rollouts/{rollout_id}")

    def events(self, rollout_id: str) -> list[dict[str, Any]]:
        return list(self.api("GET", f"/v1/rollouts/{rollout_id}/events")["events"])

    def wait_ended(self, rollout_id: str, timeout: float) -> Any:
        """The rollout once it completed or aborted."""
        return _wait(
            lambda: (r := self.rollout(rollout_id))["state"] in ("completed", "aborted") and r,
            timeout,
            f"rollout {rollout_id} to complete or abort",
            poll=0.2,
        )

    # -- the cloud store, read-only -----------------------------------------------------------------------

    def reports(self, ids: Sequence[str] | None = None) -> dict[str, tuple[ReportedState, int]]:
        """(the stored reported state, received_at_ms) per device."""
        assert self._db is not None
        wanted = set(self.ids if ids is None else ids)
        rows = self._db.execute(
            "SELECT device_id, payload, received_at_ms FROM reported_state WHERE device_id LIKE ?",
            (f"{DEVICE_PREFIX}%",),
        ).fetchall()
        return {d: (ReportedState.FromString(p), int(at)) for d, p, at in rows if d in wanted}

    def on_version(self, version: int, ids: Sequence[str] | None = None) -> dict[str, int]:
        """Devices whose stored report has digits `version` ACTIVE and no other digits version: received_at_ms."""
        found = {}
        for device_id, (state, at) in self.reports(ids).items():
            digits = [(m.version, m.role, m.state) for m in state.models if m.name == MODEL]
            if digits == [(version, MODEL_ROLE_ACTIVE, MODEL_STATE_ACTIVE)]:
                found[device_id] = at
        return found

    def wait_on_version(self, version: int, timeout: float, ids: Sequence[str] | None = None) -> dict[str, int]:
        wanted = self.ids if ids is None else ids
        return dict(
            _wait(
                lambda: len(found := self.on_version(version, wanted)) == len(wanted) and found,
                timeout,
                f"{len(wanted)} devices to report {MODEL} v{version} ACTIVE",
            )
        )

    def windows_of(self, version: int, since_ms: int = 0) -> set[str]:
        """Devices with a stored telemetry window of digits `version` ending after `since_ms`."""
        assert self._db is not None
        rows = self._db.execute(
            "SELECT DISTINCT device_id FROM model_telemetry WHERE model = ? AND version = ? AND window_end_ms > ?",
            (MODEL, version, since_ms),
        ).fetchall()
        return {r[0] for r in rows}

    def wait_windows(self, version: int, timeout: float, since_ms: int = 0) -> None:
        _wait(lambda: len(self.windows_of(version, since_ms)) >= self.n, timeout, f"v{version} windows of every device")

    def ran_active(self) -> dict[str, list[tuple[str, int]]]:
        assert self.hollow is not None
        return self.hollow.ran_active()

    def cloud_cpu_s(self) -> float:
        return _cpu(self.cloud.pid)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def measure(n: int, kind: str, telemetry_s: float, bake_s: float, raw_rounds: int) -> dict[str, Any]:
    """One bad rollout on `n` hollow devices, then the raw baseline on the same broker and devices."""
    bad = BAD_VERSIONS[kind]
    behaviour = Behaviour(bad={bad: kind})
    began = time.perf_counter()
    with RolloutRig(n, behaviour=behaviour, telemetry_s=telemetry_s, versions=(1, bad)) as rig:
        setup_s = time.perf_counter() - began
        rig.wait_on_version(1, 60 + n / 50)
        rig.wait_windows(1, 10 * telemetry_s + 60)
        ready_s = time.perf_counter() - began
        # Steady state first: the fleet on v1, telemetry flowing, no rollout (a measuring window, not a wait).
        cpu0, wall0 = rig.cloud_cpu_s(), time.perf_counter()
        time.sleep(STEADY_INTERVALS * telemetry_s)
        steady_cpu_s, steady_wall_s = rig.cloud_cpu_s() - cpu0, time.perf_counter() - wall0
        cpu0, wall0 = rig.cloud_cpu_s(), time.perf_counter()
        created = rig.create(bad, stages_for(kind, bake_s))
        rollout_id = created["id"]
        ended = rig.wait_ended(rollout_id, bake_s + 20 * telemetry_s + 120)
        if ended["state"] != "aborted":
            raise RuntimeError(f"{NAME}: the bad candidate ({kind}) was not aborted: {json.dumps(ended)[:500]}")
        failed = [e for e in rig.events(rollout_id) if e["kind"] == "gate_failed"]
        if not failed:
            raise RuntimeError(f"{NAME}: rollout {rollout_id} aborted with no gate_failed event")
        breach_ms = int(failed[0]["at_ms"])
        touched = rig.rollout(rollout_id)["stage_devices"]  # the current stage's devices: stage 1's
        restored = rig.wait_on_version(1, 10 * GOAL_S, touched)
        cpu_s, wall_s = rig.cloud_cpu_s() - cpu0, time.perf_counter() - wall0
        restored_s = max(max(restored.values()) - breach_ms, 0) / 1000
        ran = rig.ran_active()
        outside = sorted(d for d, keys in ran.items() if (MODEL, bad) in keys and d not in touched)
        hollow = rig.hollow.stats().as_dict() if rig.hollow is not None else {}
        rig.stop_cloud()
        raw_cloud = RawCloud(rig.broker_port, 0)
        try:
            raw = [raw_cloud.round(touched, 10**9 + r, 10 * GOAL_S) for r in range(raw_rounds + 1)][1:]
        finally:
            raw_cloud.close()
    return {
        "rollout_id": rollout_id,
        "kind": kind,
        "candidate_version": bad,
        "gate": failed[0]["values"].get("gate"),
        "gate_reason": failed[0]["reason"],
        "stage_index_at_abort": ended["stage_index"],
        "touched_devices": len(touched),
        "devices_outside_stage_1_that_ran_it": outside,
        "setup_s": setup_s,
        "ready_s": ready_s,
        "breach_to_restored_s": restored_s,
        "created_to_restored_s": wall_s,
        "cloud_sync_cpu_s": cpu_s,
        "cloud_sync_cpu_share": cpu_s / wall_s,
        "devices_per_cloud_sync_core": n * wall_s / cpu_s if cpu_s > 0 else float("inf"),
        "steady_cloud_sync_cpu_s": steady_cpu_s,
        "steady_wall_s": steady_wall_s,
        "steady_devices_per_cloud_sync_core": n * steady_wall_s / steady_cpu_s if steady_cpu_s > 0 else float("inf"),
        "raw_seconds": raw,
        "hollow": hollow,
    }


def run(
    options: Options,
    devices: int | None = None,
    kind: str = "errors",
    telemetry_s: float | None = None,
    raw_rounds: int | None = None,
) -> Report:
    n = devices if devices is not None else options.count(1_000, 50)
    interval = telemetry_s if telemetry_s is not None else options.seconds(10.0, 1.0)
    rounds = raw_rounds if raw_rounds is not None else options.repeat
    bake_s = 60.0
    report = Report(
        NAME,
        options,
        {
            "devices": n,
            "bad_kind": kind,
            "candidate_version": BAD_VERSIONS[kind],
            "stages": stages_for(kind, bake_s),
            "gates": GATES,
            "telemetry_s": interval,
            "tick_s": 2.0,
            "ours": "a cloud-sync process (SQLite, MQTT control link and telemetry subscriber, rollout controller) "
            "aborts the rollout on a gate; clock from the gate_failed event to the last received_at_ms of the "
            "touched devices' stored reports of v1 ACTIVE (cloud-sync's clock)",
            "raw_baseline": "cloud-sync stopped; a paho client publishes the touched devices a DesiredState "
            "(retained, QoS 1), a paho shared subscriber counts their reports (median of rounds after one warm-up)",
            "hollow_devices": "bench/hollow.py with telemetry every telemetry_s and one bad version",
            "paho_mqtt": importlib.metadata.version("paho-mqtt"),
            "cores": os.cpu_count(),
        },
    )
    result = measure(n, kind, interval, bake_s, rounds)
    raw = median(result["raw_seconds"])
    restored = result["breach_to_restored_s"]
    report.measurements = result
    report.say(
        f"{n} devices, a {kind} candidate: stopped by {result['gate']} in stage {result['stage_index_at_abort'] + 1}; "
        f"gate breach to all {result['touched_devices']} touched devices reporting v1 ACTIVE {restored:.2f} s "
        f"(raw paho round trip {raw:.3f} s); devices outside stage 1 that ran it: "
        f"{len(result['devices_outside_stage_1_that_ran_it'])}"
    )
    report.say(
        f"cloud-sync used {result['cloud_sync_cpu_s']:.1f} CPU s over {result['created_to_restored_s']:.1f} s "
        f"({result['cloud_sync_cpu_share']:.0%} of a core): {result['devices_per_cloud_sync_core']:.0f} devices "
        f"per cloud-sync core at {interval:g} s telemetry (steady, no rollout: "
        f"{result['steady_devices_per_cloud_sync_core']:.0f} over {result['steady_wall_s']:.0f} s)"
    )
    report.ratio("restore_seconds_vs_raw", restored, raw, f"seconds to put {result['touched_devices']} devices on v1")
    report.target(
        Target(
            f"gate breach to every touched device reporting v1 ACTIVE, {n} devices",
            restored,
            GOAL_S,
            "s",
            "lower",
            how="the gate_failed event's at_ms to the latest received_at_ms of the touched devices' stored reports "
            "naming only v1 ACTIVE; hollow devices answer at once",
            reason="the abort's reconcile and desired-state commits, the MQTT fan-out and report storage; "
            "cloud-sync shares 2 cores with mosquitto and the hollow fleet's telemetry",
        )
    )
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_rollout", description=__doc__.split("\n")[0])
    parser.add_argument("--devices", type=int, default=1_000, help="hollow devices (default 1000)")
    parser.add_argument("--bad-kind", choices=BAD_KINDS, default="errors", help="how the candidate is bad")
    parser.add_argument("--telemetry-s", type=float, default=10.0, help="hollow telemetry interval (default 10)")
    parser.add_argument("--raw-rounds", type=int, default=3, help="raw baseline rounds (default 3)")
    parser.add_argument("--results", type=Path, default=None, help="where the JSON goes (default bench/results)")
    args = parser.parse_args(argv)
    if args.devices < 1 or args.raw_rounds < 1 or not 0.05 <= args.telemetry_s <= 3600:
        print(
            f"{parser.prog}: --devices and --raw-rounds must be >= 1, --telemetry-s within 0.05..3600", file=sys.stderr
        )
        return 2
    from bench._harness import RESULTS_DIR
    from edgefleet.logs import configure_logging

    configure_logging("warning", sys.stderr)
    options = Options(Path("build/models"), repeat=args.raw_rounds, results=args.results or RESULTS_DIR)
    run(options, devices=args.devices, kind=args.bad_kind, telemetry_s=args.telemetry_s).write()
    return 0


if __name__ == "__main__":
    sys.exit(main())
