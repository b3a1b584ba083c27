"""fleetctl models as operators run it: a real `python -m cloud_sync.fleetctl` process against a real cloud-sync."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from cloud_sync.fleetctl_models import parse_duration
from tests.cloud_sync.conftest import RunningCloudSync
from tests.cloud_sync.test_fleetctl import failed, fleetctl, ok


def test_push_uploads_once_registers_and_the_version_is_listed_signed_and_deleted(
    cloud_sync: RunningCloudSync, model_packages: dict[str, Path]
) -> None:
    package = model_packages["digits:1"]
    pushed = ok(fleetctl(cloud_sync, "models", "push", str(package), "--expires", "2d"))
    assert "pushed digits:1 (uploaded model.onnx" in pushed
    again = ok(fleetctl(cloud_sync, "models", "push", str(package)))
    assert "uploaded nothing" in again and "already there" in again
    listed = json.loads(ok(fleetctl(cloud_sync, "--json", "models", "list", "--name", "digits")))
    assert [(v["name"], v["version"]) for v in listed] == [("digits", 1)]
    manifest = json.loads((package / "manifest.json").read_text())
    shown = json.loads(ok(fleetctl(cloud_sync, "--json", "models", "show", "digits", "1")))
    assert shown["manifest"] == manifest and shown["sha256"] == manifest["sha256"]
    assert 2 * 86400_000 - 60_000 < shown["expires_at_ms"] - shown["signed_at_ms"] <= 2 * 86400_000
    signed = json.loads(ok(fleetctl(cloud_sync, "--json", "models", "sign", "digits", "1", "--expires", "12h")))
    assert signed["serial"] > shown["serial"]
    assert "digits:1" in ok(fleetctl(cloud_sync, "models", "show", "digits", "1"))
    assert "deleted digits:1" in ok(fleetctl(cloud_sync, "models", "delete", "digits", "1"))
    assert "no model digits:1" in failed(fleetctl(cloud_sync, "models", "show", "digits", "1"), 4)


@pytest.mark.slow
def test_push_of_a_bare_onnx_packages_it_first(
    cloud_sync: RunningCloudSync, model_packages: dict[str, Path], tmp_path: Path
) -> None:
    onnx = tmp_path / "net.onnx"
    shutil.copy(model_packages["digits:2"] / "model.onnx", onnx)
    assert "--name and --version" in failed(fleetctl(cloud_sync, "models", "push", str(onnx)), 2)
    created = json.loads(
        ok(fleetctl(cloud_sync, "--json", "models", "push", str(onnx), "--name", "ctl-bare", "--version", "3"))
    )
    assert (created["name"], created["version"]) == ("ctl-bare", 3)
    assert created["size"] == onnx.stat().st_size


def test_bad_input_exits_2_with_the_reason(
    cloud_sync: RunningCloudSync, model_packages: dict[str, Path], tmp_path: Path
) -> None:
    package = model_packages["digits:1"]
    assert "--expires" in failed(fleetctl(cloud_sync, "models", "push", str(package), "--expires", "3x"), 2)
    assert "neither" in failed(fleetctl(cloud_sync, "models", "push", str(tmp_path / "nothing")), 2)
    assert "has no manifest.json" in failed(fleetctl(cloud_sync, "models", "push", str(tmp_path)), 2)
    tampered = tmp_path / "tampered"
    shutil.copytree(package, tampered)
    with (tampered / "model.onnx").open("ab") as f:
        f.write(b"\0")
    assert "does not match manifest.json" in failed(fleetctl(cloud_sync, "models", "push", str(tampered)), 2)
    named = failed(fleetctl(cloud_sync, "models", "push", str(package), "--name", "other"), 2)
    assert "differs from the package's name" in named
    assert failed(fleetctl(cloud_sync, "models", "show", "digits", "0"), 2)
    assert "model name" in failed(fleetctl(cloud_sync, "models", "show", "Bad!", "1"), 2)


@pytest.mark.parametrize(("text", "seconds"), [("30d", 30 * 86400), ("12h", 43200), ("90m", 5400), ("3600", 3600)])
def test_durations(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "1", "59s", "d", "-5m", "6000d", "1.5h"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)
