"""Build the sample model packages from scratch, seeded, with no download: digits v1/v2, the bad rollout
candidates digits v3-v5 (models/build.py BAD_DIGITS) and mobilenet-bench.

Graphs are written by hand with onnx.helper so that tensor names, the dynamic batch axis and plain FP32
tensors are ours. Not a training framework: the models exist to exercise the runtime and rollouts.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import sklearn
from onnx import TensorProto, helper, numpy_helper
from sklearn.datasets import load_digits
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier

from edge_runtime.errors import PackageError
from edge_runtime.inference.tensors import TensorSpec
from edge_runtime.models.package import ModelPackage, read_package, write_package

__all__ = [
    "BAD_DIGITS",
    "MODEL_NAMES",
    "build_all",
    "build_bad_digits",
    "build_digits",
    "build_mobilenet",
    "builder_hash",
    "digits_holdout",
    "main",
]

OPSET = 17
# Every onnxruntime we support loads IR 8 / opset 17: 1.18+ (Python 3.10 devices stay below 1.24).
IR_VERSION = 8
SEED = 0
MODEL_NAMES = ("digits", "mobilenet-bench")
_BATCH = "batch"  # the symbolic first dimension of every input and output

# v1 is deliberately undertrained so that a v1 -> v2 rollout has a visible accuracy gain (~0.88 -> ~0.97).
_DIGITS_HIDDEN = {1: 8, 2: 64}
_DIGITS_ITERATIONS = {1: 100, 2: 150}
_PIXEL_MAX = 16.0  # load_digits pixels are integers 0..16


@functools.cache
def builder_hash() -> str:
    """sha256 of this file and of the library versions that shape its output: the cache key."""
    digest = hashlib.sha256(Path(__file__).read_bytes())
    digest.update(f"sklearn={sklearn.__version__};onnx={onnx.__version__}".encode())
    return digest.hexdigest()


def _finish(graph: onnx.GraphProto, doc: str) -> bytes:
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="edgefleet-models",
        doc_string=doc,
    )
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model.SerializeToString()


# --- digits -------------------------------------------------------------------------------------------------


@functools.cache
def _digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    pixels, labels = load_digits(return_X_y=True)
    train_x, test_x, train_y, test_y = train_test_split(
        pixels, labels, test_size=0.25, random_state=SEED, stratify=labels
    )
    return train_x, test_x, train_y, test_y


def digits_holdout() -> tuple[np.ndarray, np.ndarray]:
    """The fixed held-out split: raw 0..16 pixels as float32 (N x 64) and their int64 labels."""
    _, pixels, _, labels = _digits_split()
    return pixels.astype(np.float32), labels.astype(np.int64)


def _digits_graph(mlp: MLPClassifier, version: int) -> bytes:
    (w1, w2), (b1, b2) = mlp.coefs_, mlp.intercepts_
    inits = [
        numpy_helper.from_array(np.array(1.0 / _PIXEL_MAX, np.float32), "pixel_scale"),
        numpy_helper.from_array(w1.astype(np.float32), "hidden.weight"),
        numpy_helper.from_array(b1.astype(np.float32), "hidden.bias"),
        numpy_helper.from_array(w2.astype(np.float32), "out.weight"),
        numpy_helper.from_array(b2.astype(np.float32), "out.bias"),
    ]
    nodes = [
        # The model was trained on pixels / 16; scaling in the graph lets clients send raw pixels.
        helper.make_node("Mul", ["pixels", "pixel_scale"], ["scaled"]),
        helper.make_node("Gemm", ["scaled", "hidden.weight", "hidden.bias"], ["hidden.pre"]),
        helper.make_node("Relu", ["hidden.pre"], ["hidden"]),
        helper.make_node("Gemm", ["hidden", "out.weight", "out.bias"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        f"digits_v{version}",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, [_BATCH, 64])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [_BATCH, 10])],
        initializer=inits,
    )
    return _finish(graph, f"8x8 digit classifier v{version}: MLP with {w1.shape[1]} hidden units")


def onnx_accuracy(model: bytes | Path, pixels: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of a digits model run by onnxruntime on the CPU."""
    source = str(model) if isinstance(model, Path) else model
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    (probabilities,) = session.run(["probabilities"], {"pixels": pixels})
    return float(np.mean(np.argmax(probabilities, axis=1) == labels))


