"""fleetctl models compress as a real process against a real admin API: the variant printed beside its parent,
its local calibration .npz uploaded first, the gated rollout started; bad arguments exit 2 with a message
before any request."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edge_runtime.models.package import write_npz
from tests.processes import REPO_ROOT

from .conftest import OPERATOR, CompressCloud

# fleetctl's own root with the command added as the lead registers it on models_app (cloud_sync/fleetctl_models.py);
# added here only while that line is not there yet.
_FLEETCTL = """
from cloud_sync.fleetctl import app
from cloud_sync.fleetctl_models import models_app
from cloud_sync.fleetctl_compress import models_compress
if not any(c.name == "compress" for c in models_app.registered_commands):
    models_app.command("compress")(models_compress)
app(prog_name="fleetctl")
"""


def fleetctl(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETCTL_") and k != "COLUMNS"}
    env.update(FLEETCTL_URL=url, FLEETCTL_TOKEN=OPERATOR, COLUMNS="200")
    return subprocess.run(
        [sys.executable, "-c", _FLEETCTL, "models", "compress", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO_ROOT,
        env=env,
    )


def test_compress_uploads_the_calibration_prints_the_variant_and_starts_a_shadow_rollout(
    cloud: CompressCloud, training_rows: np.ndarray, tmp_path: Path
) -> None:
    cloud.devices.add_device("lab-1", {"site": "lab"})
    cloud.assignments.assign("digits", 2, {})
    calibration = tmp_path / "calibration.npz"
    write_npz(calibration, {"pixels": training_rows})
    done = fleetctl(cloud.url, "digits:2", "--to", "int8", "--calibration", str(calibration), "--selector", "site=lab")
    assert done.returncode == 0, (done.stdout, done.stderr)
    assert "registered digits:3: int8-static variant of digits:2" in done.stdout
    assert "calibrated on 512 rows from upload" in done.stdout
    for row in ("size (bytes)", "CPU latency", "agreement (top-1 of probabilities, calibration inputs)"):
        assert row in done.stdout
    assert "started: shadow:100%:10m,active:10%:10m,active:100%" in done.stdout
    (rollout,) = cloud.api.get("/v1/rollouts").json()["rollouts"]
    assert rollout["to_version"] == 3 and rollout["from_version"] == 2 and rollout["selector"] == {"site": "lab"}
    assert rollout["stages"][0]["mode"] == "shadow"
    # Without --selector: a variant and no rollout; --json prints both.
    again = fleetctl(cloud.url, "digits:2", "--to", "fp16", "--json")
    assert again.returncode == 0, again.stderr
    shown = json.loads(again.stdout)
    assert shown["rollout"] is None and shown["variant"]["version"] == 4
    assert shown["variant"]["manifest"]["lineage"]["method"] == "fp16"
    assert cloud.versions() == [2, 3, 4]


BAD = [
    (["digits", "--to", "fp16"], "'digits' is not name:version"),
    (["digits:0", "--to", "fp16"], "'digits:0' is not name:version"),
    (["digits:2", "--to", "int4"], "--to 'int4' is not one of fp16, int8, int8-dynamic"),
    (["digits:2", "--to", "int8", "--calibration", "/no/such.npz"], "no such file"),
    (["digits:2", "--to", "int8", "--calibration", "{readme}"], "is not an .npz"),
    (["digits:2", "--to", "int8", "--calibration-limit", "10"], "give them with --calibration fleet"),
    (["digits:2", "--to", "int8", "--calibration", "fleet", "--since", "soon"], "--since 'soon' is not a duration"),
    (["digits:2", "--to", "int8", "--calibration", "fleet", "--calibration-limit", "0"], "--calibration-limit"),
    (["digits:2", "--to", "int8", "--selector", "site lab"], "--selector"),
    (["digits:2", "--to", "int8", "--selector", "site=lab", "--stages", "active:100%"], "starts with a shadow stage"),
    (["digits:2", "--to", "int8", "--selector", "site=lab", "--stages", "shadow:50%"], "--stages"),
    (["digits:2", "--to", "int8", "--selector", "site=lab", "--gates", "max_error_rate=0.1"], "judged by agreement"),
    (["digits:2", "--to", "int8", "--selector", "site=lab", "--gates", "speed=9"], "--gates"),
    (["digits:2", "--to", "fp16", "--version", "0"], "--version"),
]


@pytest.mark.parametrize(("args", "message"), BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_arguments_exit_2_with_a_message_and_change_nothing(
    cloud: CompressCloud, args: list[str], message: str
) -> None:
    readme = str(Path(REPO_ROOT) / "README.md")
    done = fleetctl(cloud.url, *[a.replace("{readme}", readme) for a in args])
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert message in " ".join(done.stderr.split()), done.stderr
    assert cloud.versions() == [2]


def test_what_the_api_refuses_exits_with_its_code_and_reason(cloud: CompressCloud) -> None:
    missing = fleetctl(cloud.url, "digits:9", "--to", "fp16")
    assert missing.returncode == 4 and "no model digits:9" in missing.stderr
    taken = fleetctl(cloud.url, "digits:2", "--to", "fp16", "--version", "2")
    assert taken.returncode == 2 and "digits:2 is registered already" in taken.stderr
    no_data = fleetctl(cloud.url, "digits:2", "--to", "int8", "--calibration", "warmup")
    assert no_data.returncode == 2 and "has no warmup inputs" in no_data.stderr
    assert cloud.versions() == [2]
