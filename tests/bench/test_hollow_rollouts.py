"""Hollow devices in rollouts: their telemetry per model version (a bad version fails requests, is slow,
disagrees in shadow or never loads) as cloud-sync accepts it, and rollouts over ~200 of them with cloud-sync and
Mosquitto as processes: each bad candidate stopped in stage 1 by its own gate, with no device outside stage 1
ever running it ACTIVE and every touched device back on v1; a good candidate runs every stage and completes."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TypeAlias

import pytest

from bench.bench_rollout import BAD_VERSIONS, MODEL, RolloutRig, gate_of, stages_for
from bench.hollow import FAIL_REASON, TELEMETRY_CONTENT_TYPE, Behaviour, HollowFleet, device_ids, parse_bad
from cloud_sync.rollouts.plan import stage_devices
from cloud_sync.telemetry.validation import check_telemetry
from edgefleet.proto.edgefleet.v1.state_pb2 import (
    MODEL_ROLE_ACTIVE,
    MODEL_ROLE_SHADOW,
    MODEL_STATE_FAILED,
    DesiredState,
    ModelAssignment,
    ModelRole,
    ReportedState,
)
from edgefleet.proto.edgefleet.v1.telemetry_pb2 import Telemetry
from tests.mosquitto import Mosquitto, MqttWatcher
from tests.processes import REPO_ROOT
from tests.waiting import wait_for

PREFIX = "edgefleet/v1"
BAD = {version: kind for kind, version in BAD_VERSIONS.items()}  # 3 disagree, 4 slow, 5 fail, 6 errors


# -- one hollow fleet's telemetry, against a real Mosquitto -------------------------------------------------


Role: TypeAlias = ModelRole.ValueType


def _desired(device_id: str, generation: int, *models: tuple[int, Role, float]) -> bytes:
    return DesiredState(
        device_id=device_id,
        generation=generation,
        models=[
            ModelAssignment(name=MODEL, version=v, role=role, sha256="ab" * 32, shadow_sample_rate=rate)
            for v, role, rate in models
        ],
        policy_hash="p",
    ).SerializeToString()


def _settled(watcher: MqttWatcher, device_id: str, expected: set[tuple[int, Role]]) -> Telemetry | None:
    """The device's latest telemetry once two in a row name exactly `expected` (version, role): a whole window."""
    found = [
        Telemetry.FromString(m.payload)
        for m in watcher.on(f"{PREFIX}/devices/{device_id}/telemetry")
        if m.content_type == TELEMETRY_CONTENT_TYPE
    ]
    matching = [t for t in found if {(m.version, m.role) for m in t.models} == expected]
    return matching[-1] if len(matching) >= 2 else None


def _window(watcher: MqttWatcher, device_id: str, expected: set[tuple[int, Role]]) -> Telemetry:
    found = wait_for(lambda: _settled(watcher, device_id, expected), 15, f"{device_id}'s telemetry of {expected}")
    assert found is not None
    return found


