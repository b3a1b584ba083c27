"""Compressed variants against their parent, in one run: size, CPU latency and agreement of fp16, static int8 (QDQ)
and dynamic int8 variants of digits:2 and mobilenet-bench:1, made by cloud_sync/compress.py.

Latency is batch 1 on one intra-op thread, the parent and its variants interleaved, median over repetitions of
each one's median. Agreement is top-1 on held-out inputs the calibration never saw: the digits holdout split
(with each model's accuracy on it), seeded random inputs for mobilenet-bench (random weights: no labels).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from bench._harness import Options, Report, Target, interleaved, median
from cloud_sync.compress import Calibration, calibration_digest, compress

__all__ = ["run"]

METHODS = ("fp16", "int8-static", "int8-dynamic")
Array = np.ndarray[Any, Any]


def _session(model: bytes, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def _top1(session: ort.InferenceSession, name: str, rows: Array, chunk: int = 32) -> Array:
    out = [session.run(None, {name: rows[i : i + chunk]})[0] for i in range(0, len(rows), chunk)]
    found: Array = np.concatenate(out).argmax(axis=1)
    return found


def _latency_us(session: ort.InferenceSession, feed: dict[str, Array], calls: int) -> float:
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - start)
    return median(times) * 1e6


def _data(name: str, options: Options) -> tuple[str, Array, Array, Array | None]:
    """(input name, calibration rows, held-out rows, held-out labels or None)."""
    if name == "digits":
        from models.build import _digits_split, digits_holdout

        train = _digits_split()[0].astype(np.float32)
        pixels, labels = digits_holdout()
        return "pixels", np.ascontiguousarray(train[: options.count(512, 64)]), pixels, labels
    rng = np.random.default_rng(0)
    calibration = rng.standard_normal((options.count(16, 4), 3, 224, 224), dtype=np.float32)
    held_out = rng.standard_normal((options.count(32, 4), 3, 224, 224), dtype=np.float32)
    return "input", calibration, held_out, None


def _model(report: Report, options: Options, name: str, version: int) -> dict[str, Any]:
    directory = options.models / name / str(version)
    if not (directory / "model.onnx").is_file():
        raise FileNotFoundError(f"no {name}:{version} under {options.models}: run `python -m models.build` first")
    parent = (directory / "model.onnx").read_bytes()
    manifest = json.loads((directory / "manifest.json").read_bytes())
    input_name, rows, held_out, labels = _data(name, options)
    calibration = Calibration("upload", {input_name: rows}, calibration_digest({input_name: rows}))
    variants: dict[str, bytes] = {"parent": parent}
    made_s: dict[str, float] = {}
    for method in METHODS:
        started = time.monotonic()
        variants[method] = compress(parent, manifest, method, version=version + 100, calibration=calibration).model
        made_s[method] = time.monotonic() - started
    sessions = {key: _session(model, options.threads) for key, model in variants.items()}
    feed = {input_name: held_out[:1]}
    for session in sessions.values():
        session.run(None, feed)  # first run: allocations, not latency
    calls = options.count(200 if name == "digits" else 5, 2)

    def timer(session: ort.InferenceSession) -> Callable[[], float]:
        return lambda: _latency_us(session, feed, calls)

    reps = interleaved(options.repeat, {key: timer(session) for key, session in sessions.items()})
    top1 = {key: _top1(session, input_name, held_out) for key, session in sessions.items()}
    found: dict[str, Any] = {"held_out_rows": len(held_out), "calibration_rows": len(rows), "variants": {}}
    p50 = {key: median(values) for key, values in reps.items()}
    found["parent"] = {"bytes": len(parent), "p50_us": p50["parent"], "p50_us_reps": reps["parent"]}
    if labels is not None:
        found["parent"]["accuracy"] = float(np.mean(top1["parent"] == labels))
    for method in METHODS:
        entry: dict[str, Any] = {
            "bytes": len(variants[method]),
            "size_ratio": len(variants[method]) / len(parent),
            "p50_us": p50[method],
            "p50_us_reps": reps[method],
            "latency_ratio": p50[method] / p50["parent"],
            "agreement": float(np.mean(top1[method] == top1["parent"])),
            "made_s": made_s[method],
        }
        if labels is not None:
            entry["accuracy"] = float(np.mean(top1[method] == labels))
        found["variants"][method] = entry
        report.ratios[f"{name}_{method}_size"] = entry["size_ratio"]
        report.ratios[f"{name}_{method}_p50"] = entry["latency_ratio"]
    _print(report, f"{name}:{version}", found)
    return found


def _print(report: Report, ref: str, found: dict[str, Any]) -> None:
    parent = found["parent"]
    accuracy = "accuracy" in parent
    report.say(f"{ref}: agreement on {found['held_out_rows']} held-out rows, calibration {found['calibration_rows']}")
    header = f"  {'':14}{'bytes':>10}{'size':>8}{'p50 us':>10}{'latency':>9}{'agree':>8}"
    report.say(header + (f"{'accuracy':>10}" if accuracy else ""))
    report.say(
        f"  {'parent':14}{parent['bytes']:>10}{'1.00x':>8}{parent['p50_us']:>10.1f}{'1.00x':>9}{'-':>8}"
        + (f"{parent['accuracy']:>10.4f}" if accuracy else "")
    )
    for method, v in found["variants"].items():
        report.say(
            f"  {method:14}{v['bytes']:>10}{v['size_ratio']:>7.2f}x{v['p50_us']:>10.1f}{v['latency_ratio']:>8.2f}x"
            f"{v['agreement']:>8.4f}" + (f"{v['accuracy']:>10.4f}" if accuracy else "")
        )


def run(options: Options) -> Report:
    report = Report(
        "compression",
        options,
        {
            "models": ["digits:2", "mobilenet-bench:1"],
            "methods": {
                "fp16": "onnxruntime.transformers.float16.convert_float_to_float16(keep_io_types=True)",
                "int8-static": "onnxruntime.quantization.quantize_static, QDQ, s8s8 symmetric, per-channel, MinMax",
                "int8-dynamic": "onnxruntime.quantization.quantize_dynamic, int8 weights",
            },
            "latency": "batch 1, CPUExecutionProvider, intra-op threads as --threads; parent and variants "
            "interleaved; median over repetitions of each one's median",
            "agreement": "top-1 equal to the parent's on held-out rows (digits holdout split; mobilenet-bench: "
            "seeded N(0,1) inputs other than the calibration's)",
        },
    )
    digits = _model(report, options, "digits", 2)
    mobilenet = _model(report, options, "mobilenet-bench", 1)
    report.measurements = {"digits:2": digits, "mobilenet-bench:1": mobilenet}
    static = [found["variants"]["int8-static"] for found in (digits, mobilenet)]
    report.target(
        Target(
            "static INT8 variants at most half their parent's size",
            max(v["size_ratio"] for v in static),
            0.5,
            "x parent",
            "lower",
            "model.onnx bytes of the int8-static variant over its parent's: the larger of digits:2, mobilenet-bench:1",
            "weights that stay float (per-tensor Gemm scales, biases, a Softmax kept float) outweigh the int8 ones",
        )
    )
    report.target(
        Target(
            "static INT8 digits loses at most 1 point of held-out accuracy",
            digits["parent"]["accuracy"] - digits["variants"]["int8-static"]["accuracy"],
            0.01,
            "accuracy",
            "lower",
            "digits:2 accuracy on its 450-row holdout minus its int8-static variant's (calibrated on training rows)",
            "the calibration rows do not cover the holdout's activation ranges; calibrate on the fleet's samples",
        )
    )
    return report


def _main() -> None:  # pragma: no cover - `python -m bench --only compression` is the way in
    report = run(Options(Path("build/models")))
    report.write()


if __name__ == "__main__":  # pragma: no cover
    _main()
