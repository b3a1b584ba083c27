"""Making a model package from an ONNX file a user brings: what `edge-agent inspect` and `edge-agent package`
do, as a library.

Reads the inputs and outputs as ONNX Runtime sees them, decides from two real runs whether axis 0 is a
batch axis, takes representative warm-up inputs or shapes, writes the package and checks it as
`edge-agent install` will. The decisions (batch axis, which sizes are missing) are plain functions in
probe.py; this module runs the model and writes. Not for installing or serving: see store.py and repository.py.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.engines.onnxruntime import ORT_TYPES, open_session, tensor_spec
from edge_runtime.errors import EngineError, PackageError
from edge_runtime.inference.synthetic import example_inputs
from edge_runtime.inference.tensors import TensorSpec
from edge_runtime.models.checks import check_package
from edge_runtime.models.package import MODEL_FILE, ModelPackage, check_ref, read_package, shape_fits, write_package
from edge_runtime.models.probe import BatchVerdict, ModelView, batch_axis_blockers, missing_sizes, rows_follow
from edge_runtime.models.warmup import check_samples

__all__ = [
    "DEFAULT_MAX_BATCH_SIZE",
    "Inspection",
    "PackageRequest",
    "PackagingResult",
    "inspect_onnx",
    "package_model",
    "parse_shape",
]

Array = np.ndarray[Any, Any]
Say = Callable[[str], None]

# The manifest's max_batch_size when the model batches and the user names none: the agent's default
# inference.max_batch_size (a larger one only sizes TensorRT's buffers for batches the policy never forms).
DEFAULT_MAX_BATCH_SIZE = 32


@dataclass(frozen=True)
class PackageRequest:
    """What the user asked for (the command's arguments)."""

    model: Path
    name: str = ""
    version: int = 0
    out: Path = Path()
    # None: decide from the model (DEFAULT_MAX_BATCH_SIZE when it batches); an int insists on batching.
    max_batch_size: int | None = None
    batching: bool = True  # False: --no-batching
    labels: tuple[str, ...] = ()
    warmup_inputs: Mapping[str, Array] | None = None
    shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    description: str = ""
    force: bool = False  # replace what is at `out`


@dataclass(frozen=True)
class PackagingResult:
    package: ModelPackage
    view: ModelView
    verdict: BatchVerdict
    warmup: str  # how warm-up inputs are recorded, in words


def parse_shape(text: str) -> tuple[str, tuple[int, ...]]:
    """`--shape INPUT=D1xD2...` -> (input, shape); `sr=` is a scalar. PackageError on anything else."""
    name, sep, dims = text.rpartition("=")
    if not sep or not name:
        raise PackageError(f"--shape {text!r} must be INPUT=D1xD2... (e.g. images=1x3x640x640)")
    if not dims:
        return name, ()
    try:
        shape = tuple(int(d) for d in dims.lower().split("x"))
    except ValueError:
        raise PackageError(f"--shape {text!r}: {dims!r} is not sizes joined by 'x' (e.g. 1x3x640x640)") from None
    if any(d < 1 for d in shape):
        raise PackageError(f"--shape {text!r}: every size must be at least 1")
    return name, shape


# -- against ONNX Runtime ------------------------------------------------------------------------------


def _declared_ranks(data: bytes, path: Path) -> tuple[set[str], bool]:
    """Graph inputs and outputs whose rank the file declares, and whether it keeps weights outside."""
    import onnx

    try:
        model = onnx.load_model_from_string(data)
    except Exception as exc:  # protobuf's DecodeError and friends
        raise PackageError(f"{path} is not an ONNX model ({exc})") from exc
    graph = model.graph
    external = any(t.data_location == onnx.TensorProto.EXTERNAL for t in graph.initializer)
    ranked = {v.name for v in (*graph.input, *graph.output) if v.type.tensor_type.HasField("shape")}
    return ranked, external


def inspect_model(session: Any, ranked: set[str]) -> ModelView:
    """ONNX Runtime's view of the session's inputs and outputs; PackageError for inputs it cannot feed."""
    inputs: list[TensorSpec] = []
    for arg in session.get_inputs():
        spec = tensor_spec(arg)
        if spec is None:
            raise PackageError(
                f"input {arg.name!r} is {arg.type}: edge-agent feeds tensors of {', '.join(sorted(ORT_TYPES))}"
            )
        inputs.append(spec)
    outputs: list[TensorSpec] = []
    left_out: list[tuple[str, str]] = []
    for arg in session.get_outputs():
        spec = tensor_spec(arg)
        if spec is None:
            left_out.append((arg.name, str(arg.type)))
        else:
            outputs.append(spec)
    if not outputs:
        raise PackageError(f"the model has no tensor output edge-agent can serve (it has {left_out})")
    unranked = frozenset(s.name for s in (*inputs, *outputs) if not s.shape and s.name not in ranked)
    return ModelView(tuple(inputs), tuple(outputs), tuple(left_out), unranked)


def _run(session: Any, names: list[str], feed: Mapping[str, Array], what: str) -> dict[str, Array]:
    try:
        results = session.run(names, dict(feed))
    except Exception as exc:  # onnxruntime's own exception types
        shapes = {n: list(a.shape) for n, a in feed.items()}
        raise EngineError(f"the model failed {what} on inputs {shapes}: {exc}") from exc
    return dict(zip(names, results, strict=True))


def _row(arrays: Mapping[str, Array], index: int) -> dict[str, Array]:
    return {n: np.ascontiguousarray(a[index : index + 1]) for n, a in arrays.items()}


def _other_row(row: Mapping[str, Array], seed: int = 1) -> dict[str, Array]:
    """A second, different row from one: its values shuffled, so ids, masks and flags stay valid ones."""
    rng = np.random.default_rng(seed)
    return {n: rng.permutation(a.reshape(-1)).reshape(a.shape) for n, a in row.items()}


def detect_batching(session: Any, view: ModelView, sample: Mapping[str, Array]) -> BatchVerdict:
    """Whether axis 0 is a batch axis: declared variable everywhere, and batch 2 = two batch-1 runs."""
    blockers = batch_axis_blockers(view)
    if blockers:
        return BatchVerdict(False, "; ".join(blockers))
    if any(sample[s.name].ndim == 0 for s in view.inputs):
        return BatchVerdict(False, "an input is a scalar")
    names = [o.name for o in view.outputs]
    first = _row(sample, 0)
    rows = {int(a.shape[0]) for a in sample.values()}
    second = _row(sample, 1) if min(rows) >= 2 else _other_row(first)
    both = {n: np.concatenate([first[n], second[n]]) for n in first}
    try:
        alone = [_run(session, names, first, "at batch 1"), _run(session, names, second, "at batch 1")]
        together = _run(session, names, both, "at batch 2")
    except EngineError as exc:
        return BatchVerdict(False, f"a batch of 2 rows could not be checked ({exc})")
    difference = rows_follow(alone, together, names)
    if difference:
        return BatchVerdict(False, difference)
    return BatchVerdict(
        True, "every input and output has a variable axis 0, and a batch of 2 gave the rows of two batch-1 runs"
    )


def _sample(view: ModelView, request: PackageRequest) -> tuple[dict[str, Array], ModelView]:
    """One request's inputs to probe with (the user's, or generated at the given shapes), and the view with
    undeclared ranks filled in from them."""
    specs = {s.name: s for s in view.inputs}
    for name in request.shapes:
        if name not in specs:
            raise PackageError(f"--shape names {name!r}, which is not an input (inputs: {sorted(specs)})")
    if request.warmup_inputs is not None:
        given = {n: tuple(int(d) for d in a.shape) for n, a in request.warmup_inputs.items() if n in specs}
    else:
        given = dict(request.shapes)
    # An input whose rank the file leaves open takes the rank of its sample, every axis variable.
    inputs = tuple(
        replace(s, shape=(-1,) * len(given[s.name])) if s.name in view.unranked and s.name in given else s
        for s in view.inputs
    )
    view = replace(view, inputs=inputs)
    if request.warmup_inputs is not None:
        arrays = {n: np.require(a, requirements="C") for n, a in request.warmup_inputs.items()}
        check_samples(view.inputs, arrays, batched=False, where="--warmup-inputs")
        return arrays, view
    for spec in view.inputs:
        shape = given.get(spec.name)
        if shape is not None and not shape_fits(shape, spec):
            raise PackageError(
                f"--shape {spec.name}={'x'.join(map(str, shape))} does not fit input {spec.name!r} "
                f"{list(spec.shape)} (-1: any size)"
            )
    # Axis 0 may yet turn out to be a batch axis; _check_sizes_for asks for it once it is known not to be.
    missing = missing_sizes(view, set(given), batched=True)
    if missing:
        raise PackageError(
            f"no representative size for {'; '.join(missing)}: give one with --shape INPUT=D1xD2... "
            "or sample inputs with --warmup-inputs FILE.npz (warm-up and batch profiling run on them)"
        )
    return example_inputs(view.inputs, 1, shapes=given, batched=False), view


def _resolve_outputs(view: ModelView, outputs: Mapping[str, Array]) -> ModelView:
    """Outputs whose rank the file leaves open take the rank they came out with, every axis variable."""
    resolved = tuple(
        replace(o, shape=(-1,) * outputs[o.name].ndim) if o.name in view.unranked else o for o in view.outputs
    )
    return replace(view, outputs=resolved)


def _open(request: PackageRequest, say: Say) -> tuple[Any, set[str], bytes]:
    """The model's bytes, an ONNX Runtime session over them, and the names whose rank the file declares."""
    path = request.model
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise PackageError(f"cannot read {path}: {exc.strerror}") from exc
    say(f"reading {path} ({_size(len(data))})")
    ranked, external = _declared_ranks(data, path)
    if external:
        raise PackageError(
            f"{path} keeps its weights in external data files; a package holds one {MODEL_FILE}: save the model "
            "with onnx.save(model, path, save_as_external_data=False)"
        )
    try:
        session = open_session(data, intra_op_threads=1)
    except EngineError as exc:
        raise PackageError(f"{path} is not a model ONNX Runtime can load: {exc}") from exc
    return session, ranked, data


@dataclass(frozen=True)
class Inspection:
    """What `edge-agent inspect` finds and `edge-agent package` writes."""

    view: ModelView  # ranks resolved from the sample and the runs
    verdict: BatchVerdict
    max_batch_size: int
    warmup: str  # how warm-up inputs are recorded, in words
    data: bytes = field(repr=False)


def inspect_onnx(request: PackageRequest, say: Say = lambda line: None) -> Inspection:
    """Read and probe `request.model` as `package_model` would, writing nothing (name, version and out are
    not looked at); PackageError names what is wrong with the file or the arguments."""
    if request.warmup_inputs is not None and request.shapes:
        raise PackageError("give --warmup-inputs or --shape, not both (the .npz already has every input's shape)")
    session, ranked, data = _open(request, say)
    view = inspect_model(session, ranked)
    for name, kind in view.left_out:
        say(f"left out: output {name!r} is {kind}, not a tensor; edge-agent serves tensors only")
    sample, view = _sample(view, request)
    names = [o.name for o in view.outputs]
    try:
        view = _resolve_outputs(view, _run(session, names, sample, "on the warm-up inputs"))
    except EngineError as exc:
        raise PackageError(str(exc)) from exc
    verdict = BatchVerdict(False, "--no-batching") if not request.batching else detect_batching(session, view, sample)
    if request.max_batch_size is not None and not verdict.batched:
        raise PackageError(
            f"--max-batch-size {request.max_batch_size} asks for batching, but axis 0 is not a batch axis: "
            f"{verdict.reason} (package it with --no-batching)"
        )
    _check_sizes_for(view, request, verdict)
    if verdict.batched and request.warmup_inputs is not None:
        check_samples(view.inputs, sample, batched=True, where="--warmup-inputs")
    max_batch = (request.max_batch_size or DEFAULT_MAX_BATCH_SIZE) if verdict.batched else 0
    _say_view(say, view, verdict, max_batch)
    warmup = _warmup_words(request, sample)
    say(f"warm-up: {warmup}")
    return Inspection(view, verdict, max_batch, warmup, data)


def package_model(request: PackageRequest, say: Say = lambda line: None) -> PackagingResult:
    """Inspect, probe and package `request.model`; PackageError (bad input) or EngineError names the reason."""
    try:
        check_ref(request.name, request.version)
    except PackageError as exc:
        raise PackageError(f"--name/--version: {str(exc).removeprefix('invalid manifest: ')}") from None
    if request.out.exists() and any(request.out.iterdir()) and not request.force:
        raise PackageError(f"{request.out} exists and is not empty; choose another --out, or --force to replace it")
    found = inspect_onnx(request, say)
    package = _write(request, found.data, found.view.inputs, found.view.outputs, found.max_batch_size)
    say(f"wrote {package.directory} ({', '.join(package.files())})")
    return PackagingResult(package, found.view, found.verdict, found.warmup)


def _check_sizes_for(view: ModelView, request: PackageRequest, verdict: BatchVerdict) -> None:
    """An unbatched model's axis 0 is a variable axis like any other: it needs a representative size."""
    if verdict.batched or request.warmup_inputs is not None:
        return
    missing = missing_sizes(view, set(request.shapes), batched=False)
    if missing:
        raise PackageError(
            f"axis 0 is not a batch axis ({verdict.reason}), so it needs a representative size too: "
            f"{'; '.join(missing)}; give it with --shape INPUT=D1xD2... or --warmup-inputs FILE.npz"
        )


def _say_view(say: Say, view: ModelView, verdict: BatchVerdict, max_batch: int) -> None:
    for kind, specs in (("input", view.inputs), ("output", view.outputs)):
        for spec in specs:
            say(f"{kind:<6}  {spec.name}  {spec.datatype}  {list(spec.shape)}")
    if verdict.batched:
        say(f"batching: yes, max_batch_size {max_batch}: {verdict.reason}")
    else:
        say(f"batching: no (max_batch_size 0): {verdict.reason}")


def _warmup_words(request: PackageRequest, sample: Mapping[str, Array]) -> str:
    shapes = ", ".join(f"{n} {list(a.shape)}" for n, a in sample.items())
    if request.warmup_inputs is not None:
        return f"the inputs of --warmup-inputs, kept in the package ({shapes})"
    if request.shapes:
        return f"generated at the given shapes, kept in the manifest ({shapes})"
    return f"generated ({shapes}); the model has no variable axis besides the batch axis"


def _write(
    request: PackageRequest,
    data: bytes,
    inputs: tuple[TensorSpec, ...],
    outputs: tuple[TensorSpec, ...],
    max_batch: int,
) -> ModelPackage:
    """Write into a staging directory beside `out`, check it as `edge-agent install` would, then move it."""
    out = request.out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        write_package(
            staging,
            data,
            name=request.name,
            version=request.version,
            inputs=list(inputs),
            outputs=list(outputs),
            max_batch_size=max_batch,
            labels=list(request.labels),
            description=request.description,
            warmup_shapes=dict(request.shapes) if request.shapes else None,
            warmup_inputs=dict(request.warmup_inputs) if request.warmup_inputs is not None else None,
        )
        try:
            check_package(read_package(staging), runs=1, intra_op_threads=1)
        except EngineError as exc:
            raise PackageError(f"the package does not pass the install check: {exc}") from exc
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return read_package(out)


def _size(n: int) -> str:
    if n < 2**10:
        return f"{n} bytes"
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"
