"""deploy/jetson/install.sh, run for real into a throwaway root (`--root`): users, directories, the virtualenv,
pip, the config, the unit and its enablement; a second run changes nothing; upgrade and uninstall keep the data.

pip installs a wheel of this checkout built once per session (offline, `--no-deps`: the test is about the
script, and the project's dependencies would take minutes to install).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.deploy.units import JETSON

SCRIPT = JETSON / "install.sh"
CHECKOUT = Path(__file__).resolve().parents[2]
# The interpreter the venv is made from: the one running the tests (a venv's python makes venvs of its base).
PYTHON = sys.executable

as_root = pytest.mark.skipif(os.geteuid() != 0, reason="install.sh creates users and chowns: run the tests as root")
needs_tools = pytest.mark.skipif(
    not all(shutil.which(tool) for tool in ("systemctl", "useradd", "groupadd", "usermod")),
    reason="needs systemctl (Debian package systemd) and useradd/groupadd/usermod (passwd)",
)


@dataclass(frozen=True)
class Wheels:
    current: Path
    newer: Path  # the same code as version 0.1.1-test, for --upgrade


def _build_wheel(source: Path, out: Path) -> Path:
    offline = ["--no-deps", "--no-build-isolation", "--no-index"]
    subprocess.run(
        [PYTHON, "-m", "pip", "wheel", "--quiet", *offline, "-w", str(out), str(source)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = out.glob("edgefleet-*.whl")
    return wheel


@pytest.fixture(scope="session")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> Wheels:
    """Two wheels of this checkout (about 1.5 s each), built from a copy so the checkout gets no build/ files."""
    work = tmp_path_factory.mktemp("wheels")
    source = work / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(CHECKOUT / name, source / name)
    for package in ("edge_runtime", "cloud_sync", "edgefleet"):
        shutil.copytree(CHECKOUT / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    current = _build_wheel(source, work / "current")
    pyproject = source / "pyproject.toml"
    text = pyproject.read_text()
    assert '\nversion = "' in text
    pyproject.write_text(text.replace('\nversion = "', '\nversion = "0.1.1+test"\n# was: version = "', 1))
    shutil.rmtree(source / "build", ignore_errors=True)
    newer = _build_wheel(source, work / "newer")
    return Wheels(current, newer)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """An empty system: root in /etc/passwd, the video group JetPack has (no render group), a nologin shell."""
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    (root / "etc/group").write_text("root:x:0:\nvideo:x:44:\n")
    (root / "etc/shadow").write_text("root:*:19000:0:99999:7:::\n")
    (root / "etc/gshadow").write_text("root:*::\nvideo:!::\n")
    for name in ("shadow", "gshadow"):
        (root / "etc" / name).chmod(0o640)
    nologin = root / "usr/sbin/nologin"
    nologin.parent.mkdir(parents=True)
    nologin.write_text("#!/bin/sh\nexit 1\n")
    nologin.chmod(0o755)
    return root


def install(root: Path, *args: str, wheel: Path | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    command = [str(SCRIPT), "--root", str(root), "--python", PYTHON, *args]
    if wheel is not None:
        command += ["--package", str(wheel), "--pip-args", "--no-deps --no-index"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    if check:
        assert result.returncode == 0, f"install.sh {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result


def snapshot(root: Path) -> dict[str, tuple[object, ...]]:
    """Every path under root: type, mode, owner, mtime, and the sha256 of a file or the target of a link."""
    entries: dict[str, tuple[object, ...]] = {}
    for path in [root, *sorted(root.rglob("*"))]:
        st = path.lstat()
        if stat.S_ISLNK(st.st_mode):
            content: object = os.readlink(path)
        elif stat.S_ISREG(st.st_mode):
            content = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            content = None
        mode = stat.filemode(st.st_mode)
        entries[str(path.relative_to(root))] = (mode, st.st_uid, st.st_gid, st.st_mtime_ns, content)
    return entries


def passwd_entry(root: Path, file: str, name: str) -> list[str]:
    for line in (root / "etc" / file).read_text().splitlines():
        fields = line.split(":")
        if fields[0] == name:
            return fields
    raise AssertionError(f"{name} is not in {file}")


VENV = "opt/edgefleet/venv"
UNIT = "etc/systemd/system/edge-agent.service"
WANTS = "etc/systemd/system/multi-user.target.wants/edge-agent.service"
CONFIG = "etc/edgefleet/edge-agent.toml"
DATA = "var/lib/edgefleet"


@pytest.mark.slow
@as_root
@needs_tools
def test_install_twice_into_a_root_the_second_run_changes_nothing(root: Path, wheels: Wheels) -> None:
    first = install(root, wheel=wheels.current)
    assert "created the user edgefleet" in first.stdout and "enabled edge-agent.service" in first.stdout
    assert "started" not in first.stdout  # --root never starts anything
    user = passwd_entry(root, "passwd", "edgefleet")
    uid, gid = int(user[2]), int(user[3])
    assert user[5:] == ["/var/lib/edgefleet", "/usr/sbin/nologin"] and uid < 1000  # a system user, no login
    assert passwd_entry(root, "group", "edgefleet")[2] == str(gid)
    assert "edgefleet" in passwd_entry(root, "group", "video")[3].split(",")  # the GPU device nodes' group
    for path, mode, owner in ((CONFIG.rsplit("/", 1)[0], 0o750, (0, gid)), (DATA, 0o750, (uid, gid))):
        st = (root / path).stat()
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (mode, *owner), path
    st = (root / CONFIG).stat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o640, 0, gid)
    assert (root / CONFIG).read_text() == (JETSON / "edge-agent.toml").read_text()
    assert (root / UNIT).read_text() == (JETSON / "edge-agent.service").read_text()
    assert os.readlink(root / WANTS) == "/etc/systemd/system/edge-agent.service"
    assert os.readlink(root / "usr/local/bin/edge-agent") == "/opt/edgefleet/venv/bin/edge-agent"
    # The venv sees JetPack's tensorrt and pycuda in the system site-packages.
    assert "include-system-site-packages = true" in (root / VENV / "pyvenv.cfg").read_text()
    assert (root / VENV / "bin/edge-agent").exists()

    before = snapshot(root)
    second = install(root, wheel=wheels.current)
    assert second.stdout.strip() == "nothing to do: edge-agent is installed as configured"
    assert snapshot(root) == before


@pytest.mark.slow
@as_root
@needs_tools
def test_upgrade_and_uninstall_keep_the_config_and_the_data(root: Path, wheels: Wheels) -> None:
    """With another --venv throughout, which the unit's paths follow."""
    venv = ("--venv", "/srv/edgefleet/venv")
    install(root, *venv, wheel=wheels.current)
    unit = (root / UNIT).read_text()
    assert "ExecStart=/srv/edgefleet/venv/bin/edge-agent run --config /etc/edgefleet/edge-agent.toml" in unit
    assert "/opt/edgefleet" not in unit and not (root / VENV).exists()
    edited = (root / CONFIG).read_text().replace('log_level = "info"', 'log_level = "debug"')
    (root / CONFIG).write_text(edited)
    outbox = root / DATA / "outbox.db"
    outbox.write_bytes(b"results not uploaded yet")

    # A user-edited config is never overwritten, by a plain run or an upgrade.
    assert install(root, *venv, wheel=wheels.current).stdout.startswith("nothing to do")
    upgraded = install(root, *venv, "--upgrade", wheel=wheels.newer)
    assert "installed" in upgraded.stdout and "0.1.1+test" in upgraded.stdout
    assert f"kept /{CONFIG}" in upgraded.stdout
    assert (root / CONFIG).read_text() == edited
    assert outbox.read_bytes() == b"results not uploaded yet"
    assert list(root.glob("srv/edgefleet/venv/lib/python3*/site-packages/edgefleet-0.1.1+test.dist-info"))

    removed = install(root, *venv, "--uninstall")
    for gone in ("srv/edgefleet/venv", UNIT, WANTS, "usr/local/bin/edge-agent"):
        assert not os.path.lexists(root / gone), gone
    assert (root / CONFIG).read_text() == edited and outbox.exists()
    assert f"kept /{DATA} (--purge removes it)" in removed.stdout
    passwd_entry(root, "passwd", "edgefleet")  # the user stays: the kept files are its
    again = install(root, *venv, "--uninstall").stdout.splitlines()
    assert again[-1] == "nothing to do: edge-agent is not installed"

    install(root, *venv, "--uninstall", "--purge")
    assert not (root / CONFIG).exists() and not (root / DATA).exists()
    assert "edgefleet:" not in (root / "etc/passwd").read_text()
    assert "edgefleet" not in (root / "etc/group").read_text()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--bogus"], "unknown option: --bogus"),
        (["--venv"], "--venv needs a value"),
        (["--venv", "relative/venv"], "--venv must be an absolute path"),
        (["--upgrade", "--uninstall"], "--upgrade and --uninstall exclude each other"),
        (["--purge"], "--purge goes with --uninstall"),
        (["--root", "/nonexistent/edgefleet-root"], "--root /nonexistent/edgefleet-root is not a directory"),
    ],
)
def test_bad_options_exit_2_with_a_message_and_change_nothing(args: list[str], message: str, root: Path) -> None:
    before = snapshot(root)
    result = subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert snapshot(root) == before


@as_root
def test_without_systemd_running_it_says_what_to_do(tmp_path: Path) -> None:
    if Path("/run/systemd/system").is_dir():
        pytest.skip("systemd runs on this host: install.sh would really install")
    result = subprocess.run([str(SCRIPT)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "systemd is not running here" in result.stderr and "--root DIR" in result.stderr


@pytest.fixture
def unprivileged() -> Iterator[list[str]]:
    runner = shutil.which("setpriv")
    if os.geteuid() != 0 or runner is None:
        pytest.skip("needs root and setpriv to run the script as another user")
    yield [runner, "--reuid=65534", "--regid=65534", "--clear-groups"]


def test_not_root_it_says_to_use_sudo(unprivileged: list[str]) -> None:
    result = subprocess.run([*unprivileged, str(SCRIPT), "--no-start"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "run as root: sudo" in result.stderr and "--no-start" in result.stderr
