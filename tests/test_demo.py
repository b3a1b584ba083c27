"""`make demo` as a test: the whole loop runs with real processes and every program exits 0.

The demo checks its own claims as it goes (every device reports the assigned version ACTIVE, the policy's hash,
no agent restarted, the v2 rollout completes and the bad v3's is stopped in stage 1 by the agreement gate, the
INT8 variant of v2 completes its rollout, v2 is more accurate than v1 on v1's exported hard examples, no call
failed while models changed under the apps) and exits 1 when one does not hold; this test runs it on the
session's freshly built models and reads its exit code and the lines that state those claims.
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
    assert (models / "digits" / "3" / "manifest.json").is_file()  # the bad candidate, built by the same fixture
    done = subprocess.run(
        [sys.executable, "-m", "examples.demo", "--models", str(models), "--workdir", str(tmp_path / "demo")],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    out = done.stdout
    tail = out[-3000:]
    assert "the enrollment token was used already" in out  # a token is good once

    # v1 -> v2: every stage, the shadow stage on every device first, followed live by `rollouts watch` to exit 0.
    assert "   |     stage 1: shadow:100%:3s, 3 devices, done" in out
    assert "digits 1 -> 2 on site=demo (3 devices), completed, stage done" in out
    assert "(watch exited 0)" in out
    assert len(re.findall(r"shadowed v2 on 20% of requests .*: [1-9]\d* compared", out)) == 3  # each device's log

    # The bad v3: aborted in stage 1 by the agreement gate, the event carrying the values that decided it.
    assert "(watch exited 1)" in out and "digits 2 -> 3 on site=demo (3 devices), aborted, stage 1/3" in out
    assert re.search(r"gate_failed by gate: gate min_shadow_agreement failed: .*min_shadow_agreement 0 vs 0\.7\]", out)
    assert "by the gate: stage shadow:100%:3s, failed gate min_shadow_agreement {" in out
    assert len(re.findall(r"shadowed v3 on 20% of requests .*: [1-9]\d* compared, 0 agreed", out)) == 3
    assert out.count("desired v2 ACTIVE; reports v2 ACTIVE; converged") >= 3  # every device back on v2 alone

    # v2 compressed to INT8 in the cloud, calibrated on the devices' samples, and rolled out to the CPU class
    # through a shadow stage where it agreed with v2; then every device runs it and reports int8.
    registered = re.search(r"registered digits:(\d+): int8-static variant of digits:2 \(serial \d+; onnxruntime", out)
    assert registered, out[-6000:]
    variant = registered.group(1)
    assert re.search(r"calibrated on \d+ rows from fleet-samples", out)
    assert f"digits 2 -> {variant} on accel=none (3 devices), completed, stage done" in out
    assert len(re.findall(rf"shadowed v{variant} on 20% of requests .*: [1-9]\d* compared", out)) == 3
    assert "variant of digits:2: int8-static, computes in int8" in out
    assert f"running {variant} on onnxruntime/CPUExecutionProvider, precision int8, ACTIVE" in out
    assert f"digits:2 vs digits:{variant} on accel=none (3 devices)" in out

    # The feedback loop: v1's uncertain inputs exported, and v2 more accurate on exactly those (the demo checks it).
    hard = re.search(r"(\d+) hard examples of v1 .*v1 is right ([\d.]+)% of the time, v2 ([\d.]+)%", out)
    assert hard and int(hard.group(1)) > 0 and float(hard.group(3)) > float(hard.group(2)), out[-6000:]
    assert re.search(r"wrote \S+samples\.npz \(\d+ bytes, \d+ samples: uncertain \d+\) and \S+manifest\.json", out)

    # Apps called every device through the three rollouts: every call answered.
    answered = re.findall(r"calls answered, (\d+) failed", out)
    assert len(answered) == 9 and set(answered) == {"0"}, answered
    assert "digits:1 vs digits:2 on site=demo (3 devices)" in out  # models compare
    assert re.search(r"exit codes \[(0, )+0\]", tail), tail
