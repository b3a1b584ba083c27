"""docs/cloud-sync.md's "Getting started", followed literally: its console commands run in bash, in order.

Only what cannot be literal here is changed: the directory (`~/cloud-sync` -> a temporary one), the two ports
(7000, 8080 -> free ones) and the install steps (venv, activate, pip install), replaced by this checkout's
virtualenv on PATH. Each command's output must match what the page shows under it (`...` ends a prefix).
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cloud_sync.test_docs import CLOUD_SYNC_DOC, section
from tests.mosquitto import free_port

pytestmark = pytest.mark.slow

INSTALL_STEPS = ("python3 -m venv ", ". ", "pip install ")
MARK = "@@@ command "


def console_commands(text: str) -> list[tuple[str, list[str]]]:
    """The first console block's commands (a heredoc's lines belong to its command) with the output lines the
    page shows under each."""
    block = re.search(r"```console\n(.*?)```", text, re.DOTALL)
    assert block, "no console block"
    commands: list[tuple[str, list[str]]] = []
    heredoc = ""
    for line in block.group(1).splitlines():
        if heredoc:
            commands[-1] = (f"{commands[-1][0]}\n{line}", commands[-1][1])
            heredoc = "" if line == heredoc else heredoc
        elif line.startswith("$ "):
            command = line[2:]
            commands.append((command, []))
            if found := re.search(r"<<'(\w+)'", command):
                heredoc = found.group(1)
        elif line.strip():
            commands[-1][1].append(line)
    return commands


def test_the_getting_started_page_works_as_written(tmp_path: Path) -> None:
    grpc_port, http_port = free_port(), free_port()
    home = tmp_path / "home"
    home.mkdir()
    script = [
        "set -euo pipefail",
        # Whatever happens, the background cloud-sync does not outlive the script.
        "trap 'kill $(jobs -p) 2>/dev/null || true; wait' EXIT",
        f"mkdir -p {home}/cloud-sync",
    ]
    shown: list[list[str]] = []
    for number, (command, output) in enumerate(console_commands(section(CLOUD_SYNC_DOC, "Getting started"))):
        if command.startswith(INSTALL_STEPS):
            continue
        command = command.replace("~/cloud-sync", f"{home}/cloud-sync")
        command = command.replace(":7000", f":{grpc_port}").replace(":8080", f":{http_port}")
        script += [f"echo; echo '{MARK}{number}'", command]
        shown.append(output)
    script.append("wait")  # after `kill %1`: cloud-sync drains and exits
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "HOME": str(home)}
    env = {k: v for k, v in env.items() if not k.startswith("FLEETCTL_")}
    done = subprocess.run(
        ["bash", "-c", "\n".join(script)], capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path
    )
    assert done.returncode == 0, (done.stdout, done.stderr)

    outputs = [[line for line in chunk.splitlines()[1:] if line.strip()] for chunk in done.stdout.split(MARK)[1:]]
    assert len(outputs) == len(shown)
    for want, got in zip(shown, outputs, strict=True):
        for expected, actual in zip(want, got, strict=False):
            if expected.endswith("..."):
                assert actual.startswith(expected.removesuffix("...")), (expected, actual)
            else:
                assert actual == expected, (expected, actual)
        assert len(got) >= len(want), (want, got)

    workdir = home / "cloud-sync"
    token = workdir / "data" / "admin-token"
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    log = (workdir / "cloud-sync.log").read_text()
    assert '"event": "cloud_sync.ready"' in log and '"event": "cloud_sync.stopped"' in log, log
