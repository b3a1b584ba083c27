"""edgefleet: what the device runtime (edge_runtime) and the cloud side (cloud_sync) share.

The generated protobuf and gRPC code, the gRPC service registration that answers a malformed message with
INVALID_ARGUMENT, durable file writes, JSON logging, the process heap settings, address parsing and uvicorn
embedded in a process that owns its signals. Nothing here imports numpy, ONNX Runtime or SQLite:
`pip install edgefleet[cloud]` or `[fleetctl]` needs none of them.
"""

__all__: list[str] = []
