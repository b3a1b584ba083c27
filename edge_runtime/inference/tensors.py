"""Tensor datatypes and signatures: KServe v2 names, numpy dtypes and ONNX element types in one table."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["DATATYPES", "TensorSpec", "datatype_of", "dtype_of", "onnx_elem_to_datatype"]

# KServe v2 datatype -> numpy dtype (little-endian, as the protocol's raw contents are).
DATATYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
_BY_DTYPE = {dtype: name for name, dtype in DATATYPES.items()}

# onnx.TensorProto element types (stable numbers of the ONNX spec) -> KServe datatype.
_ONNX_ELEM = {
    1: "FP32",
    2: "UINT8",
    3: "INT8",
    4: "UINT16",
    5: "INT16",
    6: "INT32",
    7: "INT64",
    9: "BOOL",
    10: "FP16",
    11: "FP64",
    12: "UINT32",
    13: "UINT64",
}


def dtype_of(datatype: str) -> np.dtype[Any]:
    """The numpy dtype of a KServe datatype name; KeyError if it is not one we serve."""
    return DATATYPES[datatype]


def datatype_of(dtype: np.dtype[Any]) -> str:
    """The KServe datatype name of a numpy dtype; KeyError if none."""
    return _BY_DTYPE[np.dtype(dtype)]


def onnx_elem_to_datatype(elem_type: int) -> str:
    try:
        return _ONNX_ELEM[elem_type]
    except KeyError:
        raise KeyError(f"ONNX element type {elem_type} is not supported") from None


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output. -1 in `shape` is a variable dimension."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    @property
    def dtype(self) -> np.dtype[Any]:
        return DATATYPES[self.datatype]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}
