"""The samples devices kept (random and hard examples), read back attributable: who, which version, why kept.

A sample is a stored result of kind RECORD_KIND_SAMPLED_INPUT whose payload is an `edgefleet.v1.SampledInference`.
Kind, model, version, device and time filter in SQL; reason and engine live in the payload, so pages decode
each candidate row and filter here. Tensors decode with the device's own KServe codec. Not the export file
formats (cloud_sync/samples_export.py) nor the HTTP routes (cloud_sync/api_samples.py).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from google.protobuf.message import DecodeError

from cloud_sync.errors import InvalidArgument, TooLarge
from cloud_sync.store.database import Database
from cloud_sync.store.schema import results
from edgefleet.proto.edgefleet.v1 import results_pb2
from edgefleet.proto.inference import grpc_service_pb2 as inference_pb2
from edgefleet.records import MAX_RECORD_PAYLOAD_BYTES

if TYPE_CHECKING:
    import numpy as np

# The export's content types by format (cloud_sync/samples_export.py writes them; the routes document them here,
# where numpy is not needed).
EXPORT_MEDIA_TYPES = {"npz": "application/zip", "parquet": "application/vnd.apache.parquet"}

__all__ = [
    "EXPORT_MEDIA_TYPES",
    "MAX_CALIBRATION",
    "MAX_SAMPLE_PAGE",
    "MAX_SCAN_ROWS",
    "REASONS",
    "SAMPLED_PAYLOAD_TYPE",
    "Sample",
    "SamplePage",
    "SampleQuery",
    "SampleStore",
    "UndecodableSample",
    "decode_tensors",
    "reason_of",
    "sample_inputs",
    "sample_tensors",
]

SAMPLED_PAYLOAD_TYPE = "edgefleet.v1.SampledInference"
# Why a device kept a sample; the payload's "" means random (the agents before hard examples wrote nothing).
REASONS = ("random", "uncertain", "disagreement")
MAX_SAMPLE_PAGE = 10_000
MAX_CALIBRATION = 10_000
# Rows one call reads at most while a payload filter (reason, engine) finds few matches: a page then comes
# back short with `more` set, and the caller goes on from its cursor, rather than one call reading the table.
MAX_SCAN_ROWS = 100_000
# Rows read from the database per round trip while scanning.
_CHUNK = 1000
MAX_TEXT = 128


class UndecodableSample(ValueError):
    """A stored sample's payload or tensors cannot be decoded; the message names the row and why."""


@dataclass(frozen=True)
class SampleQuery:
    """Which samples: those of `model` matching every other filter given (None: any)."""

    model: str
    version: int | None = None
    reason: str | None = None
    device_id: str | None = None
    since_ms: int | None = None  # created_at_ms >= since_ms (the device's clock)
    until_ms: int | None = None  # created_at_ms < until_ms
    engine: str | None = None

    def check(self) -> SampleQuery:
        """This query, or InvalidArgument naming the first bad filter."""
        if not self.model or len(self.model) > MAX_TEXT:
            raise InvalidArgument(f"model: a model name of 1..{MAX_TEXT} characters, not {self.model!r}")
        if self.version is not None and not 1 <= self.version < 2**32:
            raise InvalidArgument(f"version: a model version of 1..{2**32 - 1}, not {self.version}")
        if self.reason is not None and self.reason not in REASONS:
            raise InvalidArgument(f"reason: one of {', '.join(REASONS)}, not {self.reason!r}")
        for name in ("device_id", "engine"):
            value = getattr(self, name)
            if value is not None and not 1 <= len(value) <= MAX_TEXT:
                raise InvalidArgument(f"{name}: 1..{MAX_TEXT} characters, not {value!r}")
        if self.since_ms is not None and self.until_ms is not None and self.until_ms <= self.since_ms:
            raise InvalidArgument(f"until ({self.until_ms} ms) must be after since ({self.since_ms} ms)")
        return self

    def filters_payload(self) -> bool:
        return self.reason is not None or self.engine is not None

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if v is not None}


@dataclass(frozen=True)
class Sample:
    """One kept sample, attributable: the stored row's identity and why the device kept it."""

    id: int  # the results row id: the cursor
    device_id: str
    seq: int
    model: str
    version: int
    created_at_ms: int
    received_at_ms: int
    reason: str
    measure: str
    score: float
    engine: str
    precision: str
    shadow_version: int
    payload: bytes  # the serialized SampledInference

    def message(self) -> results_pb2.SampledInference:
        return results_pb2.SampledInference.FromString(self.payload)

    def summary(self) -> dict[str, Any]:
        """Everything but the payload, as JSON-ready values."""
        return {k: v for k, v in vars(self).items() if k != "payload"} | {"payload_bytes": len(self.payload)}