def build_digits(out: Path, version: int) -> ModelPackage:
    """Train digits `version` (1 or 2), export it, measure it with onnxruntime and write its package."""
    if version not in _DIGITS_HIDDEN:
        raise ValueError(f"digits has versions {sorted(_DIGITS_HIDDEN)}, not {version}")
    train_x, _, train_y, _ = _digits_split()
    mlp = MLPClassifier((_DIGITS_HIDDEN[version],), max_iter=_DIGITS_ITERATIONS[version], random_state=SEED)
    with warnings.catch_warnings():
        # Both stop at a fixed iteration count on purpose: v1 to stay weak, both to build in about a second.
        warnings.simplefilter("ignore", ConvergenceWarning)
        mlp.fit(train_x / _PIXEL_MAX, train_y)
    data = _digits_graph(mlp, version)
    accuracy = onnx_accuracy(data, *digits_holdout())
    return write_package(
        out / "digits" / str(version),
        data,
        name="digits",
        version=version,
        inputs=[TensorSpec("pixels", "FP32", (-1, 64))],
        outputs=[TensorSpec("probabilities", "FP32", (-1, 10))],
        max_batch_size=256,
        labels=[str(d) for d in range(10)],
        description=f"8x8 handwritten digits (scikit-learn), MLP {_DIGITS_HIDDEN[version]} hidden units; "
        "input raw pixel values 0..16",
        extra={"holdout_accuracy": round(accuracy, 4), "builder": builder_hash()},
    )


# --- bad candidates: what rollout gates must stop ----------------------------------------------------------

# digits versions that load and answer but must never reach a fleet; each is the kind of model a gate exists
# for. They share v2's network, so only the fault differs.
BAD_DIGITS = {
    3: "disagrees: trained on labels shifted by one, top-1 disagrees with v1/v2 on ~all inputs",
    4: "slow: v2's answers behind a chain of 512x512 products (several ms a request)",
    5: "fails to load: an operator no runtime implements",
}
_SLOW_WIDTH = 512
_SLOW_LAYERS = 48


def _slow_branch(nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto]) -> None:
    """Add `slow`, a [batch, 10] tensor of ~0 that costs _SLOW_LAYERS products of a 512x512 matrix; the logits
    become logits + 1e-30 * slow (numerically the same answers, as a data dependency the runtime must compute)."""
    rng = np.random.default_rng(SEED)
    inits += [
        numpy_helper.from_array(rng.standard_normal((64, _SLOW_WIDTH)).astype(np.float32) * 0.01, "slow.in"),
        numpy_helper.from_array(
            (rng.standard_normal((_SLOW_WIDTH, _SLOW_WIDTH)) / np.sqrt(_SLOW_WIDTH)).astype(np.float32), "slow.w"
        ),
        numpy_helper.from_array(rng.standard_normal((_SLOW_WIDTH, 10)).astype(np.float32) * 0.01, "slow.out"),
        numpy_helper.from_array(np.array(1e-30, np.float32), "slow.scale"),
    ]
    nodes.append(helper.make_node("MatMul", ["scaled", "slow.in"], ["slow.0"]))
    for i in range(_SLOW_LAYERS):
        nodes.append(helper.make_node("MatMul", [f"slow.{i}", "slow.w"], [f"slow.{i + 1}.pre"]))
        nodes.append(helper.make_node("Tanh", [f"slow.{i + 1}.pre"], [f"slow.{i + 1}"]))
    nodes.append(helper.make_node("MatMul", [f"slow.{_SLOW_LAYERS}", "slow.out"], ["slow.logits"]))
    nodes.append(helper.make_node("Mul", ["slow.logits", "slow.scale"], ["slow.tiny"]))


