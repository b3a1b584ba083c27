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
