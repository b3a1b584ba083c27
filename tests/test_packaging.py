"""The install splits into extras: cloud-sync and fleetctl install and run without the device runtime.

The compress extra (model compression and the samples' export in the cloud) does pull numpy and ONNX Runtime:
without it cloud-sync still runs and answers those two calls 501 naming the extra.

Two checks: the dependency lists themselves (pyproject.toml, extras that name other extras followed), and
the code (cloud_sync imported in a fresh interpreter where importing numpy, ONNX Runtime, sqlite-utils,
psutil or edge_runtime fails, as on a machine that installed only `edgefleet[cloud]`).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from edge_runtime._compat import tomllib

ROOT = Path(__file__).resolve().parents[1]
DEVICE_ONLY = ("numpy", "onnx", "onnxruntime", "sqlite-utils", "psutil", "tensorrt", "pycuda")
_NAME = re.compile(r"^\s*([A-Za-z0-9_.-]+)(\[([^\]]*)\])?")


def _requirements(extra: str | None) -> set[str]:
    """Distribution names that `pip install edgefleet[extra]` asks for (base included, self-references followed)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    seen: set[str] = set()
    names: set[str] = set()
    pending = [None, extra]
    while pending:
        current = pending.pop()
        if current in seen:
            continue
        seen.add(current)  # type: ignore[arg-type]
        listed = project["dependencies"] if current is None else project["optional-dependencies"][current]
        for requirement in listed:
            match = _NAME.match(requirement)
            assert match, requirement
            name = match.group(1).lower()
            if name == project["name"]:
                pending += [e.strip() for e in (match.group(3) or "").split(",") if e.strip()]
            else:
                names.add(name)
    return names


def test_the_cloud_and_fleetctl_extras_pull_nothing_of_the_device_runtime() -> None:
    for extra in ("cloud", "fleetctl"):
        requirements = _requirements(extra)
        assert not requirements & set(DEVICE_ONLY), (extra, sorted(requirements & set(DEVICE_ONLY)))
    assert {"onnxruntime", "numpy", "onnx"} <= _requirements("agent")
    # Compression and the samples' export in the cloud are an extra of their own, on top of cloud-sync's.
    assert {"onnxruntime", "numpy", "onnx", "pyarrow"} <= _requirements("compress")
    assert "onnxruntime" not in _requirements(None), "the base install is what both sides share"


_BLOCKER = """
import importlib.abc, sys
BLOCKED = {blocked!r}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked: not in the cloud install)", name=name)
        return None
sys.meta_path.insert(0, Block())
"""

_CLOUD_SIDE = """
import cloud_sync.process, cloud_sync.fleetctl, cloud_sync.cli, cloud_sync.telemetry.acl
from cloud_sync.api import ApiContext, create_app
from prometheus_client import CollectorRegistry
from cloud_sync.store import DeviceRegistry, ResultStore, open_database
import tempfile, pathlib
db = open_database(f"sqlite:///{pathlib.Path(tempfile.mkdtemp()) / 'c.db'}")
create_app(ApiContext(DeviceRegistry(db), ResultStore(db), "x" * 40, CollectorRegistry()))
db.close()
sys.argv = ["fleetctl", "--help"]
try:
    cloud_sync.fleetctl.main()
except SystemExit as exc:
    assert exc.code == 0, exc.code
loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
assert not loaded, loaded
print("cloud side ok")
"""


def test_cloud_sync_and_fleetctl_run_without_the_device_runtime() -> None:
    blocked = ("numpy", "onnx", "onnxruntime", "sqlite_utils", "psutil", "edge_runtime", "tensorrt", "pycuda")
    script = _BLOCKER.format(blocked=set(blocked)) + _CLOUD_SIDE
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "cloud side ok" in done.stdout


_WITHOUT_THE_EXTRA = """
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry
from cloud_sync.api import ApiContext, create_app
from cloud_sync.api_compress import compress_routes
from cloud_sync.api_samples import samples_routes
from cloud_sync.store import DeviceRegistry, ResultStore, open_database
import json, tempfile, pathlib
db = open_database(f"sqlite:///{pathlib.Path(tempfile.mkdtemp()) / 'c.db'}")
token = "x" * 40
routes = [compress_routes(db, None, token), samples_routes(db, token)]
app = create_app(ApiContext(DeviceRegistry(db), ResultStore(db), token, CollectorRegistry(), extra_routes=routes))
auth = {"Authorization": f"Bearer {token}"}
with TestClient(app) as client:
    answers = [
        client.post("/v1/models/digits/2/compress", json={"to": "int8"}, headers=auth),
        client.get("/v1/samples/export?model=digits", headers=auth),
        client.get("/v1/samples?model=digits", headers=auth),
    ]
print(json.dumps([[a.status_code, a.json().get("detail") if a.status_code != 200 else a.json()] for a in answers]))
db.close()
"""


def test_without_the_compress_extra_compression_and_export_answer_501_naming_it() -> None:
    blocked = ("numpy", "onnx", "onnxruntime", "pyarrow", "edge_runtime")
    script = _BLOCKER.format(blocked=set(blocked)) + _WITHOUT_THE_EXTRA
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (compress, export, listing) = json.loads(done.stdout.strip().splitlines()[-1])
    for code, detail in (compress, export):
        assert code == 501 and 'pip install "edgefleet[cloud,compress]"' in detail, (code, detail)
    assert listing[0] == 200 and listing[1]["samples"] == [], listing  # listing needs no tensors
