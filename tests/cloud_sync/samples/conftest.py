"""Samples as devices upload them: SampledInference payloads in RECORD_KIND_SAMPLED_INPUT records, ingested
through the store's own ingest path (validation, checksum, watermark) into a real database on each engine; and
the samples routes served by a real uvicorn over that store (fleetctl, a real process, talks to it)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np
import pytest
import uvicorn
from prometheus_client import CollectorRegistry

from cloud_sync.api import ApiContext, create_app
from cloud_sync.api_auth import BearerAuth
from cloud_sync.api_samples import samples_routes
from cloud_sync.store import AuditLog, Database, DeviceRegistry, ResultStore
from cloud_sync.store.batches import record_checksum
from edge_runtime.kserve.codec import build_request
from edgefleet.proto.edgefleet.v1 import results_pb2
from edgefleet.proto.inference import grpc_service_pb2 as inference_pb2
from tests.waiting import wait_for

BASE_MS = 1_700_000_000_000
Arrays = Mapping[str, np.ndarray[Any, Any]]


def response_of(outputs: Arrays) -> inference_pb2.ModelInferResponse:
    msg = inference_pb2.ModelInferResponse(model_name="digits", model_version="1")
    for name, array in outputs.items():
        msg.outputs.add(name=name, datatype={"float32": "FP32", "int64": "INT64"}[array.dtype.name], shape=array.shape)
        msg.raw_output_contents.append(np.ascontiguousarray(array).tobytes())
    return msg


def sampled(
    inputs: Arrays,
    outputs: Arrays | None = None,
    *,
    reason: str = "",
    measure: str = "",
    score: float = 0.0,
    engine: str = "onnxruntime/CPUExecutionProvider",
    precision: str = "fp32",
    shadow_version: int = 0,
) -> bytes:
    """A serialized SampledInference, as the agent keeps it (inputs in raw_input_contents)."""
    message = results_pb2.SampledInference(
        request=build_request("digits", inputs),
        reason=reason,
        measure=measure,
        score=score,
        engine=engine,
        precision=precision,
        shadow_version=shadow_version,
    )
    if outputs is not None:
        message.response.CopyFrom(response_of(outputs))
    return message.SerializeToString()


@dataclass
class Fleet:
    """Devices that upload through ResultStore.ingest, each keeping its own next seq."""

    db: Database
    store: ResultStore
    registry: DeviceRegistry
    next_seq: dict[str, int] = field(default_factory=dict)

    def upload(
        self,
        device_id: str,
        payloads: Sequence[bytes],
        *,
        model: str = "digits",
        version: int = 1,
        kind: int = results_pb2.RECORD_KIND_SAMPLED_INPUT,
        payload_type: str = "edgefleet.v1.SampledInference",
        created_at_ms: Sequence[int] | None = None,
    ) -> list[int]:
        """Store `payloads` as the device's next records (one batch); their seqs."""
        if device_id not in self.next_seq:
            self.registry.add_device(device_id, {})
            self.next_seq[device_id] = 0
        after = self.next_seq[device_id]
        seqs = list(range(after + 1, after + 1 + len(payloads)))
        batch = results_pb2.ResultBatch(
            after_seq=after,
            through_seq=seqs[-1],
            produced_total=seqs[-1],
            record_checksum=results_pb2.RECORD_CHECKSUM_CRC32,
        )
        for i, (seq, payload) in enumerate(zip(seqs, payloads, strict=True)):
            record = results_pb2.ResultRecord(
                seq=seq,
                created_at_ms=created_at_ms[i] if created_at_ms is not None else BASE_MS + seq,
                model=model,
                version=version,
                priority=10,
                kind=kind,  # type: ignore[arg-type]
                payload_type=payload_type,
                payload=payload,
                request_id=f"req-{seq}",
            )
            record.checksum = record_checksum(record)
            batch.records.append(record)
        outcome = self.store.ingest(device_id, batch)
        assert outcome.stored == len(payloads), outcome
        self.next_seq[device_id] = seqs[-1]
        return seqs


@pytest.fixture
def fleet(db: Database) -> Fleet:
    return Fleet(db, ResultStore(db), DeviceRegistry(db))


def image(value: float) -> np.ndarray[Any, Any]:
    """A digits input [1, 1, 28, 28] float32 whose pixels are `value` (a distinct tensor per sample)."""
    return np.full((1, 1, 28, 28), value, dtype=np.float32)


def probabilities(top: int) -> np.ndarray[Any, Any]:
    out = np.full((1, 10), 0.05, dtype=np.float32)
    out[0, top] = 0.55
    return out


ADMIN, OPERATOR, VIEWER = "admin-secret", "operator-secret", "viewer-secret"


@dataclass
class SamplesApi:
    """A real admin API (uvicorn on a loopback port, in a thread) with the samples routes over `fleet`'s store."""

    url: str
    fleet: Fleet
    audit: AuditLog

    def client(self, token: str = OPERATOR) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {token}"}, timeout=60)


@contextmanager
def serve(app: Any) -> Iterator[str]:
    """Serve `app` on a free loopback port until the generator is closed; its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False, lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="samples-api", daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started, 30, "the admin API to listen")
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


# Small, so that a test passes it cheaply.
TEST_MAX_EXPORT_BYTES = 256 * 1024


@pytest.fixture
def samples_api(fleet: Fleet) -> Iterator[SamplesApi]:
    db = fleet.db
    auth = BearerAuth({ADMIN: "admin", OPERATOR: "operator", VIEWER: "viewer"})
    audit = AuditLog(db)
    routes = [samples_routes(db, auth, audit, max_bytes=TEST_MAX_EXPORT_BYTES)]
    context = ApiContext(fleet.registry, fleet.store, auth, CollectorRegistry(), extra_routes=routes, audit=audit)
    with serve(create_app(context)) as url:
        yield SamplesApi(url, fleet, audit)
