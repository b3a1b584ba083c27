"""fleetctl rollouts as operators run it: real fleetctl processes against the session's real cloud-sync."""

from __future__ import annotations

import json
import subprocess

import pytest

from cloud_sync.fleetctl_rollouts import _event_line
from tests.cloud_sync.conftest import RunningCloudSync
from tests.cloud_sync.rollouts_api.test_api_rollouts import GATES, STAGES, fleet, post
from tests.cloud_sync.test_fleetctl import FLEETCTL, environment, failed, fleetctl, ok
from tests.processes import REPO_ROOT


def _create(cloud_sync: RunningCloudSync, *extra: str) -> tuple[str, str]:
    name, selector = fleet(cloud_sync)
    ((key, value),) = selector.items()
    args = ["--model", name, "--to", "2", "--selector", f"{key}={value}", "--stages", STAGES, "--gates", GATES]
    created = json.loads(ok(fleetctl(cloud_sync, "--json", "rollouts", "create", *args, *extra)))
    return created["id"], name


def test_create_list_show_and_events(cloud_sync: RunningCloudSync) -> None:
    rollout_id, name = _create(cloud_sync, "--shadow-sample", "0.25")
    listed = ok(fleetctl(cloud_sync, "rollouts", "list", "--state", "running"))
    assert rollout_id in listed and "1 -> 2" in listed
    assert rollout_id in [r["id"] for r in json.loads(ok(fleetctl(cloud_sync, "--json", "rollouts", "list")))]

    shown = ok(fleetctl(cloud_sync, "rollouts", "show", rollout_id))
    assert f"{rollout_id}: {name} 1 -> 2 on " in shown and "(4 devices), running, stage 1/3" in shown
    assert "> stage 1: shadow:25%:3600s, 1 devices, current" in shown
    assert "  stage 3: active:100%:3600s, 4 devices, pending" in shown
    assert "max_error_rate=0.01" in shown
    as_json = json.loads(ok(fleetctl(cloud_sync, "--json", "rollouts", "show", rollout_id)))
    assert (as_json["shadow_sample_rate"], as_json["matched_devices"]) == (0.25, 4)

    ok(fleetctl(cloud_sync, "rollouts", "pause", rollout_id, "--reason", "lunch"))
    printed = ok(fleetctl(cloud_sync, "rollouts", "events", rollout_id))
    assert "created by operator" in printed and "paused by operator: lunch" in printed
    found = json.loads(ok(fleetctl(cloud_sync, "--json", "rollouts", "events", rollout_id)))
    assert [e["kind"] for e in found] == ["created", "paused"]
    later = json.loads(
        ok(fleetctl(cloud_sync, "--json", "rollouts", "events", rollout_id, "--after-id", str(found[0]["id"])))
    )
    assert [e["kind"] for e in later] == ["paused"]


def test_pause_resume_promote_abort(cloud_sync: RunningCloudSync) -> None:
    rollout_id, _ = _create(cloud_sync)
    assert ", paused, stage 1/3" in ok(fleetctl(cloud_sync, "rollouts", "pause", rollout_id))
    assert ", running, stage 1/3" in ok(fleetctl(cloud_sync, "rollouts", "resume", rollout_id))
    promoted = json.loads(ok(fleetctl(cloud_sync, "--json", "rollouts", "promote", rollout_id, "--reason", "ok")))
    assert promoted["stage_index"] == 1
    aborted = ok(fleetctl(cloud_sync, "rollouts", "abort", rollout_id, "--reason", "bad numbers"))
    assert ", aborted, " in aborted and "reason: bad numbers" in aborted
    # Not allowed from its state: the API's 409, exit 2 with the reason.
    assert "is aborted" in failed(fleetctl(cloud_sync, "rollouts", "resume", rollout_id), 2)


def _watch(cloud_sync: RunningCloudSync, rollout_id: str, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*FLEETCTL, *extra, "rollouts", "watch", rollout_id, "--interval", "0.2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO_ROOT,
        env=environment(cloud_sync),
    )


def test_watch_follows_a_rollout_to_completion_and_exits_0(cloud_sync: RunningCloudSync) -> None:
    rollout_id, _ = _create(cloud_sync)
    watching = _watch(cloud_sync, rollout_id)
    for _ in range(3):
        post(cloud_sync, rollout_id, "promote", "by the test")
    stdout, stderr = watching.communicate(timeout=30)
    assert watching.returncode == 0, (stdout, stderr)
    assert "promoted by operator: by the test" in stdout
    assert "completed by operator" in stdout and ", completed, stage done" in stdout


def test_watch_exits_1_once_aborted_and_json_prints_one_object_a_line(cloud_sync: RunningCloudSync) -> None:
    rollout_id, _ = _create(cloud_sync)
    watching = _watch(cloud_sync, rollout_id, "--json")
    post(cloud_sync, rollout_id, "abort", "stop")
    stdout, stderr = watching.communicate(timeout=30)
    assert watching.returncode == 1, (stdout, stderr)
    lines = [json.loads(line) for line in stdout.splitlines()]
    assert lines[-1]["rollout"]["state"] == "aborted"
    assert "aborted" in [line["event"]["kind"] for line in lines if "event" in line]


@pytest.mark.parametrize(
    ("args", "code", "says"),
    [
        (
            ["create", "--model", "digits", "--to", "2", "--stages", "active:100%", "--selector", "site"],
            2,
            "--selector",
        ),
        (["create", "--model", "digits", "--to", "2", "--stages", "shadow:10%"], 2, "stages:"),
        (
            ["create", "--model", "digits", "--to", "2", "--stages", "active:100%", "--gates", "fast=1"],
            2,
            "unknown gate",
        ),
        (["create", "--model", "digits", "--to", "0", "--stages", "active:100%"], 2, "--to"),
        (
            ["create", "--model", "digits", "--to", "2", "--stages", "active:100%", "--shadow-sample", "2"],
            2,
            "--shadow-sample",
        ),
        (["show", "ro-0000000000"], 4, "ro-0000000000"),
        (["show", "nope"], 2, "is not ro- and 10 hex digits"),
        (["events", "ro-0000000000"], 4, "ro-0000000000"),
        (["watch", "ro-0000000000"], 4, "ro-0000000000"),
        (["watch", "ro-0000000000", "--interval", "0"], 2, "--interval"),
        (["pause", "ro-0000000000"], 4, "ro-0000000000"),
        (["list", "--state", "sleeping"], 2, "state"),
    ],
)
def test_bad_input_exits_with_a_reason(cloud_sync: RunningCloudSync, args: list[str], code: int, says: str) -> None:
    done = fleetctl(cloud_sync, "rollouts", *args)
    assert done.returncode == code, (done.stdout, done.stderr)
    assert says in done.stderr


def test_an_event_line_shows_the_gate_values_that_decided_it() -> None:
    # The controller's events carry {"stage", "gate", "gates": {gate: {value, threshold, ok}}}.
    gates = {"min_shadow_agreement": {"value": 0.0, "threshold": 0.7, "ok": False}}
    event = {"at_ms": 0, "kind": "gate_failed", "actor": "gate", "reason": "r"}
    nested = _event_line({**event, "values": {"stage": "shadow:100%", "gate": "min_shadow_agreement", "gates": gates}})
    assert nested.endswith("gate_failed by gate: r [min_shadow_agreement 0 vs 0.7]")
    assert _event_line({**event, "values": gates}) == nested
