"""The floor any Python KServe server stands on: a bare grpc.aio server that parses ModelInfer and answers a
fixed response (no model, no batcher, no validation), sized like each model's real answer.

    python -m bench._echo SOCKET PACKAGE_DIR...   # prints "ready", serves until terminated
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import grpc

from edgefleet.proto.inference import grpc_service_pb2 as pb
from edgefleet.proto.inference import grpc_service_pb2_grpc as pb_grpc

__all__ = ["CHANNEL_OPTIONS"]

CHANNEL_OPTIONS = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
_ITEMSIZE = {"FP32": 4, "FP16": 2, "FP64": 8, "INT64": 8, "INT32": 4, "INT8": 1, "UINT8": 1, "BOOL": 1}


def _reply(manifest: dict[str, Any]) -> pb.ModelInferResponse:
    """A batch-1 answer of the model's outputs (variable dimensions as 1), zero-filled."""
    reply = pb.ModelInferResponse(model_name=manifest["name"], model_version=str(manifest["version"]))
    for output in manifest["outputs"]:
        shape = [d if d > 0 else 1 for d in output["shape"]]
        reply.outputs.add(name=output["name"], datatype=output["datatype"], shape=shape)
        reply.raw_output_contents.append(bytes(math.prod(shape) * _ITEMSIZE.get(output["datatype"], 4)))
    return reply


class _Echo(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, replies: dict[str, pb.ModelInferResponse]) -> None:
        self._replies = replies
        self._default = pb.ModelInferResponse()

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        return self._replies.get(request.model_name, self._default)


async def _serve(socket: str, packages: list[Path]) -> None:
    replies = {}
    for package in packages:
        manifest = json.loads((package / "manifest.json").read_text())
        replies[manifest["name"]] = _reply(manifest)
    server = grpc.aio.server(options=CHANNEL_OPTIONS)
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(_Echo(replies), server)  # type: ignore[abstract]
    server.add_insecure_port(f"unix:{socket}")
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit("usage: python -m bench._echo SOCKET PACKAGE_DIR...")
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    asyncio.run(_serve(sys.argv[1], [Path(p) for p in sys.argv[2:]]))