@pytest.mark.slow
def test_hollow_telemetry_per_version_shows_each_bad_kind_as_the_cloud_accepts_it(tmp_path: Path) -> None:
    ids = device_ids(4, "tele-")
    behaviour = Behaviour(bad=BAD, requests_per_s=100.0)
    with Mosquitto(tmp_path / "broker") as broker:
        watcher = MqttWatcher(broker, [f"{PREFIX}/devices/+/telemetry", f"{PREFIX}/devices/+/reported"])
        fleet = HollowFleet("127.0.0.1", broker.port, ids, topic_prefix=PREFIX, telemetry_s=0.2, behaviour=behaviour)
        fleet.start()
        try:
            fleet.wait_subscribed(30)
            active, shadow = MODEL_ROLE_ACTIVE, MODEL_ROLE_SHADOW
            states = {
                ids[0]: [(1, active, 0.0), (3, shadow, 0.5)],  # disagrees in shadow
                ids[1]: [(4, active, 0.0)],  # slow
                ids[2]: [(5, active, 0.0)],  # never loads: the device keeps serving v1
                ids[3]: [(6, active, 0.0)],  # fails requests
            }
            for device_id in ids:
                watcher.publish(f"{PREFIX}/devices/{device_id}/desired", _desired(device_id, 1, (1, active, 0.0)))
            wait_for(lambda: all(_settled(watcher, d, {(1, active)}) for d in ids), 15, "v1 telemetry")
            for device_id, models in states.items():
                watcher.publish(f"{PREFIX}/devices/{device_id}/desired", _desired(device_id, 2, *models))
            expected = {
                ids[0]: {(1, active), (3, shadow)},
                ids[1]: {(4, active)},
                ids[2]: {(1, active)},
                ids[3]: {(6, active)},
            }
            windows: dict[str, Telemetry] = {}
            for device_id in (ids[0], ids[1], ids[3]):
                windows[device_id] = _window(watcher, device_id, expected[device_id])
            # The failing device: its report names v5 FAILED (not converged), and its telemetry goes on with v1.
            wait_for(
                lambda: any(
                    ReportedState.FromString(m.payload).generation == 2
                    for m in watcher.on(f"{PREFIX}/devices/{ids[2]}/reported")
                ),
                10,
                "the failing device's report",
            )
            [report] = [
                s
                for m in watcher.on(f"{PREFIX}/devices/{ids[2]}/reported")
                if (s := ReportedState.FromString(m.payload)).generation == 2
            ]
            assert [(m.version, m.state, m.reason) for m in report.models] == [(5, MODEL_STATE_FAILED, FAIL_REASON)]
            assert not report.converged
            windows[ids[2]] = _window(watcher, ids[2], expected[ids[2]])
            ran = fleet.ran_active()
            stats = fleet.stats()
        finally:
            fleet.close()
            watcher.close()

    for device_id in ids:  # every message is one cloud-sync stores
        for m in watcher.on(f"{PREFIX}/devices/{device_id}/telemetry"):
            check_telemetry(device_id, m.payload, content_type=m.content_type)
    by_version = {d: {m.version: m for m in windows[d].models} for d in ids}
    v1, v3 = by_version[ids[0]][1], by_version[ids[0]][3]
    assert v1.requests >= 10 and v1.errors == 0 and v1.latency.p99_ms == 4.0
    assert v3.role == MODEL_ROLE_SHADOW and v3.shadow_compared >= 5
    assert v3.shadow_compared == pytest.approx(v1.requests * 0.5, abs=2)
    assert v3.shadow_agreed <= 0.2 * v3.shadow_compared  # disagrees
    assert v1.shadow_compared == 0
    v4 = by_version[ids[1]][4]
    assert v4.latency.p99_ms == 160.0 and v4.errors == 0 and v4.cpu_seconds == pytest.approx(v4.requests * 0.08)
    assert list(by_version[ids[2]]) == [1]
    v6 = by_version[ids[3]][6]
    assert v6.errors == round(v6.requests * 0.25) and v6.errors > 0 and v6.latency.p99_ms == 4.0
    assert ran == {
        ids[0]: [(MODEL, 1)],
        ids[1]: [(MODEL, 1), (MODEL, 4)],
        ids[2]: [(MODEL, 1)],
        ids[3]: [(MODEL, 1), (MODEL, 6)],
    }
    assert stats.telemetry_sent >= 4 * 4


def test_bad_hollow_behaviours_are_refused() -> None:
    assert parse_bad("3=disagree") == (3, "disagree")
    for text in ("3", "x=errors", "0=errors", "3=nope", "=slow"):
        with pytest.raises(ValueError, match="VERSION=KIND"):
            parse_bad(text)
    with pytest.raises(ValueError, match="one of errors"):
        Behaviour(bad={3: "nope"})
    with pytest.raises(ValueError, match="requests_per_s"):
        Behaviour(requests_per_s=0)
    with pytest.raises(ValueError, match="telemetry_s"):
        HollowFleet("127.0.0.1", 1883, ["a"], telemetry_s=0)


