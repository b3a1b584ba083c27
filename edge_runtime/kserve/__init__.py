"""The Open Inference Protocol (KServe v2) over gRPC: codec, status mapping, servicer, server and client.

Clients written for Triton or KServe talk to edge-agent unchanged. Importing this package loads the
`inference` protobuf descriptors; an app that also imports tritonclient in the same process gets duplicate
descriptor errors, so apps use either this client or tritonclient (or the in-process API), not both.
"""

from edge_runtime.kserve.client import KServeClient
from edge_runtime.kserve.server import InferenceServer

__all__ = ["InferenceServer", "KServeClient"]
