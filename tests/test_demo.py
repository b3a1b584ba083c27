"""`make demo` as a test: the whole loop runs with real processes and every program exits 0.

The demo checks its own claims as it goes (every device reports the assigned version ACTIVE, the policy's hash,
no agent restarted, no call failed during the switch) and exits 1 when one does not hold; this test runs it on
the session's freshly built models and reads its exit code and the lines that state those claims.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.processes import REPO_ROOT


@pytest.mark.slow
def test_make_demo_runs_the_whole_loop(model_packages: dict[str, Path], tmp_path: Path) -> None:
    models = model_packages["digits:1"].parents[1]
    done = subprocess.run(
        [sys.executable, "-m", "examples.demo", "--models", str(models), "--workdir", str(tmp_path / "demo")],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    out = done.stdout
    assert "the enrollment token was used already" in out  # a token is good once
    assert out.count("ACTIVE, converged") >= 3  # every device, on v2 at the end
    assert "0 failed" in out and re.search(r"exit codes \[(0, )+0\]", out), out[-2000:]