def build_bad_digits(out: Path, version: int) -> ModelPackage:
    """Write bad candidate `version` (BAD_DIGITS) of digits: a package as valid as v2's, with its fault."""
    if version not in BAD_DIGITS:
        raise ValueError(f"bad digits candidates are versions {sorted(BAD_DIGITS)}, not {version}")
    train_x, _, train_y, _ = _digits_split()
    labels = (train_y + 1) % 10 if version == 3 else train_y
    mlp = MLPClassifier((_DIGITS_HIDDEN[2],), max_iter=_DIGITS_ITERATIONS[2], random_state=SEED)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        mlp.fit(train_x / _PIXEL_MAX, labels)
    graph = onnx.load_from_string(_digits_graph(mlp, version)).graph
    nodes, inits = list(graph.node), list(graph.initializer)
    if version == 4:
        slow: list[onnx.NodeProto] = []
        _slow_branch(slow, inits)
        # The Softmax reads logits + the slow branch's ~0.
        softmax = nodes.index(next(n for n in nodes if n.op_type == "Softmax"))
        slow.append(helper.make_node("Add", ["logits", "slow.tiny"], ["logits.slow"]))
        nodes[softmax:] = [*slow, helper.make_node("Softmax", ["logits.slow"], ["probabilities"], axis=-1)]
    if version == 5:
        nodes.insert(0, helper.make_node("NoSuchOp", ["pixels"], ["ignored"], domain="ai.edgefleet.missing"))
    bad = helper.make_graph(nodes, graph.name, graph.input, graph.output, initializer=inits)
    model = helper.make_model(
        bad,
        opset_imports=[helper.make_opsetid("", OPSET)]
        + ([helper.make_opsetid("ai.edgefleet.missing", 1)] if version == 5 else []),
        producer_name="edgefleet-models",
    )
    model.ir_version = IR_VERSION
    model.doc_string = f"digits v{version}, a bad rollout candidate: {BAD_DIGITS[version]}"
    if version != 5:
        onnx.checker.check_model(model)
    return write_package(
        out / "digits" / str(version),
        model.SerializeToString(),
        name="digits",
        version=version,
        inputs=[TensorSpec("pixels", "FP32", (-1, 64))],
        outputs=[TensorSpec("probabilities", "FP32", (-1, 10))],
        max_batch_size=256,
        labels=[str(d) for d in range(10)],
        description=f"a bad rollout candidate: {BAD_DIGITS[version]}",
        extra={"bad_candidate": BAD_DIGITS[version], "builder": builder_hash()},
    )


# --- mobilenet-bench ----------------------------------------------------------------------------------------

# MobileNetV2 1.0: (expansion t, output channels c, repeats n, first stride s), as in the paper's table 2.
_MOBILENET_BLOCKS = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


@dataclass
class _Graph:
    """Accumulates nodes and initializers; each layer returns the name of its output tensor."""

    rng: np.random.Generator
    nodes: list[onnx.NodeProto]
    inits: list[onnx.TensorProto]

    def param(self, name: str, array: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(array.astype(np.float32), name))
        return name

    def conv(
        self,
        x: str,
        name: str,
        cin: int,
        cout: int,
        k: int = 1,
        stride: int = 1,
        groups: int = 1,
        relu6: bool = True,
    ) -> str:
        fan_in = cin // groups * k * k
        # He init keeps the activations' second moment roughly constant through ReLU layers, standing in
        # for the batch norm that a trained model folds into these weights; linear projections get gain 1.
        std = np.sqrt((2.0 if relu6 else 1.0) / fan_in)
        w = self.param(f"{name}.weight", self.rng.normal(0.0, std, (cout, cin // groups, k, k)))
        b = self.param(f"{name}.bias", np.zeros(cout))
        pad = k // 2
        self.nodes.append(
            helper.make_node(
                "Conv",
                [x, w, b],
                [f"{name}.conv"],
                kernel_shape=[k, k],
                strides=[stride, stride],
                pads=[pad] * 4,
                group=groups,
            )
        )
        if not relu6:
            return f"{name}.conv"
        self.nodes.append(helper.make_node("Clip", [f"{name}.conv", "relu6.min", "relu6.max"], [name]))
        return name

    def inverted_residual(self, x: str, name: str, cin: int, cout: int, expansion: int, stride: int) -> str:
        hidden, h = cin * expansion, x
        if expansion != 1:
            h = self.conv(h, f"{name}.expand", cin, hidden)
        h = self.conv(h, f"{name}.depthwise", hidden, hidden, k=3, stride=stride, groups=hidden)
        h = self.conv(h, f"{name}.project", hidden, cout, relu6=False)
        if stride != 1 or cin != cout:
            return h
        self.nodes.append(helper.make_node("Add", [x, h], [f"{name}.out"]))
        return f"{name}.out"


def _mobilenet_graph(seed: int = SEED) -> bytes:
    g = _Graph(np.random.default_rng(seed), [], [])
    g.param("relu6.min", np.array(0.0))
    g.param("relu6.max", np.array(6.0))
    x, cin = g.conv("input", "stem", 3, 32, k=3, stride=2), 32
    for stage, (t, c, n, s) in enumerate(_MOBILENET_BLOCKS):
        for i in range(n):
            x, cin = g.inverted_residual(x, f"block{stage}.{i}", cin, c, t, s if i == 0 else 1), c
    x = g.conv(x, "head", cin, 1280)
    g.nodes += [
        helper.make_node("GlobalAveragePool", [x], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["features"], axis=1),
    ]
    w = g.param("classifier.weight", g.rng.normal(0.0, np.sqrt(1.0 / 1280), (1000, 1280)))
    b = g.param("classifier.bias", np.zeros(1000))
    g.nodes.append(helper.make_node("Gemm", ["features", w, b], ["logits"], transB=1))
    graph = helper.make_graph(
        g.nodes,
        "mobilenet_bench",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [_BATCH, 3, 224, 224])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [_BATCH, 1000])],
        initializer=g.inits,
    )
    return _finish(graph, "MobileNetV2 1.0 layout, random weights, batch norm folded away; for benchmarks")


