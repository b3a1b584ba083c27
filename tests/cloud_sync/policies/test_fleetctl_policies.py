"""`fleetctl policies ...` as a real process against a real cloud-sync: each command as text and --json, and
bad input exiting 2 (4 for an unknown policy or device) with one line and nothing changed."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from tests.cloud_sync.conftest import RunningCloudSync
from tests.cloud_sync.test_fleetctl import failed, fleetctl, ok

_names = itertools.count(1)


def new_name(prefix: str = "ctl") -> str:
    return f"{prefix}-{next(_names)}"


def test_set_with_set_options_then_show_list_and_delete(cloud_sync: RunningCloudSync) -> None:
    name = new_name()
    text = ok(
        fleetctl(
            cloud_sync, "policies", "set", name, "--selector", "site=ctl-lab", "--priority", "10",
            "--set", "inference.max_batch_size=8", "--set", "inference.max_queue_delay_ms=2.5",
            "--set", "inference.adaptive=false",
        )
    )  # fmt: skip
    assert f"{name} v1" in text and "selector site=ctl-lab" in text and "priority 10" in text
    assert "inference.max_batch_size = 8" in text and "inference.max_queue_delay_ms = 2.5" in text

    shown = json.loads(ok(fleetctl(cloud_sync, "--json", "policies", "show", name)))
    assert shown["document"] == {"inference": {"max_batch_size": 8, "max_queue_delay_ms": 2.5, "adaptive": False}}
    listed = json.loads(ok(fleetctl(cloud_sync, "--json", "policies", "list")))
    assert name in [p["name"] for p in listed]
    assert name in ok(fleetctl(cloud_sync, "policies", "list"))

    deleted = ok(fleetctl(cloud_sync, "policies", "delete", name))
    assert f"deleted policy {name}" in deleted
    assert "no policy named" in failed(fleetctl(cloud_sync, "policies", "show", name), 4)


def test_set_from_a_file_with_set_over_it(cloud_sync: RunningCloudSync, tmp_path: Path) -> None:
    name = new_name()
    doc = tmp_path / "policy.json"
    doc.write_text(json.dumps({"inference": {"max_batch_size": 16}, "telemetry": {"interval_s": 5}}))
    created = json.loads(
        ok(
            fleetctl(
                cloud_sync, "--json", "policies", "set", name, "--file", str(doc), "--set", "inference.instances=2"
            )
        )
    )
    assert created["document"] == {
        "inference": {"max_batch_size": 16, "instances": 2},
        "telemetry": {"interval_s": 5.0},
    }
    assert created["selector"] == {} and created["version"] == 1
    ok(fleetctl(cloud_sync, "policies", "delete", name))


def test_effective_names_the_sources(cloud_sync: RunningCloudSync) -> None:
    site = new_name("ctl-site")
    device_id, _ = cloud_sync.new_device("ctl-eff", {"site": site})
    name = new_name()
    ok(fleetctl(cloud_sync, "policies", "set", name, "--selector", f"site={site}", "--set", "upload.sample_rate=0.25"))
    text = ok(fleetctl(cloud_sync, "policies", "effective", device_id))
    assert f"from {name}" in text and "upload.sample_rate = 0.25" in text
    effective = json.loads(ok(fleetctl(cloud_sync, "--json", "policies", "effective", device_id)))
    assert effective["policy"] == {"upload": {"sample_rate": 0.25}} and effective["sources"] == [name]
    ok(fleetctl(cloud_sync, "policies", "delete", name))
    assert "none (the device's own config file)" in ok(fleetctl(cloud_sync, "policies", "effective", device_id))
    failed(fleetctl(cloud_sync, "policies", "effective", "ctl-no-such-device"), 4)


@pytest.mark.slow
def test_bad_input_exits_2_and_changes_nothing(cloud_sync: RunningCloudSync, tmp_path: Path) -> None:
    name = new_name()
    not_json = tmp_path / "bad.json"
    not_json.write_text("{nope")
    cases = [
        (["--set", "inference.max_batch_size=0"], "document.inference.max_batch_size: 0 is out of range"),
        (["--set", "inference.max_batch_size=eight"], "document.inference.max_batch_size: must be int, not str"),
        (["--set", "inference.bogus=1"], "document.inference.bogus: unknown key"),
        (["--set", "max_batch_size=8"], "is not SECTION.KEY=VALUE"),
        (["--set", "inference.max_batch_size"], "is not SECTION.KEY=VALUE"),
        (["--set", "inference.max_batch_size=NaN"], "must be int, not str"),
        ([], "give the policy's settings"),
        (["--file", str(tmp_path / "missing.json")], "cannot read --file"),
        (["--file", str(not_json)], "is not a JSON document"),
        (["--selector", "site", "--set", "inference.instances=2"], "is not key=value"),
        (["--priority", "-1", "--set", "inference.instances=2"], "priority: must be an integer"),
    ]
    for args, says in cases:
        message = failed(fleetctl(cloud_sync, "policies", "set", name, *args), 2)
        assert says in message, (args, message)
        assert message.count("\n") == 1, message
    failed(fleetctl(cloud_sync, "policies", "show", name), 4)
    assert "name: " in failed(fleetctl(cloud_sync, "policies", "set", "Bad/Name", "--set", "inference.instances=2"), 2)
    assert "name: " in failed(fleetctl(cloud_sync, "policies", "delete", "a/b"), 2)
