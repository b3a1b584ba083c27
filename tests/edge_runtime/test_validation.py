"""Request validation against a signature: the fast path and the explaining path agree."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge_runtime.errors import InvalidInput
from edge_runtime.inference.tensors import TensorSpec
from edge_runtime.inference.validation import Signature, check_shape

VECTOR = Signature([TensorSpec("x", "FP32", (-1,))], [TensorSpec("y", "FP32", (-1,))], 8, 1 << 20)
IMAGE = Signature([TensorSpec("img", "UINT8", (-1, 2, 3))], [TensorSpec("y", "FP32", (-1, 1))], 4, 1 << 20)


def test_a_scalar_for_a_batched_vector_is_refused_cleanly() -> None:
    with pytest.raises(InvalidInput, match="rank 1"):
        VECTOR.validate({"x": np.array(1.0, np.float32)}, None)


@given(st.lists(st.integers(0, 6), min_size=0, max_size=4))
def test_any_shape_is_accepted_exactly_when_the_full_check_accepts_it(shape: list[int]) -> None:
    array: Any = np.zeros(shape, np.uint8)
    spec = IMAGE.inputs[0]
    try:
        check_shape("img", array.shape, spec, True, IMAGE.max_batch_size)
        expected_ok = True
    except InvalidInput:
        expected_ok = False
    try:
        arrays, rows, _group = IMAGE.validate({"img": array}, None)
    except InvalidInput:
        assert not expected_ok
    else:
        assert expected_ok and rows == shape[0] and arrays["img"] is array


AUDIO = Signature(
    [TensorSpec("audio", "FP32", (-1, -1)), TensorSpec("sr", "INT64", ())],
    [TensorSpec("speech", "FP32", (-1, 1))],
    0,
    1 << 20,
)


def test_a_scalar_input_takes_a_0_d_array_and_nothing_else() -> None:
    audio = np.zeros((1, 512), np.float32)
    arrays, rows, _group = AUDIO.validate({"audio": audio, "sr": np.array(16000, np.int64)}, None)
    assert arrays["sr"].shape == () and rows == 1
    for wrong in (np.array([16000], np.int64), np.array([[16000]], np.int64)):
        with pytest.raises(InvalidInput, match=r"input 'sr' has shape \[1(, 1)?\], the model expects rank 0: \[\]"):
            AUDIO.validate({"audio": audio, "sr": wrong}, None)
    with pytest.raises(InvalidInput, match="convert it with .astype"):
        AUDIO.validate({"audio": audio, "sr": np.array(16000, np.int32)}, None)


@given(st.lists(st.integers(0, 4), min_size=0, max_size=3))
def test_an_unbatched_model_takes_any_sizes_of_its_rank_and_counts_one_row(shape: list[int]) -> None:
    array: Any = np.zeros(shape, np.float32)
    ok = len(shape) == 2 and all(d >= 1 for d in shape)
    try:
        _arrays, rows, _group = AUDIO.validate({"audio": array, "sr": np.array(8000, np.int64)}, None)
    except InvalidInput:
        assert not ok
    else:
        assert ok and rows == 1
