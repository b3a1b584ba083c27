"""Merging requests into a batch and splitting outputs back: as many results as requests, each its own rows."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge_runtime.batching.merge import merge_inputs, split_outputs
from edge_runtime.errors import EngineError

Array = np.ndarray[Any, Any]


def row_wise_model(inputs: dict[str, Array]) -> dict[str, Array]:
    """A model whose axis 0 is a batch axis: each output row depends only on its own input row."""
    x, ids = inputs["x"], inputs["ids"]
    flat = x.reshape(len(x), -1)
    return {"sum": flat.sum(axis=1) + ids[:, 0], "double": x * 2, "ids": ids.copy()}


# Each request: its rows, and a tag that makes its values its own.
requests_strategy = st.lists(st.integers(1, 5), min_size=1, max_size=12)
inner_strategy = st.lists(st.integers(1, 3), min_size=0, max_size=3)


@given(requests_strategy, inner_strategy)
def test_every_request_gets_exactly_its_own_rows_back(rows: list[int], inner: list[int]) -> None:
    requests = []
    for tag, count in enumerate(rows):
        x = np.full((count, *inner), float(tag), dtype=np.float32) + np.arange(count, dtype=np.float32).reshape(
            (count,) + (1,) * len(inner)
        )
        ids = np.full((count, 2), tag, dtype=np.int64)
        requests.append({"x": x, "ids": ids})
    merged = merge_inputs(requests, ["x", "ids"])
    assert merged["x"].shape[0] == sum(rows)
    split = split_outputs(row_wise_model(merged), rows, ["sum", "double", "ids"])
    assert len(split) == len(requests)  # as many results out as requests in
    for request, result in zip(requests, split, strict=True):
        alone = row_wise_model(request)  # what the request gets when it runs by itself
        assert sorted(result) == ["double", "ids", "sum"]
        for name, array in alone.items():
            np.testing.assert_array_equal(result[name], array)


@given(requests_strategy)
def test_only_the_named_outputs_are_split(rows: list[int]) -> None:
    total = sum(rows)
    outputs = {"y": np.arange(total), "extra": np.arange(total)}
    split = split_outputs(outputs, rows, ["y"])
    assert [list(r) for r in split] == [["y"]] * len(rows)
    assert np.concatenate([r["y"] for r in split]).tolist() == list(range(total))


@pytest.mark.parametrize(
    ("outputs", "reason"),
    [
        ({"y": np.zeros((3, 2))}, r"output 'y' has shape \[3, 2\] for a batch of 4 rows"),
        ({"y": np.zeros(())}, r"output 'y' has shape \[\] for a batch of 4 rows"),
        ({"z": np.zeros((4, 2))}, "the engine returned no output 'y'"),
    ],
)
def test_outputs_whose_axis_0_does_not_follow_the_batch_are_refused_not_sliced(
    outputs: dict[str, Array], reason: str
) -> None:
    with pytest.raises(EngineError, match=reason):
        split_outputs(outputs, [1, 3], ["y"])
    with pytest.raises(EngineError, match=reason):
        split_outputs(outputs, [4], ["y"])  # one request alone is checked the same way


def test_a_single_request_is_passed_through_without_copies() -> None:
    x = np.ones((2, 3), np.float32)
    assert merge_inputs([{"x": x}], ["x"])["x"] is x
    y = np.zeros((2, 1))
    assert split_outputs({"y": y}, [2], ["y"])[0]["y"] is y
