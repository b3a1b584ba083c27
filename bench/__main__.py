"""`python -m bench`: run the benchmarks (all, or --only some), print each target's verdict, write JSON."""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from bench import BENCHMARKS, MODULES
from bench._harness import RESULTS_DIR, Options, Report

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--models", type=Path, default=Path("build/models"), help="built model packages")
    parser.add_argument(
        "--only", action="append", choices=BENCHMARKS, metavar="NAME", help=f"run only NAME ({', '.join(BENCHMARKS)})"
    )
    parser.add_argument("--repeat", type=int, default=None, help="repetitions of each measurement (default 5)")
    parser.add_argument("--quick", action="store_true", help="tiny iteration counts: checks the plumbing only")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads, ours and raw alike")
    parser.add_argument("--results", type=Path, default=RESULTS_DIR, help=f"where JSON results go ({RESULTS_DIR})")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    repeat = args.repeat if args.repeat is not None else (1 if args.quick else 5)
    if repeat < 1 or args.threads < 1:
        print("python -m bench: --repeat and --threads must be at least 1", file=sys.stderr)
        return 2
    if not args.models.is_dir():
        print(
            f"python -m bench: no models at {args.models}; run `python -m models.build --out {args.models}`",
            file=sys.stderr,
        )
        return 2
    options = Options(args.models, repeat=repeat, quick=args.quick, threads=args.threads, results=args.results)
    _configure_logging()
    started = time.monotonic()
    reports: list[Report] = []
    for name in args.only or BENCHMARKS:
        module = importlib.import_module(f"bench.{MODULES.get(name, name)}")
        report: Report = module.run(options)
        report.write()
        reports.append(report)
    _summary(reports, time.monotonic() - started)
    return 0


def _configure_logging() -> None:
    # The in-process benchmarks load models through edge_runtime, which logs each step; keep stdout for results.
    from edgefleet.logs import configure_logging

    configure_logging("warning", sys.stderr)


def _summary(reports: Sequence[Report], seconds: float) -> None:
    print("\n== targets ==")
    for report in reports:
        for t in report.targets:
            op = "<=" if t.better == "lower" else ">="
            verdict = "MET" if t.met else "NOT MET"
            print(f"{verdict:8} {t.name}: {t.measured:.4g} {t.unit} (target {op} {t.limit:g})")
    print(f"== {len(reports)} benchmark(s) in {seconds:.0f} s ==")


if __name__ == "__main__":
    sys.exit(main())
