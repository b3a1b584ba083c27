"""What shadow evaluation costs the active model: digits v1's p50 latency (in-process, batch 1, sequential
caller) with no shadow against the same with digits v2 as its shadow at a 10 % sample, in one run.

Target: p50 with the shadow / p50 without <= 1.10. Two repositories in one process, each with its own
engine sessions, alternate in runs of 100 calls (bench/inproc.py's round robin), so both see the same load;
the shadow's runs happen on its batcher's worker thread, off the timed call, as they do on a device.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from bench._harness import Options, Report, Target, median
from bench.inproc import _config, _round_robin
from edge_runtime import InferRequest, ModelRepository

__all__ = ["run"]

SAMPLE_RATE = 0.1
RATIO_LIMIT = 1.10
RUN = 100  # calls per turn of the round robin


def _package(options: Options, version: int) -> Path:
    package = options.models / "digits" / str(version)
    if not (package / "model.onnx").is_file():
        raise FileNotFoundError(
            f"no package of digits:{version} under {options.models}; build them with "
            f"`python -m models.build --out {options.models}` (make models)"
        )
    return package


def _open(data_dir: str, options: Options, shadow: bool) -> ModelRepository:
    repo = ModelRepository(_config(data_dir, options.threads))
    repo.install(_package(options, 1))
    if shadow:
        repo.install(_package(options, 2), activate=False)
        repo.prepare("digits", 2)
        repo.set_shadow("digits", 2, SAMPLE_RATE)
    return repo


def run(options: Options) -> Report:
    from models.build import digits_holdout

    n = options.count(3000, 200)
    report = Report(
        "shadow_overhead",
        options,
        {
            "caller": "one thread, sequential, batch 1, held-out digits rows",
            "active": "digits:1",
            "shadow": "digits:2",
            "sample_rate": SAMPLE_RATE,
            "iterations": n,
            "statistic": f"without and with the shadow alternate in runs of {RUN} calls; median over repetitions "
            "of each one's p50; ratio paired per repetition",
        },
    )
    pixels = digits_holdout()[0]
    inputs = [pixels[i : i + 1] for i in range(len(pixels))]
    k = len(inputs)
    with (
        tempfile.TemporaryDirectory(prefix="efb-shadow-") as plain_dir,
        tempfile.TemporaryDirectory(prefix="efb-shadow-") as shadow_dir,
    ):
        plain = _open(plain_dir, options, shadow=False)
        shadowed = _open(shadow_dir, options, shadow=True)
        try:
            paths = {
                "no shadow": lambda i: plain.infer(InferRequest("digits", {"pixels": inputs[i % k]})),
                "shadow 10%": lambda i: shadowed.infer(InferRequest("digits", {"pixels": inputs[i % k]})),
            }
            _round_robin(max(n // 10, 3), paths, RUN)  # warm caches and allocators
            reps = [_round_robin(n, paths, RUN) for _ in range(options.repeat)]
            counts = shadowed.clear_shadow("digits")
        finally:
            plain.close()
            shadowed.close()
    without = [rep["no shadow"].p50 * 1e6 for rep in reps]
    with_shadow = [rep["shadow 10%"].p50 * 1e6 for rep in reps]
    paired = [w / o for w, o in zip(with_shadow, without, strict=True)]
    assert counts is not None
    measured: dict[str, Any] = {
        "p50_us_no_shadow": without,
        "p50_us_with_shadow": with_shadow,
        "paired_ratio": paired,
        "no_shadow_blocks": [rep["no shadow"].summary() for rep in reps],
        "with_shadow_blocks": [rep["shadow 10%"].summary() for rep in reps],
        "shadow": {
            "mirrored": counts.mirrored,
            "dropped": counts.dropped,
            "failed": counts.failed,
            "compared": counts.compared,
            "agreed": counts.agreed,
            "observed_rate": counts.mirrored / (max(n // 10, 3) + n * options.repeat),
        },
    }
    report.measurements = measured
    report.say(
        f"digits:1 p50 without a shadow {median(without):.1f} us, with digits:2 shadowing at {SAMPLE_RATE:.0%} "
        f"{median(with_shadow):.1f} us; {counts.mirrored} mirrored ({counts.dropped} dropped), "
        f"top-1 agreement {counts.agreed}/{counts.compared}"
    )
    ratio = float(np.median(paired))
    report.ratios["p50_with_shadow_over_without"] = ratio
    report.target(
        Target(
            "active p50 with a 10% shadow / without",
            ratio,
            RATIO_LIMIT,
            "x",
            "lower",
            how="median over repetitions of p50 with the shadow / p50 without in the same repetition",
            reason="each mirrored request adds an input copy and a queue push to its caller, and the shadow's "
            "run competes for the CPU with the next active request",
        )
    )
    return report
