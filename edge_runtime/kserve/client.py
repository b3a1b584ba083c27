"""A small synchronous KServe v2 gRPC client for apps on the device, the demo, tests and benchmarks.

Any Triton or KServe client works against edge-agent too; this one just needs nothing beyond edgefleet.
Errors are grpc.RpcError with the server's status code and reason.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import grpc
import numpy as np

from edge_runtime.inference.types import InferResponse
from edge_runtime.kserve.codec import build_request, decode_response
from edgefleet.proto.inference import grpc_service_pb2 as pb
from edgefleet.proto.inference import grpc_service_pb2_grpc as pb_grpc

__all__ = ["KServeClient", "build_request", "decode_response"]

_UNLIMITED = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]


class KServeClient:
    """`target` is "unix:/run/edgefleet/inference.sock" or "127.0.0.1:8001"."""

    def __init__(self, target: str, *, timeout_s: float = 30.0) -> None:
        self.target = target
        self.timeout_s = timeout_s
        self._channel = grpc.insecure_channel(target, options=_UNLIMITED)
        self._stub = pb_grpc.GRPCInferenceServiceStub(self._channel)

    def __enter__(self) -> KServeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def live(self) -> bool:
        return bool(self._stub.ServerLive(pb.ServerLiveRequest(), timeout=self.timeout_s).live)

    def ready(self) -> bool:
        return bool(self._stub.ServerReady(pb.ServerReadyRequest(), timeout=self.timeout_s).ready)

    def model_ready(self, name: str, version: str = "") -> bool:
        reply = self._stub.ModelReady(pb.ModelReadyRequest(name=name, version=version), timeout=self.timeout_s)
        return bool(reply.ready)

    def server_metadata(self) -> pb.ServerMetadataResponse:
        reply: pb.ServerMetadataResponse = self._stub.ServerMetadata(pb.ServerMetadataRequest(), timeout=self.timeout_s)
        return reply

    def model_metadata(self, name: str, version: str = "") -> pb.ModelMetadataResponse:
        reply: pb.ModelMetadataResponse = self._stub.ModelMetadata(
            pb.ModelMetadataRequest(name=name, version=version), timeout=self.timeout_s
        )
        return reply

    def statistics(self, name: str = "", version: str = "") -> pb.ModelStatisticsResponse:
        reply: pb.ModelStatisticsResponse = self._stub.ModelStatistics(
            pb.ModelStatisticsRequest(name=name, version=version), timeout=self.timeout_s
        )
        return reply

    def infer(self, model: str, inputs: Mapping[str, np.ndarray[Any, Any]], **options: Any) -> InferResponse:
        """Options as build_request's (version, outputs, priority, timeout_s, keep, request_id)."""
        return self.infer_raw(build_request(model, inputs, **options))

    def infer_raw(self, request: pb.ModelInferRequest) -> InferResponse:
        return decode_response(self._stub.ModelInfer(request, timeout=self.timeout_s))
