"""What shadow evaluation costs the active model: digits v1's p50 latency (in-process, batch 1, sequential
caller) with no shadow against the same with digits v2 as its shadow at a 10 % sample, in one run.

Target: p50 with the shadow / p50 without <= 1.10. Two repositories in one process, each with its own
engine sessions, alternate in runs of 100 calls (bench/inproc.py's round robin), so both see the same load;
the shadow's runs happen on its batcher's worker thread, off the timed call, as they do on a device.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from bench._harness import Options, Report, Target, median
from bench.inproc import _round_robin, repository_config
from edge_runtime import InferRequest, ModelRepository

__all__ = ["run"]

SAMPLE_RATE = 0.1
RATIO_LIMIT = 1.10
RUN = 100  # calls per turn of the round robin


def _package(options: Options, name: str, version: int) -> Path:
    package = options.models / name / str(version)
    if not (package / "model.onnx").is_file():
        raise FileNotFoundError(
            f"no package of {name}:{version} under {options.models}; build them with "
            f"`python -m models.build --out {options.models}` (make models)"
        )
    return package


def _as_version(package: Path, version: int, directory: Path) -> Path:
    """A copy of `package` renamed to `version` (the same network as its own shadow)."""
    copy = directory / str(version)
    shutil.copytree(package, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["version"] = version
    (copy / "manifest.json").write_text(json.dumps(manifest, sort_keys=True, indent=2) + "\n")
    return copy


def _open(data_dir: str, options: Options, active: Path, shadow: Path | None, name: str) -> ModelRepository:
    repo = ModelRepository(repository_config(data_dir, options.threads))
    repo.install(active)
    if shadow is not None:
        repo.install(shadow, activate=False)
        repo.prepare(name, 2)
        repo.set_shadow(name, 2, SAMPLE_RATE)
    return repo


def _measure(
    options: Options, name: str, active: Path, shadow: Path, inputs: list[dict[str, Any]], n: int, run_calls: int
) -> dict[str, Any]:
    with (
        tempfile.TemporaryDirectory(prefix="efb-shadow-") as plain_dir,
        tempfile.TemporaryDirectory(prefix="efb-shadow-") as shadow_dir,
    ):
        plain = _open(plain_dir, options, active, None, name)
        shadowed = _open(shadow_dir, options, active, shadow, name)
        k = len(inputs)
        try:
            paths = {
                "no shadow": lambda i: plain.infer(InferRequest(name, inputs[i % k])),
                "shadow 10%": lambda i: shadowed.infer(InferRequest(name, inputs[i % k])),
            }
            _round_robin(max(n // 10, 3), paths, run_calls)  # warm caches and allocators
            reps = [_round_robin(n, paths, run_calls) for _ in range(options.repeat)]
            counts = shadowed.clear_shadow(name)
        finally:
            plain.close()
            shadowed.close()
    assert counts is not None
    without = [rep["no shadow"].p50 * 1e6 for rep in reps]
    with_shadow = [rep["shadow 10%"].p50 * 1e6 for rep in reps]
    return {
        "p50_us_no_shadow": without,
        "p50_us_with_shadow": with_shadow,
        "paired_ratio": [w / o for w, o in zip(with_shadow, without, strict=True)],
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


def run(options: Options) -> Report:
    from models.build import digits_holdout

    report = Report(
        "shadow_overhead",
        options,
        {
            "caller": "one thread, sequential, batch 1",
            "models": "mobilenet-bench:1 shadowed by a copy of itself as version 2 (the target); digits:1 shadowed by "
            "digits:2 on held-out rows (the worst case: a 15 us model)",
            "sample_rate": SAMPLE_RATE,
            "statistic": "without and with the shadow alternate in runs of calls; median over repetitions of each "
            "one's p50; ratio paired per repetition",
        },
    )
    with tempfile.TemporaryDirectory(prefix="efb-shadow-pkg-") as packages:
        mobilenet = _package(options, "mobilenet-bench", 1)
        spec = json.loads((mobilenet / "manifest.json").read_text())["inputs"][0]
        frame = np.random.default_rng(0).random((1, *spec["shape"][1:]), dtype=np.float32)
        cnn = _measure(
            options,
            "mobilenet-bench",
            mobilenet,
            _as_version(mobilenet, 2, Path(packages)),
            [{spec["name"]: frame}],
            options.count(300, 20),
            10,
        )
    pixels = digits_holdout()[0]
    tiny = _measure(
        options,
        "digits",
        _package(options, "digits", 1),
        _package(options, "digits", 2),
        [{"pixels": pixels[i : i + 1]} for i in range(len(pixels))],
        options.count(3000, 200),
        RUN,
    )
    report.measurements = {"mobilenet-bench": cnn, "digits": tiny}
    for label, m in (("mobilenet-bench", cnn), ("digits", tiny)):
        s = m["shadow"]
        report.say(
            f"{label}: active p50 without a shadow {median(m['p50_us_no_shadow']):.1f} us, with a shadow at "
            f"{SAMPLE_RATE:.0%} {median(m['p50_us_with_shadow']):.1f} us (x{float(np.median(m['paired_ratio'])):.3f});"
            f" {s['mirrored']} mirrored ({s['dropped']} dropped), agreement {s['agreed']}/{s['compared']}"
        )
    report.ratios["p50_with_shadow_over_without_digits"] = float(np.median(tiny["paired_ratio"]))
    ratio = float(np.median(cnn["paired_ratio"]))
    report.ratios["p50_with_shadow_over_without"] = ratio
    report.target(
        Target(
            "active p50 with a 10% shadow / without (mobilenet-bench)",
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
