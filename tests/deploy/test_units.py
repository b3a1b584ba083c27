"""The shipped systemd units: `systemd-analyze verify` accepts them without a word, and they hold the settings
the agent and cloud-sync depend on (notify + watchdog, the directories, no hardening that hides the GPU)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from edge_runtime.config import AgentConfig
from tests.deploy.units import CLOUD, JETSON, read_unit

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed (Debian package: systemd)"
)

AGENT_UNIT = JETSON / "edge-agent.service"
CLOUD_UNIT = CLOUD / "cloud-sync.service"
VENV = "/opt/edgefleet/venv"


def verify(unit: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """systemd-analyze verify on a copy whose ExecStart program exists (verify checks it is executable): the
    unit's venv is moved into tmp_path, as install.sh --venv rewrites it."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True, exist_ok=True)
    for program in ("edge-agent", "cloud-sync"):
        fake = venv / "bin" / program
        fake.write_text("#!/bin/sh\nexit 0\n")
        fake.chmod(0o755)
    copy = tmp_path / unit.name
    text = unit.read_text()
    assert VENV in text, f"{unit} no longer runs from {VENV}: update install.sh's rewrite and this test"
    copy.write_text(text.replace(VENV, str(venv)))
    assert SYSTEMD_ANALYZE is not None
    # --man=no: the units name no man pages; --generators=no: nothing of this host's boot is needed.
    return subprocess.run(
        [SYSTEMD_ANALYZE, "verify", "--man=no", "--generators=no", str(copy)],
        capture_output=True,
        text=True,
        timeout=60,
    )


@needs_systemd
@pytest.mark.parametrize("unit", [AGENT_UNIT, CLOUD_UNIT], ids=lambda p: p.name)
def test_systemd_analyze_verify_accepts_the_unit_without_a_warning(unit: Path, tmp_path: Path) -> None:
    result = verify(unit, tmp_path)
    # Unknown keys and bad values are warnings on stderr with exit status 0: both must be clean.
    assert result.returncode == 0 and result.stderr == "", result.stderr


@needs_systemd
def test_verify_reports_what_the_check_above_would_catch(tmp_path: Path) -> None:
    """The control: a misspelt directive and a missing program are reported, so a clean run means something."""
    broken = tmp_path / "src"
    broken.mkdir()
    unit = broken / "edge-agent.service"
    unit.write_text(AGENT_UNIT.read_text().replace("WatchdogSec=30", "WatchdogSecs=30"))
    result = verify(unit, tmp_path)
    assert "Unknown key" in result.stderr and "WatchdogSecs" in result.stderr
    missing = subprocess.run(
        [str(SYSTEMD_ANALYZE), "verify", "--man=no", "--generators=no", str(AGENT_UNIT)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert missing.returncode != 0 and f"{VENV}/bin/edge-agent" in missing.stderr


def test_the_agent_unit_is_notify_with_a_watchdog_and_the_agents_directories() -> None:
    service = read_unit(AGENT_UNIT)["Service"]
    defaults = AgentConfig()
    assert service["Type"] == ["notify"] and service["NotifyAccess"] == ["main"]
    assert service["WatchdogSec"] == ["30"] and service["Restart"] == ["on-failure"]
    assert service["ExecStart"] == [f"{VENV}/bin/edge-agent run --config /etc/edgefleet/edge-agent.toml"]
    assert service["User"] == ["edgefleet"] and service["Group"] == ["edgefleet"]
    # The example config's paths are the unit's directories.
    assert f"/var/lib/{service['StateDirectory'][0]}" == defaults.agent.data_dir
    runtime = Path("/run") / service["RuntimeDirectory"][0]
    assert Path(defaults.server.unix_socket).parent == runtime
    # Group members reach the 0660 socket; others do not get in.
    assert service["RuntimeDirectoryMode"][0] in ("0750", "0770")
    # The drain (gRPC server, then the model workers, each up to shutdown_grace_s) fits before SIGKILL.
    assert int(service["TimeoutStopSec"][0]) > 2 * defaults.agent.shutdown_grace_s


def test_the_agent_unit_hardens_without_hiding_the_gpu_or_breaking_jit() -> None:
    service = read_unit(AGENT_UNIT)["Service"]
    for key, value in {
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "NoNewPrivileges": "yes",
        "CapabilityBoundingSet": "",
        "AmbientCapabilities": "",
        "LockPersonality": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectControlGroups": "yes",
    }.items():
        assert service.get(key) == [value], key
    # Each of these would shut out /dev/nvhost-*, /dev/nvmap, /dev/nvgpu/* (ProtectClock implies a DeviceAllow=,
    # which turns the device policy into an allow-list); MemoryDenyWriteExecute breaks ONNX Runtime's and
    # TensorRT's JIT; a missing supplementary group fails the start.
    for key in ("PrivateDevices", "ProtectClock", "DeviceAllow", "DevicePolicy", "MemoryDenyWriteExecute"):
        assert key not in service, key
    assert "SupplementaryGroups" not in service
    assert set(service["RestrictAddressFamilies"][0].split()) == {"AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK"}


def test_the_cloud_sync_unit_runs_its_own_user_with_its_config_and_state() -> None:
    service = read_unit(CLOUD_UNIT)["Service"]
    # cloud-sync sends no READY: Type=notify would time out at every start.
    sources = (Path(__file__).resolve().parents[2] / "cloud_sync").rglob("*.py")
    assert not any("NOTIFY_SOCKET" in p.read_text() for p in sources), "cloud-sync notifies now: use Type=notify"
    assert service["Type"] == ["exec"]
    assert service["ExecStart"] == [f"{VENV}/bin/cloud-sync run --config /etc/edgefleet/cloud-sync.toml"]
    assert service["User"] == ["cloud-sync"] and service["StateDirectory"] == ["cloud-sync"]
    assert service["CapabilityBoundingSet"] == [""] and service["NoNewPrivileges"] == ["yes"]
    assert service["ProtectSystem"] == ["strict"]
