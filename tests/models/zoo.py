"""A zoo of small ONNX graphs shaped like the third-party models users bring (no downloads: onnx.helper).

Each builder returns the serialized model. The shapes, dtypes and failure modes are the point, not the
weights: a CNN classifier, a YOLO-style detector that cannot run below 32x32, a CRNN-like OCR model whose
output is time-major, a Silero-VAD-like model with a scalar `sr` and a recurrent state, a sentence encoder
(int64 ids + mask, variable length), a scikit-learn-style classifier with a ZipMap output, and a model
whose axis 0 is time.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["CASES", "ZOO", "ZooCase", "cnn", "detector", "encoder", "ocr", "tabular", "timeline", "vad", "vad_warmup"]

OPSET = 17
IR_VERSION = 8  # what every onnxruntime we support reads (Python 3.10 devices stay below 1.24)
_RNG_SEED = 11  # the tabular model's coefficients


def _finish(graph: onnx.GraphProto, *, ml: bool = False) -> bytes:
    opsets = [helper.make_opsetid("", OPSET)]
    if ml:
        opsets.append(helper.make_opsetid("ai.onnx.ml", 3))
    model = helper.make_model(graph, opset_imports=opsets, producer_name="edgefleet-tests-zoo")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _weights(name: str, *shape: int, scale: float = 0.5) -> onnx.TensorProto:
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)


def _const(name: str, value: Any, dtype: Any = np.int64) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value, dtype=dtype), name)


def cnn() -> bytes:
    """Image classifier: image FP32 [N, 3, 32, 32] -> probabilities FP32 [N, 10]."""
    nodes = [
        helper.make_node("Conv", ["image", "conv.w", "conv.b"], ["conv"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv"], ["relu"]),
        helper.make_node("GlobalAveragePool", ["relu"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["features"], axis=1),
        helper.make_node("Gemm", ["features", "fc.w", "fc.b"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "cnn",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 32, 32])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 10])],
        initializer=[
            _weights("conv.w", 8, 3, 3, 3),
            _weights("conv.b", 8),
            _weights("fc.w", 8, 10),
            _weights("fc.b", 10),
        ],
    )
    return _finish(graph)


def detector() -> bytes:
    """YOLO-style: images FP32 [N, 3, H, W] -> boxes FP32 [N, H/32 * W/32, 6].

    A stride-32 space-to-depth stem (as YOLOv5's Focus layer, by 32) needs H and W to be multiples of 32:
    at the 1x1 a guessing warm-up would pick, ONNX Runtime refuses to run it, as real detectors fail there.
    """
    nodes = [
        helper.make_node("SpaceToDepth", ["images"], ["cells"], blocksize=32),
        helper.make_node("Conv", ["cells", "head.w", "head.b"], ["head"], kernel_shape=[1, 1]),
        helper.make_node("Sigmoid", ["head"], ["scores"]),
        helper.make_node("Reshape", ["scores", "boxes.shape"], ["flat"]),
        helper.make_node("Transpose", ["flat"], ["boxes"], perm=[0, 2, 1]),
    ]
    graph = helper.make_graph(
        nodes,
        "detector",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info("boxes", TensorProto.FLOAT, ["N", "cells", 6])],
        initializer=[
            _weights("head.w", 6, 3 * 32 * 32, 1, 1, scale=0.02),
            _weights("head.b", 6),
            _const("boxes.shape", [0, 6, -1]),
        ],
    )
    return _finish(graph)


def ocr() -> bytes:
    """CRNN-like: image FP32 [N, 1, 32, W] -> logits FP32 [W, N, 11], time-major (CTC's layout)."""
    nodes = [
        helper.make_node("Conv", ["image", "conv.w", "conv.b"], ["conv"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv"], ["relu"]),
        helper.make_node("ReduceMean", ["relu"], ["columns"], axes=[2], keepdims=0),  # [N, 4, W]
        helper.make_node("Transpose", ["columns"], ["steps"], perm=[2, 0, 1]),  # [W, N, 4]
        helper.make_node("MatMul", ["steps", "fc.w"], ["scores"]),
        helper.make_node("Softmax", ["scores"], ["logits"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "ocr",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, 32, "W"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["T", "N", 11])],
        initializer=[_weights("conv.w", 4, 1, 3, 3), _weights("conv.b", 4), _weights("fc.w", 4, 11)],
    )
    return _finish(graph)


def vad() -> bytes:
    """Silero-VAD-like: input FP32 [B, samples], sr INT64 scalar, state FP32 [2, B, 128] ->
    output FP32 [B, 1], stateN FP32 [2, B, 128]. The state's batch axis is 1 and sr has no axis at all."""
    nodes = [
        helper.make_node("Mul", ["input", "input"], ["power"]),
        helper.make_node("ReduceMean", ["power"], ["energy"], axes=[1], keepdims=1),  # [B, 1]
        helper.make_node("Cast", ["sr"], ["sr.f"], to=TensorProto.FLOAT),
        helper.make_node("Div", ["sr.f", "sr.ref"], ["sr.scale"]),
        helper.make_node("Mul", ["energy", "sr.scale"], ["scaled"]),
        helper.make_node("ReduceMean", ["state"], ["memory"], axes=[0, 2], keepdims=0),  # [B]
        helper.make_node("Unsqueeze", ["memory", "axis1"], ["memory.col"]),  # [B, 1]
        helper.make_node("Add", ["scaled", "memory.col"], ["logit"]),
        helper.make_node("Sigmoid", ["logit"], ["output"]),
        helper.make_node("Unsqueeze", ["scaled", "axis0"], ["scaled.row"]),  # [1, B, 1]
        helper.make_node("Mul", ["state", "decay"], ["kept"]),
        helper.make_node("Add", ["kept", "scaled.row"], ["mixed"]),
        helper.make_node("Tanh", ["mixed"], ["stateN"]),
    ]
    graph = helper.make_graph(
        nodes,
        "vad",
        [
            helper.make_tensor_value_info("input", TensorProto.FLOAT, ["B", "samples"]),
            helper.make_tensor_value_info("sr", TensorProto.INT64, []),
            helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, "B", 128]),
        ],
        [
            helper.make_tensor_value_info("output", TensorProto.FLOAT, ["B", 1]),
            helper.make_tensor_value_info("stateN", TensorProto.FLOAT, [2, "B", 128]),
        ],
        initializer=[
            _const("sr.ref", 16000.0, np.float32),
            _const("axis0", [0]),
            _const("axis1", [1]),
            _const("decay", 0.9, np.float32),
        ],
    )
    return _finish(graph)


VOCABULARY = 100


def encoder() -> bytes:
    """Sentence encoder: input_ids INT64 [N, L], attention_mask INT64 [N, L] -> embeddings FP32 [N, 16]
    (embedding gather, then the mean over the positions the mask keeps)."""
    nodes = [
        helper.make_node("Gather", ["embedding", "input_ids"], ["tokens"]),  # [N, L, 16]
        helper.make_node("Cast", ["attention_mask"], ["mask.f"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["mask.f", "axis2"], ["mask.col"]),  # [N, L, 1]
        helper.make_node("Mul", ["tokens", "mask.col"], ["masked"]),
        helper.make_node("ReduceSum", ["masked", "axis1"], ["total"], keepdims=0),  # [N, 16]
        helper.make_node("ReduceSum", ["mask.col", "axis1"], ["count"], keepdims=0),  # [N, 1]
        helper.make_node("Max", ["count", "one"], ["count.safe"]),
        helper.make_node("Div", ["total", "count.safe"], ["embeddings"]),
    ]
    graph = helper.make_graph(
        nodes,
        "encoder",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["N", "L"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["N", "L"]),
        ],
        [helper.make_tensor_value_info("embeddings", TensorProto.FLOAT, ["N", 16])],
        initializer=[
            _weights("embedding", VOCABULARY, 16),
            _const("axis1", [1]),
            _const("axis2", [2]),
            _const("one", 1.0, np.float32),
        ],
    )
    return _finish(graph)


def tabular() -> bytes:
    """What scikit-learn converters emit: features FP32 [N, 4] -> label INT64 [N] and
    probabilities seq(map(int64, float)) through ai.onnx.ml's ZipMap, a non-tensor output."""
    rng = np.random.default_rng(_RNG_SEED)
    nodes = [
        helper.make_node(
            "LinearClassifier",
            ["features"],
            ["label", "scores"],
            domain="ai.onnx.ml",
            classlabels_ints=[0, 1, 2],
            coefficients=rng.standard_normal(12).astype(np.float32).tolist(),
            intercepts=[0.1, -0.2, 0.05],
            post_transform="SOFTMAX",
        ),
        helper.make_node("ZipMap", ["scores"], ["probabilities"], domain="ai.onnx.ml", classlabels_int64s=[0, 1, 2]),
    ]
    zipped = helper.make_sequence_type_proto(
        helper.make_map_type_proto(TensorProto.INT64, helper.make_tensor_type_proto(TensorProto.FLOAT, []))
    )
    graph = helper.make_graph(
        nodes,
        "tabular",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", 4])],
        [
            helper.make_tensor_value_info("label", TensorProto.INT64, ["N"]),
            helper.make_value_info("probabilities", zipped),
        ],
    )
    return _finish(graph, ml=True)


def timeline() -> bytes:
    """Axis 0 is time, not batch: frames FP32 [T, 4] -> running FP32 [T, 4], the running sum over time.
    Concatenating two requests' frames would add one request's past into the other's answer."""
    nodes = [helper.make_node("CumSum", ["frames", "axis0"], ["running"])]
    graph = helper.make_graph(
        nodes,
        "timeline",
        [helper.make_tensor_value_info("frames", TensorProto.FLOAT, ["T", 4])],
        [helper.make_tensor_value_info("running", TensorProto.FLOAT, ["T", 4])],
        initializer=[_const("axis0", 0)],
    )
    return _finish(graph)


ZOO: dict[str, Callable[[], bytes]] = {
    "cnn": cnn,
    "detector": detector,
    "ocr": ocr,
    "vad": vad,
    "encoder": encoder,
    "tabular": tabular,
    "timeline": timeline,
}


# -- how each is packaged and called ---------------------------------------------------------------------


Inputs = dict[str, np.ndarray[Any, Any]]


def _rng(i: int) -> np.random.Generator:
    return np.random.default_rng(1000 + i)


def _cnn_request(i: int) -> Inputs:
    return {"image": _rng(i).standard_normal((1 + i % 3, 3, 32, 32)).astype(np.float32)}


_SIZES = ((64, 96), (32, 32), (96, 64))


def _detector_request(i: int) -> Inputs:
    height, width = _SIZES[i % len(_SIZES)]
    return {"images": _rng(i).random((1 + i % 2, 3, height, width), dtype=np.float32)}


def _ocr_request(i: int) -> Inputs:
    return {"image": _rng(i).random((1, 1, 32, (40, 100, 64)[i % 3]), dtype=np.float32)}


def _vad_request(i: int) -> Inputs:
    rng = _rng(i)
    return {
        "input": rng.standard_normal((1, (512, 256)[i % 2])).astype(np.float32),
        "sr": np.array((16000, 8000)[i % 2], dtype=np.int64),
        "state": rng.standard_normal((2, 1, 128)).astype(np.float32),
    }


def _encoder_request(i: int) -> Inputs:
    rng = _rng(i)
    rows, length = 1 + i % 3, (5, 12, 30)[i % 3]
    ids = rng.integers(0, VOCABULARY, size=(rows, length)).astype(np.int64)
    mask = np.ones((rows, length), dtype=np.int64)
    mask[:, length - 1 - i % 3 :] = 0  # padding at the end, as tokenizers pad
    return {"input_ids": ids, "attention_mask": mask}


def _tabular_request(i: int) -> Inputs:
    return {"features": _rng(i).standard_normal((1 + i % 4, 4)).astype(np.float32)}


def _timeline_request(i: int) -> Inputs:
    return {"frames": _rng(i).standard_normal(((3, 16, 7)[i % 3], 4)).astype(np.float32)}


def vad_warmup() -> Inputs:
    """What a user records for a Silero-like VAD: real sizes, the real sample rate, a zero state."""
    return {
        "input": _rng(-1).standard_normal((1, 512)).astype(np.float32),
        "sr": np.array(16000, dtype=np.int64),
        "state": np.zeros((2, 1, 128), dtype=np.float32),
    }


@dataclass(frozen=True)
class ZooCase:
    """One zoo model: how `edge-agent package` is called for it, what it decides, and requests to send."""

    name: str
    build: Callable[[], bytes]
    args: tuple[str, ...]  # beyond the file, --name, --version and --out
    batched: bool
    outputs: tuple[str, ...]  # what the package serves
    request: Callable[[int], Inputs]  # the i-th request: sizes vary with i
    warmup: Callable[[], Inputs] | None = None  # written to an .npz and given as --warmup-inputs


CASES: dict[str, ZooCase] = {
    c.name: c
    for c in (
        ZooCase("cnn", cnn, (), True, ("probabilities",), _cnn_request),
        ZooCase("detector", detector, ("--shape", "images=1x3x64x96"), True, ("boxes",), _detector_request),
        ZooCase("ocr", ocr, ("--shape", "image=1x1x32x100"), False, ("logits",), _ocr_request),
        ZooCase("vad", vad, (), False, ("output", "stateN"), _vad_request, vad_warmup),
        ZooCase(
            "encoder",
            encoder,
            ("--shape", "input_ids=1x16", "--shape", "attention_mask=1x16"),
            True,
            ("embeddings",),
            _encoder_request,
        ),
        ZooCase("tabular", tabular, (), True, ("label",), _tabular_request),
        ZooCase("timeline", timeline, ("--shape", "frames=16x4"), False, ("running",), _timeline_request),
    )
}
