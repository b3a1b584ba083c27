"""Export files of kept samples for labelling and retraining: .npz or Parquet, each carrying its manifest.

Plain functions over decoded samples (cloud_sync/store/samples.py); no database, no HTTP. The manifest says what
is in the file: the query, counts per reason/device/version/engine, the created range, each tensor's name,
datatype and shape. Not the routes (cloud_sync/api_samples.py).
"""

from __future__ import annotations

import io
import json
import time
import zipfile
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from cloud_sync.errors import InvalidArgument
from cloud_sync.store.samples import EXPORT_MEDIA_TYPES, Sample, UndecodableSample, sample_tensors
from edge_runtime.inference.tensors import datatype_of

__all__ = ["FORMATS", "MANIFEST_KEY", "MANIFEST_MEMBER", "ExportFile", "Format", "decoded", "export_file"]

Format = Literal["npz", "parquet"]
FORMATS: tuple[Format, ...] = ("npz", "parquet")
MANIFEST_MEMBER = "manifest.json"  # in the .npz
MANIFEST_KEY = b"edgefleet.manifest"  # in the Parquet schema's metadata
MEDIA_TYPES = EXPORT_MEDIA_TYPES
# Per-row metadata arrays of the .npz (np.load keys "row/<name>"), in the order the Parquet columns take.
ROW_FIELDS = (
    "id",
    "device_id",
    "seq",
    "version",
    "created_at_ms",
    "received_at_ms",
    "reason",
    "measure",
    "score",
    "engine",
    "precision",
    "shadow_version",
)

Arrays = dict[str, np.ndarray[Any, Any]]


@dataclass(frozen=True)
class Decoded:
    """A sample with its tensors decoded."""

    sample: Sample
    inputs: Arrays
    outputs: Arrays


@dataclass(frozen=True)
class ExportFile:
    content: bytes
    media_type: str
    filename: str
    manifest: dict[str, Any]


def decoded(samples: Sequence[Sample]) -> tuple[list[Decoded], list[dict[str, Any]]]:
    """The samples whose tensors decode, and {id, device_id, seq, why} of each left out."""
    kept: list[Decoded] = []
    left_out: list[dict[str, Any]] = []
    for s in samples:
        try:
            kept.append(Decoded(s, *sample_tensors(s)))
        except UndecodableSample as exc:
            left_out.append({"id": s.id, "device_id": s.device_id, "seq": s.seq, "why": str(exc)})
    return kept, left_out


def _tensor_specs(rows: Sequence[Arrays], kind: str) -> list[dict[str, Any]]:
    """name, datatype, and shape (each row's, or null where rows differ) of every tensor of `kind`, checking
    that each name has one datatype and appears in every row."""
    names = sorted({name for row in rows for name in row})
    specs = []
    for name in names:
        arrays = [row.get(name) for row in rows]
        if any(a is None for a in arrays):
            raise InvalidArgument(
                f"{kind} {name!r} is missing from some samples (several signatures): narrow by version"
            )
        present = [a for a in arrays if a is not None]
        dtypes = {a.dtype for a in present}
        if len(dtypes) > 1:
            raise InvalidArgument(
                f"{kind} {name!r} has several datatypes ({', '.join(sorted(datatype_of(d) for d in dtypes))}): "
                "narrow by version"
            )
        shapes = {a.shape for a in present}
        specs.append(
            {
                "name": name,
                "datatype": datatype_of(present[0].dtype),
                "shape": list(present[0].shape) if len(shapes) == 1 else None,
            }
        )
    return specs


