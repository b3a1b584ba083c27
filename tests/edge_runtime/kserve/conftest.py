"""A real KServe gRPC server per test: a ModelRepository, and InferenceServer on its own event loop thread.

The loop runs in debug mode, as STYLE.md asks: code that blocks it fails the test at teardown
(tests/loopcheck.py says how a block is told from the machine's noise).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from edge_runtime.config import AgentConfig
from edge_runtime.kserve import InferenceServer, KServeClient
from edge_runtime.models.repository import ModelRepository
from edgefleet.proto.inference import grpc_service_pb2 as pb
from edgefleet.proto.inference import grpc_service_pb2_grpc as pb_grpc
from tests.loopcheck import LoopThread

SERVER_VERSION = "9.9.9-test"


@dataclass
class Served:
    """A running server over a repository; `tcp` and `unix` are gRPC targets."""

    repo: ModelRepository
    config: AgentConfig
    server: InferenceServer
    loop: LoopThread
    clients: list[KServeClient] = field(default_factory=list)
    channels: list[grpc.Channel] = field(default_factory=list)

    @property
    def tcp(self) -> str:
        return f"127.0.0.1:{self.server.tcp_port}"

    @property
    def unix(self) -> str:
        return f"unix:{self.server.unix_socket}"

    def client(self, target: str | None = None, timeout_s: float = 30.0) -> KServeClient:
        client = KServeClient(target or self.tcp, timeout_s=timeout_s)
        self.clients.append(client)
        return client

    def stub(self, target: str | None = None) -> pb_grpc.GRPCInferenceServiceStub:
        """A generated stub, for requests KServeClient would not build (malformed ones, typed contents)."""
        channel = grpc.insecure_channel(target or self.tcp, options=[("grpc.max_send_message_length", -1)])
        self.channels.append(channel)
        return pb_grpc.GRPCInferenceServiceStub(channel)

    def stats(self, name: str, version: str = "") -> pb.ModelStatistics:
        (stats,) = self.client().statistics(name, version).model_stats
        return stats


Serve = Callable[..., Served]


@pytest.fixture
def serve(make_config: Callable[..., AgentConfig], model_packages: dict[str, Path]) -> Iterator[Serve]:
    """serve("digits:1", server={...}, inference={...}) -> a started server; stopped and checked at teardown.

    Packages may be keys of `model_packages` or package directories.
    """
    started: list[Served] = []

    def start(*packages: str | Path, **sections: dict[str, Any]) -> Served:
        server_section = {"tcp_address": "127.0.0.1:0", **sections.pop("server", {})}
        config = make_config(server=server_section, **sections)
        repo = ModelRepository(config)
        for package in packages:
            repo.install(model_packages[package] if isinstance(package, str) else package)
        loop = LoopThread("test-kserve-loop")
        try:
            server = loop.run(InferenceServer.start(repo, config.server, SERVER_VERSION))
        except BaseException:
            loop.close()
            repo.close()
            raise
        served = Served(repo, config, server, loop)
        started.append(served)
        return served

    yield start
    for served in started:
        for client in served.clients:
            client.close()
        for channel in served.channels:
            channel.close()
        served.loop.run(served.server.stop(1.0))
        served.repo.close()
        served.loop.close()
    blocked = [report for served in started for report in served.loop.slow.blocking()]
    assert not blocked, f"the event loop was blocked: {blocked}"


def rpc_error(call: Callable[[], Any]) -> grpc.RpcError:
    """The grpc.RpcError `call` raises (fails the test if it succeeds)."""
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def digits_inputs(rows: int, offset: int = 0) -> np.ndarray[Any, Any]:
    from models.build import digits_holdout

    pixels, _ = digits_holdout()
    return np.ascontiguousarray(pixels[offset : offset + rows])


def wait_future(future: Future[Any], timeout: float = 30.0) -> Any:
    return future.result(timeout)


@pytest.fixture(scope="session")
def int_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny integer model for the typed INT/UINT paths: sum and diff of INT8 `a` and UINT16 `b`, as INT32."""
    import onnx
    from onnx import TensorProto, helper

    from edge_runtime.inference.tensors import TensorSpec
    from edge_runtime.models.package import write_package

    nodes = [
        helper.make_node("Cast", ["a"], ["a32"], to=TensorProto.INT32),
        helper.make_node("Cast", ["b"], ["b32"], to=TensorProto.INT32),
        helper.make_node("Add", ["a32", "b32"], ["sum"]),
        helper.make_node("Sub", ["a32", "b32"], ["diff"]),
    ]
    graph = helper.make_graph(
        nodes,
        "mix",
        [
            helper.make_tensor_value_info("a", TensorProto.INT8, ["batch", 4]),
            helper.make_tensor_value_info("b", TensorProto.UINT16, ["batch", 4]),
        ],
        [
            helper.make_tensor_value_info("sum", TensorProto.INT32, ["batch", 4]),
            helper.make_tensor_value_info("diff", TensorProto.INT32, ["batch", 4]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    package = write_package(
        tmp_path_factory.mktemp("mix") / "mix" / "1",
        model.SerializeToString(),
        name="mix",
        version=1,
        inputs=[TensorSpec("a", "INT8", (-1, 4)), TensorSpec("b", "UINT16", (-1, 4))],
        outputs=[TensorSpec("sum", "INT32", (-1, 4)), TensorSpec("diff", "INT32", (-1, 4))],
        max_batch_size=16,
    )
    return package.directory
