"""The JSON bodies of the KServe v2 REST metadata routes, in the shapes Triton's HTTP server and tritonclient.http use.

Plain functions over what the repository holds; the gRPC servicer answers the same questions in protobuf.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from edge_runtime.inference.stats import Duration
from edge_runtime.kserve.repository import model_config
from edge_runtime.models.served import ServedModel
from edgefleet.proto.inference import grpc_service_pb2 as pb

__all__ = ["config_json", "index_json", "metadata_json", "server_json", "statistics_json"]

_INT64 = {FieldDescriptor.CPPTYPE_INT64, FieldDescriptor.CPPTYPE_UINT64}


def server_json(name: str, version: str, extensions: Sequence[str]) -> dict[str, Any]:
    return {"name": name, "version": version, "extensions": list(extensions)}


def metadata_json(served: ServedModel, versions: Iterable[int]) -> dict[str, Any]:
    m = served.manifest
    return {
        "name": m.name,
        "versions": [str(v) for v in sorted(versions)],
        "platform": served.engine.info.platform,
        "inputs": [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in m.inputs],
        "outputs": [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in m.outputs],
    }


def config_json(served: ServedModel) -> dict[str, Any]:
    """Triton's config.pbtxt as JSON, with 64-bit integers as numbers (as Triton's HTTP server writes them)."""
    config = model_config(served)
    return _numbers(config, json_format.MessageToDict(config, preserving_proto_field_name=True))


def _numbers(message: Message, doc: dict[str, Any]) -> dict[str, Any]:
    """Protobuf's JSON writes int64 as strings; turn them back into numbers, field by field."""
    for field, value in message.ListFields():
        if field.name not in doc:
            continue
        if field.cpp_type in _INT64:
            doc[field.name] = [int(v) for v in value] if _repeated(field) else int(value)
        elif field.message_type is not None and not field.message_type.GetOptions().map_entry:
            if _repeated(field):
                doc[field.name] = [_numbers(v, d) for v, d in zip(value, doc[field.name], strict=True)]
            else:
                doc[field.name] = _numbers(value, doc[field.name])
    return doc


def _repeated(field: FieldDescriptor) -> bool:
    return bool(field.is_repeated)


def _duration(d: Duration) -> dict[str, int]:
    return {"count": d.count, "ns": d.ns}


_ZERO = {"count": 0, "ns": 0}


def statistics_json(served: Sequence[ServedModel]) -> dict[str, Any]:
    """Triton's statistics extension: what tritonclient.http.get_inference_statistics returns."""
    stats = []
    for s in served:
        snap = s.stats.snapshot()
        stats.append(
            {
                "name": s.name,
                "version": s.version_str,
                "last_inference": snap.last_inference_ms,
                "inference_count": snap.inference_count,
                "execution_count": snap.execution_count,
                "inference_stats": {
                    "success": _duration(snap.success),
                    "fail": _duration(snap.fail),
                    "queue": _duration(snap.queue),
                    "compute_input": dict(_ZERO),
                    "compute_infer": _duration(snap.compute_infer),
                    "compute_output": dict(_ZERO),
                    "cache_hit": dict(_ZERO),
                    "cache_miss": dict(_ZERO),
                },
                "batch_stats": [
                    {
                        "batch_size": size,
                        "compute_input": dict(_ZERO),
                        "compute_infer": _duration(snap.batches[size]),
                        "compute_output": dict(_ZERO),
                    }
                    for size in sorted(snap.batches)
                ],
            }
        )
    return {"model_stats": stats}


def index_json(rows: Sequence[pb.RepositoryIndexResponse.ModelIndex]) -> list[Mapping[str, str]]:
    """Triton's repository index over HTTP: a bare list of {name, version, state, reason}."""
    return [{"name": r.name, "version": r.version, "state": r.state, "reason": r.reason} for r in rows]
