"""Shared benchmark plumbing: machine facts, interleaved repetitions and their medians, targets, JSON results.

Nothing here measures a path itself; each benchmark module measures ours and its baseline in the same run.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

__all__ = [
    "RESULTS_DIR",
    "Options",
    "Report",
    "Samples",
    "Target",
    "interleaved",
    "library_versions",
    "machine_info",
    "median",
    "percentile",
]

RESULTS_DIR = Path(__file__).resolve().parent / "results"
T = TypeVar("T")


@dataclass(frozen=True)
class Options:
    """What every benchmark is told: where the model packages are and how hard to measure."""

    models: Path
    repeat: int = 5
    quick: bool = False
    # ONNX Runtime intra-op threads, the same for our engine and for every raw baseline session.
    threads: int = 1
    results: Path = RESULTS_DIR

    def count(self, full: int, quick: int) -> int:
        """An iteration count: `full` normally, `quick` under --quick (smoke runs)."""
        return quick if self.quick else full

    def seconds(self, full: float, quick: float) -> float:
        return quick if self.quick else full

    def package(self, name: str) -> Path:
        """The highest good version of model `name` under --models (a package dir with model.onnx; never one
        of the bad rollout candidates models/build.py makes, which its manifest marks)."""
        versions = [
            p
            for p in (self.models / name).glob("*")
            if p.name.isdigit() and (p / "model.onnx").is_file() and b'"bad_candidate"' not in _manifest(p)
        ]
        if not versions:
            raise FileNotFoundError(
                f"no package of {name!r} under {self.models}; build them with "
                f"`python -m models.build --out {self.models}` (make models)"
            )
        return max(versions, key=lambda p: int(p.name))


@dataclass
class Target:
    """A goal from the issue, with the value this run measured."""

    name: str
    measured: float
    limit: float
    unit: str
    better: Literal["lower", "higher"]
    how: str = ""  # what exactly was measured
    reason: str = ""  # where the time or memory goes when the target is not met

    @property
    def met(self) -> bool:
        return self.measured <= self.limit if self.better == "lower" else self.measured >= self.limit

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "measured": self.measured,
            "limit": self.limit,
            "unit": self.unit,
            "comparison": "<=" if self.better == "lower" else ">=",
            "met": self.met,
            "how": self.how,
            "reason": "" if self.met else self.reason,
        }


class Report:
    """One benchmark's printed lines and JSON result (bench/results/<name>.json)."""

    def __init__(self, name: str, options: Options, params: Mapping[str, Any]) -> None:
        self.name = name
        self.options = options
        self.params = dict(params)
        self.measurements: dict[str, Any] = {}
        self.ratios: dict[str, float] = {}
        self.targets: list[Target] = []
        self.started = time.monotonic()
        self.date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        self.load_before = os.getloadavg()

    def say(self, text: str) -> None:
        print(f"[{self.name}] {text}", flush=True)

    def ratio(self, key: str, ours: float, baseline: float, what: str) -> float:
        """Record and print ours / baseline."""
        value = ours / baseline if baseline else float("nan")
        self.ratios[key] = value
        self.say(f"{what}: ours {ours:.4g} / baseline {baseline:.4g} = {value:.3f}x")
        return value

    def target(self, target: Target) -> Target:
        self.targets.append(target)
        op = "<=" if target.better == "lower" else ">="
        verdict = "MET" if target.met else "NOT MET"
        self.say(f"TARGET {target.name}: {target.measured:.4g} {target.unit} (target {op} {target.limit:g}) {verdict}")
        if not target.met and target.reason:
            self.say(f"  why: {target.reason}")
        return target

    def as_dict(self) -> dict[str, Any]:
        return {
            "benchmark": self.name,
            "date": self.date,
            "seconds": round(time.monotonic() - self.started, 3),
            "machine": {**machine_info(), "loadavg_before": self.load_before, "loadavg_after": os.getloadavg()},
            "versions": library_versions(),
            "repetitions": self.options.repeat,
            "quick": self.options.quick,
            "intra_op_threads": self.options.threads,
            "params": self.params,
            "measurements": self.measurements,
            "ratios": self.ratios,
            "targets": [t.as_dict() for t in self.targets],
        }

    def write(self) -> Path:
        self.options.results.mkdir(parents=True, exist_ok=True)
        path = self.options.results / f"{self.name}.json"
        path.write_text(json.dumps(self.as_dict(), indent=1, allow_nan=True) + "\n")
        self.say(f"wrote {path}")
        return path


def interleaved(repeat: int, runs: Mapping[str, Callable[[], T]]) -> dict[str, list[T]]:
    """Each measurement once per repetition, the order rotating, so drift on a shared box hits all alike."""
    names = list(runs)
    results: dict[str, list[T]] = {name: [] for name in names}
    for rep in range(repeat):
        k = rep % len(names)
        for name in names[k:] + names[:k]:
            results[name].append(runs[name]())
    return results


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linear between closest ranks."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def machine_info() -> dict[str, Any]:
    import psutil

    return {
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_mib": psutil.virtual_memory().total // 2**20,
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "platform": platform.platform(),
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def library_versions() -> dict[str, str]:
    import edge_runtime

    versions = {"edgefleet": edge_runtime.__version__}
    for dist in ("onnxruntime", "numpy", "grpcio", "protobuf"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = "absent"
    versions["python"] = sys.version.split()[0]
    return versions


@dataclass
class Samples:
    """Latencies of one block of iterations, in seconds."""

    values: list[float] = field(default_factory=list)

    @property
    def p50(self) -> float:
        return median(self.values)

    def summary(self, scale: float = 1e6) -> dict[str, float]:
        v = self.values
        return {
            "n": len(v),
            "p50": median(v) * scale,
            "p90": percentile(v, 90) * scale,
            "p99": percentile(v, 99) * scale,
            "mean": (sum(v) / len(v) * scale) if v else float("nan"),
        }


def _manifest(package: Path) -> bytes:
    try:
        return (package / "manifest.json").read_bytes()
    except OSError:
        return b""
