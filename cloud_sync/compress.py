"""Model compression in the cloud: a parent version's ONNX bytes in, a variant's ONNX bytes, manifest and report out.

Every method is ONNX Runtime's own tooling (no hand-written quantizer): static INT8 with QDQ nodes, dynamic INT8,
FP16 weights. The variant keeps the parent's exact signature, which is checked on an ONNX Runtime session of the
result; its agreement with the parent, sizes and 1-thread CPU latency are measured on the same inputs. Not for
HTTP, the registry or where calibration data comes from (api_compress.py). numpy, onnx and onnxruntime are
imported inside the functions: a fleetctl-only install imports this module's names without them.
"""

from __future__ import annotations

import hashlib
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cloud_sync.errors import FailedPrecondition, InvalidArgument, NotInstalled

if TYPE_CHECKING:
    import numpy as np
    import onnxruntime as ort

    from edge_runtime.models.package import ModelManifest

__all__ = [
    "CALIBRATION_SOURCES",
    "MAX_CALIBRATION_BYTES",
    "MAX_EVALUATION_ROWS",
    "METHODS",
    "Calibration",
    "CompressionReport",
    "Variant",
    "calibration_digest",
    "compress",
    "method_of",
    "require_tooling",
]

# What `--to` says -> the manifest's lineage.method (edge_runtime/models/package.py COMPRESSION_METHODS).
METHODS = {"fp16": "fp16", "int8": "int8-static", "int8-dynamic": "int8-dynamic"}
CALIBRATION_SOURCES = ("fleet-samples", "upload", "warmup")
# Calibration arrays held in memory at once (the MinMax calibrator keeps every activation's range, not the rows,
# but the rows themselves are stacked): 512 mobilenet-bench inputs are 308 MB, past this; 256 are 154 MB.
MAX_CALIBRATION_BYTES = 256 * 1024 * 1024
# Agreement is measured on at most this many rows (a digits holdout is 450; mobilenet-bench costs ~65 ms a row).
MAX_EVALUATION_ROWS = 512
# Rows fed to the calibrator a run: bounds the augmented model's memory on a wide batch axis.
_CALIBRATION_CHUNK = 32
# Latency: batch 1, 1 intra-op thread, median of up to this many runs within _LATENCY_BUDGET_S.
_LATENCY_RUNS = 20
_LATENCY_BUDGET_S = 1.0
# The classifier's probabilities stay in float: a QDQ pair after Softmax rounds them to 1/127 steps, which ties
# top-1 candidates and flattens the uncertainty measures the agent keeps hard examples by.
_NOT_QUANTIZED = frozenset({"Softmax"})
_EVALUATION_SEED = 0
_PER_CHANNEL_OPS = frozenset({"Conv", "ConvTranspose"})


def require_tooling() -> None:
    """NotInstalled unless numpy, onnx and ONNX Runtime import here (the `compress` extra; cloud-sync's own
    install leaves them out, so a lean control plane never pulls the device runtime's weight)."""
    try:
        import numpy  # noqa: F401
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        raise NotInstalled(
            f"compressing a model needs numpy, onnx and ONNX Runtime ({exc.name or exc} is not installed here): "
            'install cloud-sync with pip install "edgefleet[cloud,compress]"'
        ) from None


def method_of(to: str) -> str:
    """The lineage method of a `--to` value (fp16, int8, int8-dynamic); InvalidArgument otherwise."""
    if to not in METHODS:
        raise InvalidArgument(f"to: {to!r} is not one of {', '.join(METHODS)}")
    return METHODS[to]


@dataclass(frozen=True)
class Calibration:
    """Representative inputs: each input's rows stacked along axis 0 (a batched model's batch axis; for a model
    without one, one request a row), where they came from, and the digest and query the lineage records."""

    source: str
    inputs: dict[str, np.ndarray]
    sha256: str = ""
    query: dict[str, Any] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return min((int(a.shape[0]) for a in self.inputs.values()), default=0)

    def lineage(self) -> dict[str, Any]:
        """The manifest's lineage.calibration entry."""
        entry: dict[str, Any] = {"source": self.source, "samples": self.rows, "sha256": self.sha256}
        if self.query:
            entry["query"] = dict(self.query)
        return entry