def parameter_count(model: onnx.ModelProto) -> int:
    """Number of scalar weights in a model's initializers."""
    return sum(int(np.prod(t.dims)) for t in model.graph.initializer)


def _check_outputs(data: bytes) -> None:
    # Random weights can saturate ReLU6 or die to a constant; a benchmark on either measures nothing real.
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    images = np.random.default_rng(SEED).random((1, 3, 224, 224), dtype=np.float32)
    (logits,) = session.run(["logits"], {"input": images})
    if not np.all(np.isfinite(logits)) or float(np.std(logits)) < 1e-3:
        raise RuntimeError(f"mobilenet-bench is degenerate: logits std {np.std(logits)}")


def build_mobilenet(out: Path) -> ModelPackage:
    """Write mobilenet-bench version 1: MobileNetV2-shaped, about 3.5 M seeded random parameters."""
    data = _mobilenet_graph()
    _check_outputs(data)
    return write_package(
        out / "mobilenet-bench" / "1",
        data,
        name="mobilenet-bench",
        version=1,
        inputs=[TensorSpec("input", "FP32", (-1, 3, 224, 224))],
        outputs=[TensorSpec("logits", "FP32", (-1, 1000))],
        max_batch_size=32,
        description="MobileNetV2-shaped, random weights, for benchmarks (NCHW 224x224 in, 1000 logits out)",
        extra={"parameters": parameter_count(onnx.load_from_string(data)), "builder": builder_hash()},
    )


# --- build all, cache, CLI ----------------------------------------------------------------------------------

_TARGETS: tuple[tuple[str, int, Callable[[Path], ModelPackage]], ...] = (
    ("digits", 1, lambda out: build_digits(out, 1)),
    ("digits", 2, lambda out: build_digits(out, 2)),
    *(("digits", v, lambda out, v=v: build_bad_digits(out, v)) for v in sorted(BAD_DIGITS)),
    ("mobilenet-bench", 1, build_mobilenet),
)


def _current(directory: Path) -> ModelPackage | None:
    """The package at `directory` if it reads back verified and was built by this exact builder."""
    try:
        package = read_package(directory, verify=True)
    except PackageError:
        return None
    return package if package.manifest.extra.get("builder") == builder_hash() else None


def _report(package: ModelPackage, status: str, seconds: float) -> str:
    m = package.manifest
    size = f"{m.size / 2**20:.1f} MiB" if m.size >= 2**20 else f"{m.size / 2**10:.1f} KiB"
    accuracy = m.extra.get("holdout_accuracy")
    if "bad_candidate" in m.extra:
        detail = f"bad: {m.extra['bad_candidate'].split(':')[0]}"
    elif accuracy is not None:
        detail = f"holdout accuracy {accuracy:.4f}"
    else:
        detail = f"{m.extra['parameters']:,} parameters"
    return f"{m.ref:<18} {size:>9}  {detail:<26} {status} in {seconds:.1f} s"


def build_all(out: Path, *, only: list[str] | None = None) -> list[ModelPackage]:
    """Build every sample package (or those named in `only`) under `out`, reusing current ones."""
    unknown = sorted(set(only or ()) - set(MODEL_NAMES))
    if unknown:
        raise ValueError(f"unknown model {', '.join(unknown)}; known: {', '.join(MODEL_NAMES)}")
    packages = []
    for name, version, build in _TARGETS:
        if only is not None and name not in only:
            continue
        start = time.monotonic()
        package = _current(out / name / str(version))
        status = "cached" if package else "built"
        package = package or build(out)
        print(_report(package, status, time.monotonic() - start), flush=True)
        packages.append(package)
    return packages


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.build", description=__doc__)
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("build/models"),
        help="directory that receives {name}/{version}/ (default: build/models)",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        choices=MODEL_NAMES,
        metavar="NAME",
        help=f"build only these models ({', '.join(MODEL_NAMES)})",
    )
    args = parser.parse_args(argv)
    build_all(args.out, only=args.only)
    return 0


if __name__ == "__main__":
    sys.exit(main())
