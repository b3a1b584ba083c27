"""Deciding which results go to the outbox, and building their records (off the caller's thread).

A result is kept when its request asks (`edgefleet.keep`), a share of the others is sampled with their
inputs (`upload.sample_rate`), and events (model failures, activations) are kept too. Encoding to protobuf
happens in the outbox's writer thread: the record carries a DeferredPayload (a closure and the bytes of the
arrays it holds, which the outbox's queue counts against its byte bound), not bytes.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import Future
from typing import Any, Protocol

import structlog

from edge_runtime.errors import EdgeRuntimeError
from edge_runtime.inference.types import InferResponse
from edge_runtime.kserve.codec import KEEP_PARAMETER, build_request, encode_response
from edge_runtime.outbox import DeferredPayload, OutboxRecord
from edgefleet.proto.edgefleet.v1 import results_pb2

__all__ = [
    "KEEP_ASYNC_PARAMETER",
    "KEEP_ERROR_PARAMETER",
    "KEEP_PRIORITY_PARAMETER",
    "KEPT_PARAMETER",
    "Keeper",
    "RecordSink",
    "keep_decision",
    "nbytes",
    "settle_kept",
]

log = structlog.get_logger(__name__)

KEEP_PRIORITY_PARAMETER = "edgefleet.keep_priority"
# By default a kept result is answered only once it is committed; this parameter answers at once.
KEEP_ASYNC_PARAMETER = "edgefleet.keep_async"
# Response parameters: whether the result was kept, and why not.
KEPT_PARAMETER = "edgefleet.kept"
KEEP_ERROR_PARAMETER = "edgefleet.keep_error"
# Outbox priorities (higher survives eviction longer): what an app asked to keep outlives samples.
PRIORITY_RESULT = 100
PRIORITY_EVENT = 50
PRIORITY_SAMPLE = 10
MAX_PRIORITY = 1000

NONE, RESULT, SAMPLE = 0, results_pb2.RECORD_KIND_RESULT, results_pb2.RECORD_KIND_SAMPLED_INPUT
# What an encoded message adds to its tensors' bytes: names, datatypes, shapes, parameters (an estimate; the
# outbox checks the encoded size exactly).
_MESSAGE_OVERHEAD_BYTES = 512


class RecordSink(Protocol):
    """Where kept records go: the outbox (`Outbox.append`)."""

    def append(self, record: OutboxRecord) -> Future[int]: ...


def keep_decision(parameters: Mapping[str, Any], sample_rate: float, draw: float) -> int:
    """RESULT when the request asks to keep its result, SAMPLE for a sampled one, else NONE."""
    if parameters.get(KEEP_PARAMETER) is True:
        return RESULT
    return SAMPLE if draw < sample_rate else NONE


def keep_priority(parameters: Mapping[str, Any], kind: int) -> int:
    value = parameters.get(KEEP_PRIORITY_PARAMETER)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_PRIORITY:
        return value
    return PRIORITY_RESULT if kind == RESULT else PRIORITY_SAMPLE


class Keeper:
    """Hands kept results and events to the outbox; never fails the inference that produced them."""

    def __init__(self, sink: RecordSink, sample_rate: float = 0.0) -> None:
        self._sink = sink
        self.sample_rate = sample_rate
        self._random = random.Random()
        self.dropped = 0  # records the outbox refused (full queue, shutting down): counted, logged

    def decide(self, parameters: Mapping[str, Any]) -> int:
        draw = self._random.random() if self.sample_rate > 0 else 1.0
        return keep_decision(parameters, self.sample_rate, draw)

    def keep(
        self,
        kind: int,
        response: InferResponse,
        version: int,
        inputs: Mapping[str, Any],
        parameters: Mapping[str, Any],
    ) -> Future[int] | None:
        """Append one result (kind RESULT) or sampled input+result (kind SAMPLE); called on an engine thread.

        The future resolves once the record is committed. When the outbox refuses the record at once
        (counted in `dropped`): for a result, a failed future carrying why, so the app's answer says it
        (kept=false and keep_error), with `edgefleet.keep_async` too; None for a sample (the agent's
        business, not the app's).
        """
        if kind == SAMPLE:

            def payload() -> bytes:
                request = build_request(
                    response.model_name, inputs, version=response.model_version, request_id=response.id
                )
                message = results_pb2.SampledInference(request=request, response=encode_response(response))
                return message.SerializeToString()

            payload_type = "edgefleet.v1.SampledInference"
            size = nbytes(inputs.values()) + nbytes(response.outputs.values())
        else:

            def payload() -> bytes:
                return encode_response(response).SerializeToString()

            payload_type = "inference.ModelInferResponse"
            size = nbytes(response.outputs.values())
        record = OutboxRecord(
            int(time.time() * 1000),
            response.model_name,
            version,
            keep_priority(parameters, kind),
            kind,
            payload_type,
            DeferredPayload(payload, size + _MESSAGE_OVERHEAD_BYTES),
            response.id,
        )
        try:
            return self._sink.append(record)
        except EdgeRuntimeError as exc:
            self._dropped(exc)
            if kind != RESULT:
                return None
            refused: Future[int] = Future()
            refused.set_exception(exc)
            return refused

    def event(self, event: str, model: str = "", version: int = 0, **fields: Any) -> None:
        detail = json.dumps(fields, default=str, sort_keys=True)
        message = results_pb2.DeviceEvent(event=event, model=model, version=version, detail_json=detail)
        self._append(
            OutboxRecord(
                int(time.time() * 1000),
                model,
                version,
                PRIORITY_EVENT,
                results_pb2.RECORD_KIND_EVENT,
                "edgefleet.v1.DeviceEvent",
                message.SerializeToString(),
            )
        )

    def _append(self, record: OutboxRecord) -> Future[int] | None:
        try:
            return self._sink.append(record)
        except EdgeRuntimeError as exc:
            self._dropped(exc)
            return None

    def _dropped(self, exc: EdgeRuntimeError) -> None:
        self.dropped += 1
        if self.dropped == 1 or self.dropped % 1000 == 0:
            log.warning("outbox.append_refused", dropped_total=self.dropped, reason=str(exc))


def nbytes(arrays: Iterable[Any]) -> int:
    """The bytes numpy arrays hold, the strings of a BYTES tensor (an object array) included."""
    total = 0
    for array in arrays:
        total += int(getattr(array, "nbytes", 0))
        if getattr(getattr(array, "dtype", None), "kind", "") == "O":
            total += sum(len(item) for item in array.flat if isinstance(item, (bytes, str)))
    return total


def settle_kept(response: InferResponse, error: BaseException | None) -> InferResponse:
    """Record in the response's parameters whether its kept result reached the outbox."""
    response.parameters[KEPT_PARAMETER] = error is None
    if error is not None:
        response.parameters[KEEP_ERROR_PARAMETER] = str(error) or type(error).__name__
    return response