@dataclass(frozen=True)
class CompressionReport:
    """What the variant costs and how closely it follows its parent, measured on the same inputs."""

    method: str
    precision: str
    parent_bytes: int
    variant_bytes: int
    size_ratio: float
    evaluated_on: str  # calibration, warmup or random (seeded inputs of the signature's shapes)
    compared: int
    agreed: int
    agreement: float
    rule: str  # how rows were judged: "top-1 of probabilities", or elementwise with the tolerance
    parent_latency_ms: float
    variant_latency_ms: float
    latency_ratio: float
    seconds: float
    tool: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Variant:
    model: bytes
    manifest: dict[str, Any]
    report: CompressionReport

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.model).hexdigest()


def calibration_digest(inputs: dict[str, np.ndarray]) -> str:
    """A sha256 over the arrays' names, dtypes, shapes and bytes (in name order): what the lineage pins."""
    digest = hashlib.sha256()
    for name in sorted(inputs):
        array = inputs[name]
        digest.update(f"{name}\0{array.dtype.str}\0{list(array.shape)}\0".encode())
        digest.update(memoryview(array.tobytes()))
    return digest.hexdigest()


def compress(
    parent_model: bytes,
    parent_manifest: dict[str, Any],
    method: str,
    *,
    version: int,
    calibration: Calibration | None = None,
    warmup: dict[str, np.ndarray] | None = None,
    description: str = "",
) -> Variant:
    """Make `method`'s variant (fp16, int8-static, int8-dynamic) of the parent as version `version`.

    int8-static needs `calibration` (InvalidArgument without it). Agreement and latency are measured on the
    calibration rows, else the parent's `warmup` inputs, else seeded random inputs of the signature's shapes.
    FailedPrecondition when ONNX Runtime cannot load the parent or the variant changed the signature.
    """
    from edge_runtime.models.package import COMPRESSION_METHODS, Lineage

    started = time.monotonic()
    if method not in COMPRESSION_METHODS:
        raise InvalidArgument(f"method {method!r} is not one of {', '.join(COMPRESSION_METHODS)}")
    manifest = _parsed(parent_manifest)
    if manifest.lineage is not None:
        raise FailedPrecondition(
            f"{manifest.ref} is itself a {manifest.lineage.method} variant of "
            f"{manifest.name}:{manifest.lineage.parent_version}: compress that version"
        )
    parent_session = _session(parent_model, f"the parent {manifest.ref}")
    if calibration is not None:
        _check_inputs(manifest, calibration.inputs, f"calibration ({calibration.source})")
    static = calibration if method == "int8-static" else None
    if method == "int8-static" and (static is None or static.rows == 0):
        raise InvalidArgument(
            "static int8 quantization needs calibration data: samples the devices kept, an uploaded .npz, "
            "or a parent with warmup inputs"
        )
    try:
        if static is not None:
            model, tool = _int8_static(parent_model, manifest, static)
        elif method == "int8-dynamic":
            model, tool = _int8_dynamic(parent_model)
        else:
            model, tool = _fp16(parent_model)
    except Exception as exc:  # the tools raise what their graph passes hit: ValueError, KeyError, ORT's own
        raise FailedPrecondition(
            f"ONNX Runtime's {method} tooling failed on {manifest.ref}: {type(exc).__name__}: {str(exc)[:300]}"
        ) from None
    variant_session = _session(model, f"the {method} variant")
    _check_signature(parent_session, variant_session, method)

    evaluation, evaluated_on = _evaluation_inputs(manifest, calibration, warmup)
    compared, agreed, rule = _agreement(manifest, parent_session, variant_session, evaluation)
    parent_ms = latency_ms(parent_model, manifest, evaluation)
    variant_ms = latency_ms(model, manifest, evaluation)

    lineage = Lineage(
        parent_version=manifest.version,
        parent_sha256=manifest.sha256,
        method=method,
        tool=tool[:200],
        calibration=calibration.lineage() if method == "int8-static" and calibration is not None else None,
    )
    shown = {
        **parent_manifest,
        "version": version,
        "sha256": hashlib.sha256(model).hexdigest(),
        "size": len(model),
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "description": description or _description(method, manifest.ref),
        "lineage": lineage.to_dict(manifest.name),
    }
    checked = _parsed(shown)  # what we register must be what a device accepts
    report = CompressionReport(
        method=method,
        precision=lineage.precision,
        parent_bytes=len(parent_model),
        variant_bytes=len(model),
        size_ratio=len(model) / len(parent_model),
        evaluated_on=evaluated_on,
        compared=compared,
        agreed=agreed,
        agreement=agreed / compared if compared else 0.0,
        rule=rule,
        parent_latency_ms=parent_ms,
        variant_latency_ms=variant_ms,
        latency_ratio=variant_ms / parent_ms if parent_ms else float("nan"),
        seconds=time.monotonic() - started,
        tool=tool,
    )
    return Variant(model=model, manifest=checked.to_dict(), report=report)