def manifest(
    rows: Sequence[Decoded],
    query: Mapping[str, Any],
    fmt: Format,
    left_out: Sequence[dict[str, Any]],
    page: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """What an export holds; `page` (next_after_id, more) says where the next export of the query starts."""
    samples = [r.sample for r in rows]
    created = [s.created_at_ms for s in samples]
    return {
        "format": fmt,
        "query": dict(query),
        "count": len(samples),
        "counts": {
            "reason": dict(Counter(s.reason for s in samples)),
            "device_id": dict(Counter(s.device_id for s in samples)),
            "version": {str(k): v for k, v in Counter(s.version for s in samples).items()},
            "engine": dict(Counter(s.engine for s in samples)),
        },
        "created_at_ms": {"min": min(created), "max": max(created)} if created else None,
        "inputs": _tensor_specs([r.inputs for r in rows], "input"),
        "outputs": _tensor_specs([r.outputs for r in rows], "output"),
        "left_out": list(left_out),
        **dict(page or {}),
        "exported_at_ms": int(time.time() * 1000),
    }


def _row_arrays(samples: Sequence[Sample]) -> Arrays:
    out: Arrays = {}
    for name in ROW_FIELDS:
        values = [getattr(s, name) for s in samples]
        if name == "score":
            out[name] = np.asarray(values, dtype=np.float64)
        elif isinstance(values[0] if values else 0, str):
            out[name] = np.asarray(values, dtype=np.str_)
        else:
            out[name] = np.asarray(values, dtype=np.int64)
    return out


def _npz(rows: Sequence[Decoded], info: dict[str, Any]) -> bytes:
    """A zip of .npy members: inputs/<name> and outputs/<name> stacked on a new first axis (one entry per
    sample) where every sample has the same shape, else inputs/<name>/<row>; row/<field>; manifest.json."""
    buffer = io.BytesIO()
    # ZIP_STORED: float tensors barely compress, and np.load reads members of either kind.
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:

        def put(member: str, array: np.ndarray[Any, Any]) -> None:
            with zf.open(f"{member}.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asarray(array), allow_pickle=False)

        for kind, specs in (("inputs", info["inputs"]), ("outputs", info["outputs"])):
            for spec in specs:
                name = spec["name"]
                arrays = [getattr(r, kind)[name] for r in rows]
                if spec["shape"] is not None:
                    put(f"{kind}/{name}", np.stack(arrays))
                else:
                    for i, array in enumerate(arrays):
                        put(f"{kind}/{name}/{i}", array)
        for field, values in _row_arrays([r.sample for r in rows]).items():
            put(f"row/{field}", values)
        zf.writestr(MANIFEST_MEMBER, json.dumps(info, indent=1))
    return buffer.getvalue()


def _parquet(rows: Sequence[Decoded], info: dict[str, Any]) -> bytes:
    """One row per sample: the row fields, then per tensor `<kind>/<name>` (its raw little-endian C-order
    bytes) and `<kind>/<name>.shape`; the manifest in the schema metadata."""
    import pyarrow as pa  # only the Parquet export needs it
    import pyarrow.parquet as pq

    columns: dict[str, pa.Array] = {}
    for field, values in _row_arrays([r.sample for r in rows]).items():
        columns[field] = pa.array(values.tolist(), type=pa.string() if values.dtype.kind == "U" else None)
    for kind, specs in (("inputs", info["inputs"]), ("outputs", info["outputs"])):
        for spec in specs:
            arrays = [np.ascontiguousarray(getattr(r, kind)[spec["name"]]) for r in rows]
            columns[f"{kind}/{spec['name']}"] = pa.array([a.tobytes() for a in arrays], type=pa.binary())
            columns[f"{kind}/{spec['name']}.shape"] = pa.array([list(a.shape) for a in arrays], pa.list_(pa.int64()))
    table = pa.table(columns).replace_schema_metadata({MANIFEST_KEY: json.dumps(info).encode()})
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


def export_file(
    samples: Sequence[Sample], query: Mapping[str, Any], fmt: Format, page: Mapping[str, Any] | None = None
) -> ExportFile:
    """The export of `samples` in `fmt`; InvalidArgument when their tensors cannot share one file."""
    rows, left_out = decoded(samples)
    info = manifest(rows, query, fmt, left_out, page)
    content = _npz(rows, info) if fmt == "npz" else _parquet(rows, info)
    return ExportFile(content, MEDIA_TYPES[fmt], f"samples.{fmt}", info)