@dataclass(frozen=True)
class SamplePage:
    samples: list[Sample]
    # Pass back as after_id to go on. `more`: the page stopped at its limit or at MAX_SCAN_ROWS, so rows past
    # the cursor may still match; false once the scan reached the newest row.
    next_after_id: int
    more: bool
    scanned: int  # rows read from the database (the cost of a payload filter)
    undecodable: int  # candidate rows whose payload does not parse (left out)


def reason_of(message: results_pb2.SampledInference) -> str:
    return message.reason or "random"


def decode_tensors(tensors: Any, raw: Any) -> dict[str, np.ndarray[Any, Any]]:
    """Named numpy arrays of a request's inputs (or a response's outputs) with their raw contents.

    The device's own decoder (edge_runtime/kserve/codec.py): the checks a request passed on the device are the
    ones its sample passes here, byte for byte. Raises UndecodableSample (BYTES included: no engine of the
    agent serves it, so no device keeps one).
    """
    # The device runtime's decoder needs numpy: imported here, so a cloud-sync without the compress extra
    # lists samples (no tensors) and refuses only what decodes them (NotInstalled, from the routes).
    from edge_runtime.errors import EdgeRuntimeError
    from edge_runtime.kserve.codec import decode_request

    request = inference_pb2.ModelInferRequest(inputs=tensors, raw_input_contents=raw)
    try:
        return dict(decode_request(request, MAX_RECORD_PAYLOAD_BYTES).inputs)
    except EdgeRuntimeError as exc:
        raise UndecodableSample(str(exc)) from None


_InputTensor = inference_pb2.ModelInferRequest.InferInputTensor


def _outputs_as_inputs(response: inference_pb2.ModelInferResponse) -> list[_InputTensor]:
    # An output tensor has the wire form of an input (name, datatype, shape, contents): one decoder for both.
    return [
        _InputTensor(
            name=t.name, datatype=t.datatype, shape=t.shape, contents=t.contents if t.HasField("contents") else None
        )
        for t in response.outputs
    ]


def sample_tensors(sample: Sample) -> tuple[dict[str, np.ndarray[Any, Any]], dict[str, np.ndarray[Any, Any]]]:
    """The sample's inputs and what the model answered (empty when the device kept no response), as numpy
    arrays, parsing the payload once; UndecodableSample names the row."""
    try:
        message = sample.message()
        inputs = decode_tensors(message.request.inputs, message.request.raw_input_contents)
        response = message.response
        outputs = decode_tensors(_outputs_as_inputs(response), response.raw_output_contents)
    except (DecodeError, UndecodableSample) as exc:
        raise UndecodableSample(f"sample {sample.id} ({sample.device_id} seq {sample.seq}): {exc}") from None
    return inputs, outputs


def sample_inputs(sample: Sample) -> dict[str, np.ndarray[Any, Any]]:
    """The sample's inputs as numpy arrays; UndecodableSample names the row."""
    try:
        request = sample.message().request
        return decode_tensors(request.inputs, request.raw_input_contents)
    except (DecodeError, UndecodableSample) as exc:
        raise UndecodableSample(f"sample {sample.id} ({sample.device_id} seq {sample.seq}): {exc}") from None


_COLUMNS = (
    results.c.id,
    results.c.device_id,
    results.c.seq,
    results.c.model,
    results.c.version,
    results.c.created_at_ms,
    results.c.received_at_ms,
    results.c.payload,
)


def _select(query: SampleQuery) -> sa.Select[Any]:
    c = results.c
    select = sa.select(*_COLUMNS).where(
        c.kind == results_pb2.RECORD_KIND_SAMPLED_INPUT,
        c.payload_type == SAMPLED_PAYLOAD_TYPE,
        c.model == query.model,
    )
    if query.version is not None:
        select = select.where(c.version == query.version)
    if query.device_id is not None:
        select = select.where(c.device_id == query.device_id)
    if query.since_ms is not None:
        select = select.where(c.created_at_ms >= query.since_ms)
    if query.until_ms is not None:
        select = select.where(c.created_at_ms < query.until_ms)
    return select


def _sample(row: Any) -> Sample | None:
    """The row as a Sample, or None when its payload does not parse."""
    try:
        message = results_pb2.SampledInference.FromString(row.payload)
    except DecodeError:
        return None
    return Sample(
        id=int(row.id),
        device_id=row.device_id,
        seq=int(row.seq),
        model=row.model,
        version=int(row.version),
        created_at_ms=int(row.created_at_ms),
        received_at_ms=int(row.received_at_ms),
        reason=reason_of(message),
        measure=message.measure,
        score=message.score,
        engine=message.engine,
        precision=message.precision,
        shadow_version=message.shadow_version,
        payload=bytes(row.payload),
    )