def _description(method: str, ref: str) -> str:
    kind = {"int8-static": "int8 (static, QDQ)", "int8-dynamic": "int8 (dynamic)", "fp16": "fp16"}[method]
    return f"{kind} variant of {ref}"


def _parsed(manifest: dict[str, Any]) -> ModelManifest:
    import json

    from edge_runtime.errors import PackageError
    from edge_runtime.models.package import parse_manifest

    try:
        return parse_manifest(json.dumps(manifest).encode())
    except PackageError as exc:
        raise FailedPrecondition(f"the manifest does not describe a model a device accepts: {exc}") from None


def _session(model: bytes, what: str) -> ort.InferenceSession:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own Fail/InvalidGraph/... types, all plain Exceptions
        raise FailedPrecondition(f"ONNX Runtime cannot load {what}: {str(exc)[:300]}") from None


def _signature(session: ort.InferenceSession) -> list[tuple[str, str, str, tuple[Any, ...]]]:
    """(kind, name, type, shape) of each input and output; a symbolic or unknown dimension reads -1."""

    def dims(shape: list[Any]) -> tuple[Any, ...]:
        return tuple(d if isinstance(d, int) else -1 for d in shape)

    return [("input", a.name, a.type, dims(a.shape)) for a in session.get_inputs()] + [
        ("output", a.name, a.type, dims(a.shape)) for a in session.get_outputs()
    ]


def _check_signature(parent: ort.InferenceSession, variant: ort.InferenceSession, method: str) -> None:
    before, after = _signature(parent), _signature(variant)
    if before != after:
        changed = [f"{b} -> {a}" for b, a in zip(before, after, strict=False) if a != b] or [
            f"{len(before)} tensors -> {len(after)}"
        ]
        raise FailedPrecondition(
            f"the {method} variant changed the model's signature ({'; '.join(changed)}): refusing it, as apps "
            "and shadow comparisons rely on it"
        )


