"""fleetctl samples list and export as real processes against a real admin API: the table and --json show who
kept what and why; export writes DIR/samples.<ext> and DIR/manifest.json that give back the exact tensors; bad
arguments exit 2 with a message, before any request."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.cloud_sync.samples.conftest import OPERATOR, VIEWER, SamplesApi, image, probabilities, sampled
from tests.processes import REPO_ROOT

# fleetctl's own root (its options, --json after a command) with the samples commands added as the lead
# registers them in cloud_sync/fleetctl.py; added here only while that line is not there yet.
_FLEETCTL = """
from cloud_sync.fleetctl import app
from cloud_sync.fleetctl_samples import samples_app
if not any(group.name == "samples" for group in app.registered_groups):
    app.add_typer(samples_app, name="samples")
app(prog_name="fleetctl")
"""


def fleetctl(api: SamplesApi | None, *args: str, token: str = OPERATOR) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETCTL_") and k != "COLUMNS"}
    env.update(FLEETCTL_URL=api.url if api else "http://127.0.0.1:9", FLEETCTL_TOKEN=token, COLUMNS="200")
    return subprocess.run(
        [sys.executable, "-c", _FLEETCTL, *args], capture_output=True, text=True, timeout=60, cwd=REPO_ROOT, env=env
    )


def ok(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 0, (done.returncode, done.stdout, done.stderr)
    return done.stdout


def _fill(api: SamplesApi) -> None:
    api.fleet.upload(
        "cam-1",
        [
            sampled({"x": image(i)}, {"probabilities": probabilities(i)}, reason=r, measure="margin", score=0.5)
            for i, r in enumerate(["", "uncertain", "uncertain"])
        ],
    )
    api.fleet.upload("cam-2", [sampled({"x": image(7)}, reason="uncertain")], version=2)


@pytest.fixture
def filled(samples_api: SamplesApi) -> SamplesApi:
    _fill(samples_api)
    return samples_api


@pytest.fixture
def store_url(tmp_path: Path) -> str:
    """SQLite only: the store's engines are tested in test_store.py and test_api.py; here, the command line."""
    return f"sqlite:///{tmp_path / 'cloud.db'}"


def test_list_shows_who_kept_what_and_why(filled: SamplesApi) -> None:
    text = ok(fleetctl(filled, "samples", "list", "--model", "digits:1", "--reason", "uncertain", token=VIEWER))
    assert "cam-1" in text and "uncertain" in text and "margin" in text and "cam-2" not in text
    rows = json.loads(ok(fleetctl(filled, "samples", "list", "--model", "digits", "--json", "--limit", "3")))
    assert [(s["device_id"], s["seq"], s["reason"]) for s in rows["samples"]] == [
        ("cam-1", 1, "random"),
        ("cam-1", 2, "uncertain"),
        ("cam-1", 3, "uncertain"),
    ]
    assert rows["more"]
    more = ok(fleetctl(filled, "samples", "list", "--model", "digits", "--limit", "3"))
    assert f"--after {rows['next_after_id']}" in more


@pytest.mark.parametrize("fmt", ["npz", "parquet"])
def test_export_writes_the_file_and_its_manifest(filled: SamplesApi, tmp_path: Path, fmt: str) -> None:
    out = tmp_path / "export"
    args = ["samples", "export", "--model", "digits:1", "--reason", "uncertain", "--format", fmt, "--out", str(out)]
    text = ok(fleetctl(filled, *args))
    target = out / f"samples.{fmt}"
    assert f"wrote {target}" in text and "2 samples: uncertain 2" in text
    manifest: dict[str, Any] = json.loads((out / "manifest.json").read_text())
    assert manifest["count"] == 2 and manifest["query"]["version"] == 1 and manifest["format"] == fmt
    if fmt == "npz":
        with np.load(target) as npz:
            np.testing.assert_array_equal(npz["inputs/x"], np.stack([image(1), image(2)]))
    else:
        rows = pq.read_table(target).to_pylist()
        got = [np.frombuffer(r["inputs/x"], np.float32).reshape(r["inputs/x.shape"]) for r in rows]
        np.testing.assert_array_equal(np.stack(got), np.stack([image(1), image(2)]))
    assert not list(out.glob("*.part"))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["list", "--model", "Digits"], "--model 'Digits' is not a model name"),
        (["list", "--model", "digits:0"], "the version must be"),
        (["list", "--model", "digits", "--reason", "hard"], "--reason 'hard' is not one of"),
        (["list", "--model", "digits", "--since", "yesterday"], "--since 'yesterday' is not a duration"),
        (["list", "--model", "digits", "--limit", "0"], "--limit 0 is outside 1..1000"),
        (["export", "--model", "digits", "--out", "x", "--format", "csv"], "--format 'csv' is not one of"),
        (["export", "--model", "digits", "--out", "x", "--limit", "10001"], "--limit 10001 is outside"),
    ],
)
def test_bad_arguments_exit_2_with_a_message_before_any_request(args: list[str], message: str) -> None:
    done = fleetctl(None, "samples", *args)  # no cloud-sync at that URL: the arguments fail first
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert message in done.stderr and "Traceback" not in done.stderr


def test_a_refused_export_exits_with_the_api_s_reason_and_writes_nothing(filled: SamplesApi, tmp_path: Path) -> None:
    done = fleetctl(filled, "samples", "export", "--model", "digits", "--out", str(tmp_path / "x"), token=VIEWER)
    assert done.returncode == 3 and "cloud-sync refused (403)" in done.stderr and "operator" in done.stderr
    assert list((tmp_path / "x").iterdir()) == []
    file_there = tmp_path / "file"
    file_there.write_text("")
    done = fleetctl(filled, "samples", "export", "--model", "digits", "--out", str(file_there))
    assert done.returncode == 2 and "is not a directory" in done.stderr