def _matches(query: SampleQuery, sample: Sample) -> bool:
    return (query.reason is None or sample.reason == query.reason) and (
        query.engine is None or sample.engine == query.engine
    )


class SampleStore:
    """Reads of the kept samples. Thread-safe; synchronous (call it off the event loop)."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def _walk(
        self, query: SampleQuery, cursor: int, newest_first: bool, chunk_rows: int = _CHUNK
    ) -> Iterator[tuple[int, Sample | None]]:
        """(row id, sample or None if undecodable) of every candidate row past `cursor`, in id order (or
        reverse id order below `cursor`, 0 meaning from the newest), read `chunk_rows` at a time."""
        base = _select(query)
        while True:
            if newest_first:
                select = base.order_by(results.c.id.desc())
                select = select.where(results.c.id < cursor) if cursor else select
            else:
                select = base.where(results.c.id > cursor).order_by(results.c.id)
            chunk = select.limit(chunk_rows)

            def read(conn: sa.Connection, chunk: sa.Select[Any] = chunk) -> Sequence[sa.Row[Any]]:
                return conn.execute(chunk).all()

            rows = self._db.read(read)
            for row in rows:
                cursor = int(row.id)
                yield cursor, _sample(row)
            if len(rows) < chunk_rows:
                return

    def page(
        self,
        query: SampleQuery,
        after_id: int = 0,
        limit: int = 100,
        *,
        max_scan: int = MAX_SCAN_ROWS,
        max_bytes: int | None = None,
    ) -> SamplePage:
        """Samples matching `query` with id > after_id, oldest first, at most `limit`.

        Reads at most `max_scan` candidate rows (those the SQL filters let through); a payload filter that
        matches few of them returns a short page with `more` set: go on from `next_after_id`. TooLarge once
        the page's payloads pass `max_bytes` (checked as it fills, so memory stays bounded).
        """
        query.check()
        if not 1 <= limit <= MAX_SAMPLE_PAGE:
            raise InvalidArgument(f"limit must be 1..{MAX_SAMPLE_PAGE}, not {limit}")
        if after_id < 0:
            raise InvalidArgument(f"after_id must be >= 0, not {after_id}")
        found: list[Sample] = []
        cursor, scanned, undecodable, size = after_id, 0, 0, 0
        # Without a payload filter every decodable candidate matches: read no more rows than the page needs.
        chunk_rows = _CHUNK if query.filters_payload() else min(limit, _CHUNK)
        for cursor, sample in self._walk(query, after_id, False, chunk_rows):
            scanned += 1
            if sample is None:
                undecodable += 1
            elif _matches(query, sample):
                found.append(sample)
                size += len(sample.payload)
                if max_bytes is not None and size > max_bytes:
                    raise TooLarge(f"the first {len(found)} samples pass {max_bytes} bytes of payload")
                if len(found) == limit:
                    return SamplePage(found, cursor, True, scanned, undecodable)
            if scanned >= max_scan:
                return SamplePage(found, cursor, True, scanned, undecodable)
        return SamplePage(found, cursor, False, scanned, undecodable)

    def calibration(
        self, model: str, version: int | None, limit: int, since_ms: int | None = None, max_bytes: int | None = None
    ) -> list[dict[str, np.ndarray[Any, Any]]]:
        """Each sample's decoded inputs, newest first, any reason, at most `limit` (for static INT8 calibration)
        and, with `max_bytes`, no more samples than fit in that many bytes of arrays (10,000 camera frames would
        be gigabytes).

        A sample whose tensors do not decode is left out (the device decoded them, so only a damaged or foreign
        payload is); fewer than `limit` means the store holds no more, or `max_bytes` was reached.
        """
        query = SampleQuery(model, version, since_ms=since_ms).check()
        if not 1 <= limit <= MAX_CALIBRATION:
            raise InvalidArgument(f"limit must be 1..{MAX_CALIBRATION}, not {limit}")
        found: list[dict[str, np.ndarray[Any, Any]]] = []
        total = 0
        for _, sample in self._walk(query, 0, True, min(limit, _CHUNK)):
            if sample is None:
                continue
            try:
                inputs = sample_inputs(sample)
            except UndecodableSample:
                continue
            size = sum(int(a.nbytes) for a in inputs.values())
            if max_bytes is not None and total + size > max_bytes:
                break
            total += size
            found.append(inputs)
            if len(found) == limit:
                break
        return found