def _check_inputs(manifest: ModelManifest, inputs: dict[str, np.ndarray], what: str) -> None:
    """Each of the model's inputs present, of its datatype, its rows fitting its shape; InvalidArgument otherwise."""

    from edge_runtime.inference.tensors import dtype_of
    from edge_runtime.models.package import shape_fits

    missing = sorted({s.name for s in manifest.inputs} - set(inputs))
    if missing:
        raise InvalidArgument(f"{what}: no array for input(s) {', '.join(missing)} of {manifest.ref}")
    unknown = sorted(set(inputs) - {s.name for s in manifest.inputs})
    if unknown:
        raise InvalidArgument(f"{what}: {', '.join(unknown)} is not an input of {manifest.ref}")
    rows = {int(a.shape[0]) if a.ndim else 0 for a in inputs.values()}
    if len(rows) != 1 or 0 in rows:
        raise InvalidArgument(f"{what}: every input needs the same number of rows (axis 0), at least one")
    total = sum(a.nbytes for a in inputs.values())
    if total > MAX_CALIBRATION_BYTES:
        raise InvalidArgument(f"{what}: {total} bytes of inputs, past {MAX_CALIBRATION_BYTES}: use fewer samples")
    for spec in manifest.inputs:
        array = inputs[spec.name]
        if array.dtype != dtype_of(spec.datatype):
            raise InvalidArgument(f"{what}: {spec.name} is {array.dtype}, the model takes {spec.datatype}")
        row = (1, *array.shape[1:]) if manifest.batched else tuple(array.shape[1:])
        if not shape_fits(row, spec):
            raise InvalidArgument(
                f"{what}: {spec.name} rows of shape {list(array.shape[1:])} do not fit the input's {list(spec.shape)}"
            )


def _requests(manifest: ModelManifest, inputs: dict[str, np.ndarray], chunk: int) -> list[dict[str, np.ndarray]]:
    """The stacked rows as the model's requests: up to `chunk` rows each for a batched model, else one a row."""
    rows = min(int(a.shape[0]) for a in inputs.values())
    if manifest.batched:
        step = max(1, min(chunk, manifest.max_batch_size))
        return [{n: a[i : i + step] for n, a in inputs.items()} for i in range(0, rows, step)]
    return [{n: a[i] for n, a in inputs.items()} for i in range(rows)]


def _int8_static(model: bytes, manifest: ModelManifest, calibration: Calibration) -> tuple[bytes, str]:
    """QDQ nodes (what TensorRT 11's strongly typed networks build from), symmetric int8 activations and weights
    (TensorRT takes zero points of 0 only), per-channel weights in convolutional models, MinMax ranges."""
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry
    from onnxruntime.quantization.shape_inference import quant_pre_process

    requests = _requests(manifest, calibration.inputs, _CALIBRATION_CHUNK)

    class Rows(CalibrationDataReader):  # type: ignore[misc]  # ORT's class is untyped
        def __init__(self) -> None:
            self._rows = iter(requests)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._rows, None)

    graph_ops = {node.op_type for node in onnx.load_from_string(model).graph.node}
    ops = sorted((graph_ops & (set(QDQRegistry) | set(QLinearOpsRegistry))) - _NOT_QUANTIZED)
    # Per channel where convolutions are (a depthwise conv's channels differ in range by orders of magnitude);
    # per tensor otherwise: on digits' Gemms per channel agreed with the parent on 96.2% of the holdout, per
    # tensor on 99.6% (measured, ORT 1.32).
    per_channel = bool(graph_ops & _PER_CHANNEL_OPS)
    with tempfile.TemporaryDirectory(prefix="efc-int8-") as tmp:
        source, prepared, target = Path(tmp, "parent.onnx"), Path(tmp, "prepared.onnx"), Path(tmp, "variant.onnx")
        source.write_bytes(model)
        # Shape inference and graph optimisation first, as ORT recommends (symbolic shapes need sympy: skipped).
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared),
            str(target),
            Rows(),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=ops,
            per_channel=per_channel,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
        )
        result = target.read_bytes()
    weights = "per-channel" if per_channel else "per-tensor"
    tool = f"onnxruntime {ort.__version__} quantize_static QDQ s8s8 symmetric {weights} MinMax"
    return result, tool


