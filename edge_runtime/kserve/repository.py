"""Triton's model-repository and model-configuration extensions, answered from what the agent holds.

RepositoryIndex lists every installed version with Triton's states (READY, LOADING, UNAVAILABLE and why);
ModelConfig gives what a Triton client reads from config.pbtxt (platform, batch size, tensors). Loading and
unloading are not the app's business on a device: the fleet's desired state decides what serves.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from edge_runtime.models.repository import ModelStatus
from edge_runtime.models.served import ModelState, ServedModel
from edgefleet.proto.inference import grpc_service_pb2 as pb

__all__ = ["LOAD_UNIMPLEMENTED", "model_config", "repository_index"]

LOAD_UNIMPLEMENTED = (
    "edge-agent does not load or unload models on request: what a device serves is the fleet's desired state "
    "(fleetctl models assign NAME VERSION --selector ...), or on the device `edge-agent install PACKAGE` and a "
    "restart of the agent"
)

# KServe datatype names -> Triton's model_config DataType.
DATA_TYPES: Mapping[str, int] = {
    "BOOL": pb.TYPE_BOOL,
    "UINT8": pb.TYPE_UINT8,
    "UINT16": pb.TYPE_UINT16,
    "UINT32": pb.TYPE_UINT32,
    "UINT64": pb.TYPE_UINT64,
    "INT8": pb.TYPE_INT8,
    "INT16": pb.TYPE_INT16,
    "INT32": pb.TYPE_INT32,
    "INT64": pb.TYPE_INT64,
    "FP16": pb.TYPE_FP16,
    "FP32": pb.TYPE_FP32,
    "FP64": pb.TYPE_FP64,
    "BYTES": pb.TYPE_STRING,
    "BF16": pb.TYPE_BF16,
}

_TRITON_STATE = {ModelState.READY: "READY", ModelState.LOADING: "LOADING", ModelState.FAILED: "UNAVAILABLE"}
NOT_LOADED = "installed, not loaded (not the active version)"


def repository_index(
    statuses: Sequence[ModelStatus], installed: Mapping[str, Iterable[int]], *, ready_only: bool
) -> list[pb.RepositoryIndexResponse.ModelIndex]:
    """Every version the agent holds or has installed, sorted by (name, version), as Triton's index.

    `installed`: model name -> versions on disk; those the agent has not loaded are UNAVAILABLE (Triton
    says "unloaded"). `ready_only`: only the READY ones, as Triton's `ready` flag asks.
    """
    Index = pb.RepositoryIndexResponse.ModelIndex
    found: dict[tuple[str, int], pb.RepositoryIndexResponse.ModelIndex] = {}
    for name, versions in installed.items():
        for version in versions:
            found[(name, version)] = Index(name=name, version=str(version), state="UNAVAILABLE", reason=NOT_LOADED)
    for status in statuses:
        found[(status.name, status.version)] = Index(
            name=status.name, version=str(status.version), state=_TRITON_STATE[status.state], reason=status.reason
        )
    rows = [found[key] for key in sorted(found)]
    return [row for row in rows if row.state == "READY"] if ready_only else rows


def model_config(served: ServedModel) -> pb.ModelConfig:
    """What Triton's config.pbtxt would say of a loaded version: dims without the batch axis when it batches."""
    m = served.manifest
    batched = m.max_batch_size > 0
    plan = served.batcher.plan
    policy = served.policy

    def dims(shape: Sequence[int]) -> list[int]:
        return list(shape[1:] if batched else shape)

    config = pb.ModelConfig(
        name=m.name,
        platform=served.engine.info.platform,
        backend=served.engine.info.backend,
        max_batch_size=m.max_batch_size,
        input=[pb.ModelInput(name=t.name, data_type=_data_type(t.datatype), dims=dims(t.shape)) for t in m.inputs],
        output=[pb.ModelOutput(name=t.name, data_type=_data_type(t.datatype), dims=dims(t.shape)) for t in m.outputs],
    )
    if batched:
        config.dynamic_batching.CopyFrom(
            pb.ModelDynamicBatching(
                preferred_batch_size=[plan.max_batch_size],
                max_queue_delay_microseconds=round(plan.max_queue_delay_s * 1e6),
                priority_levels=policy.priority_levels,
                default_priority_level=policy.default_priority,
            )
        )
    return config


def _data_type(datatype: str) -> pb.DataType.ValueType:
    return DATA_TYPES.get(datatype, pb.TYPE_INVALID)  # type: ignore[return-value]
