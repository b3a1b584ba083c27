"""The install splits into extras: cloud-sync and fleetctl install and run without the device runtime.

Two checks: the dependency lists themselves (pyproject.toml, extras that name other extras followed), and
the code (cloud_sync imported in a fresh interpreter where importing numpy, ONNX Runtime, sqlite-utils,
psutil or edge_runtime fails, as on a machine that installed only `edgefleet[cloud]`).
"""

from __future__ import annotations

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