def _int8_dynamic(model: bytes) -> tuple[bytes, str]:
    """Weights int8, activations quantized at run time (MatMulInteger/ConvInteger): ONNX Runtime on the CPU
    only; TensorRT cannot build these (it needs QDQ nodes or FP16 weights)."""
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory(prefix="efc-dyn-") as tmp:
        source, target = Path(tmp, "parent.onnx"), Path(tmp, "variant.onnx")
        source.write_bytes(model)
        quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8)
        result = target.read_bytes()
    return result, f"onnxruntime {ort.__version__} quantize_dynamic int8 weights"


def _fp16(model: bytes) -> tuple[bytes, str]:
    """FP16 weights and compute, FP32 inputs and outputs (keep_io_types): the signature is unchanged."""
    import onnx
    import onnxruntime as ort
    from onnxruntime.transformers.float16 import convert_float_to_float16

    converted = convert_float_to_float16(onnx.load_from_string(model), keep_io_types=True)
    return converted.SerializeToString(), f"onnxruntime {ort.__version__} convert_float_to_float16 keep_io_types"


def _evaluation_inputs(
    manifest: ModelManifest, calibration: Calibration | None, warmup: dict[str, np.ndarray] | None
) -> tuple[dict[str, np.ndarray], str]:
    if calibration is not None and calibration.rows:
        return {n: a[:MAX_EVALUATION_ROWS] for n, a in calibration.inputs.items()}, "calibration"
    if warmup is not None:
        stacked = warmup if manifest.batched else {n: a[None] for n, a in warmup.items()}
        _check_inputs(manifest, stacked, "the parent's warmup inputs")
        return stacked, "warmup"
    return _random_inputs(manifest), "random"


def _random_inputs(manifest: ModelManifest, rows: int = 64) -> dict[str, np.ndarray]:
    """Seeded inputs of the signature's shapes (a variable axis: warmup.shapes' size, else 1)."""
    import numpy as np

    from edge_runtime.inference.tensors import dtype_of

    rng = np.random.default_rng(_EVALUATION_SEED)
    shapes = manifest.warmup.shapes if manifest.warmup is not None else {}
    found = {}
    for spec in manifest.inputs:
        known = shapes.get(spec.name)
        dims = [d if d > 0 else (known[i] if known else 1) for i, d in enumerate(spec.shape)]
        row = dims[1:] if manifest.batched else dims
        dtype = dtype_of(spec.datatype)
        if dtype.kind == "f":
            found[spec.name] = rng.standard_normal((rows, *row)).astype(dtype)
        else:
            found[spec.name] = rng.integers(0, 2, (rows, *row)).astype(dtype)
    return found


def _agreement(
    manifest: ModelManifest,
    parent: ort.InferenceSession,
    variant: ort.InferenceSession,
    inputs: dict[str, np.ndarray],
) -> tuple[int, int, str]:
    """(compared, agreed, rule), judged as a shadow stage judges a candidate (edge_runtime/models/shadow.py)."""
    from edge_runtime.models.shadow import Comparator

    comparator = Comparator(manifest)
    names = [o.name for o in parent.get_outputs()]
    compared = agreed = 0
    for request in _requests(manifest, inputs, 256):
        a = dict(zip(names, parent.run(names, request), strict=True))
        b = dict(zip(names, variant.run(names, request), strict=True))
        n, ok = comparator.compare(a, b)
        compared, agreed = compared + n, agreed + ok
    return compared, agreed, comparator.rule


def latency_ms(model: bytes, manifest: ModelManifest, inputs: dict[str, np.ndarray]) -> float:
    """Median ms of one request of one row on the CPU with 1 intra-op thread (a warm-up run first)."""
    session = _session(model, "the model")
    request = _requests(manifest, {n: a[:1] for n, a in inputs.items()}, 1)[0]
    session.run(None, request)
    times: list[float] = []
    deadline = time.monotonic() + _LATENCY_BUDGET_S
    while len(times) < _LATENCY_RUNS and (len(times) < 3 or time.monotonic() < deadline):
        start = time.perf_counter()
        session.run(None, request)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)