@pytest.mark.slow
def test_the_hollow_shard_and_the_benchmark_refuse_bad_arguments() -> None:
    for module, args, word in (
        ("bench.hollow", ["--port", "1", "--bad", "3=nope"], "--bad"),
        ("bench.bench_rollout", ["--devices", "0"], "--devices"),
    ):
        done = subprocess.run(
            [sys.executable, "-m", module, *args],
            input="",
            capture_output=True,
            text=True,
            cwd=REPO_ROOT,
            timeout=60,
        )
        assert done.returncode == 2 and word in done.stderr, done.stderr


# -- rollouts over ~200 hollow devices, cloud-sync and Mosquitto as processes --------------------------------

DEVICES = 200
BAKE_S = 1.0


@pytest.fixture(scope="module")
def rig() -> Iterator[RolloutRig]:
    # One fleet for every rollout below (in file order: the good candidate, which moves the fleet to v2, last).
    behaviour = Behaviour(bad=BAD)
    with RolloutRig(DEVICES, behaviour=behaviour, telemetry_s=0.5, tick_s=0.2, versions=range(1, 7)) as running:
        running.wait_on_version(1, 60)
        running.wait_windows(1, 30)  # A's figures on every device, for the p99 ratio
        yield running


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["errors", "slow", "fail", "disagree"])
def test_a_bad_candidate_is_stopped_in_stage_1_by_its_gate_and_no_device_outside_it_ran_it(
    rig: RolloutRig, kind: str
) -> None:
    version = BAD_VERSIONS[kind]
    created = rig.create(version, stages_for(kind, BAKE_S))
    rollout_id = created["id"]
    stage1 = set(stage_devices(rollout_id, rig.ids, 1.0))
    assert len(stage1) == 2 and set(created["stage_devices"]) == stage1

    ended = rig.wait_ended(rollout_id, 60)

    assert (ended["state"], ended["stage_index"]) == ("aborted", 0)
    events = rig.events(rollout_id)
    assert [e["kind"] for e in events] == ["created", "gate_failed", "aborted"]
    failed = events[1]
    assert failed["actor"] == "gate" and failed["stage_index"] == 0
    assert failed["values"]["gate"] == gate_of(kind)
    assert failed["values"]["gates"][gate_of(kind)]["ok"] is False
    ran = {d for d, keys in rig.ran_active().items() if (MODEL, version) in keys}
    assert ran <= stage1, f"devices outside stage 1 ran v{version} ACTIVE: {sorted(ran - stage1)}"
    # Where the candidate served ACTIVE it did so on exactly the stage's devices (so the check above can fail).
    assert ran == (stage1 if kind in ("errors", "slow") else set())
    restored = rig.wait_on_version(1, 30, sorted(stage1))
    assert min(restored.values()) >= failed["at_ms"]
    assert len(rig.on_version(1)) == DEVICES  # the whole fleet on v1, no shadow left anywhere


@pytest.mark.slow
def test_a_good_candidate_runs_every_stage_and_completes(rig: RolloutRig) -> None:
    created = rig.create(2, stages_for("good", BAKE_S))
    rollout_id = created["id"]

    ended = rig.wait_ended(rollout_id, 90)

    assert ended["state"] == "completed", ended["reason"]
    kinds = [e["kind"] for e in rig.events(rollout_id)]
    assert kinds == ["created", "advanced", "advanced", "advanced", "advanced", "completed"]
    rig.wait_on_version(2, 60)
    assert all((MODEL, 2) in keys for keys in rig.ran_active().values())
    assert rig.windows_of(2) >= set(stage_devices(rollout_id, rig.ids, 1.0))
