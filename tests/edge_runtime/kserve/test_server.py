"""InferenceServer: where it listens, what it refuses to listen on, and how it stops."""

from __future__ import annotations

import asyncio
import socket
import stat
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest

from edge_runtime.config import AgentConfig, ServerSection
from edge_runtime.errors import ConfigError
from edge_runtime.inference.types import InferRequest
from edge_runtime.kserve import InferenceServer, KServeClient
from edge_runtime.kserve.client import build_request, decode_response
from edge_runtime.models.repository import ModelRepository
from tests.edge_runtime.kserve.conftest import Serve
from tests.loopcheck import LoopThread
from tests.waiting import wait_for


@pytest.fixture
def loop() -> Iterator[LoopThread]:
    thread = LoopThread()
    yield thread
    thread.close()
    assert not thread.slow.blocking()


@pytest.fixture
def empty_repo(make_config: Callable[..., AgentConfig]) -> Iterator[ModelRepository]:
    repo = ModelRepository(make_config())
    yield repo
    repo.close()


def section(short_dir: Path, **fields: object) -> ServerSection:
    values: dict[str, object] = {"unix_socket": str(short_dir / "i.sock"), "tcp_address": "", "metrics_address": ""}
    return ServerSection(**{**values, **fields})  # type: ignore[arg-type]


def test_unix_socket_is_group_only_and_removed_at_stop(
    loop: LoopThread, empty_repo: ModelRepository, short_dir: Path
) -> None:
    server = loop.run(InferenceServer.start(empty_repo, section(short_dir), "v"))
    path = Path(server.unix_socket)
    assert stat.S_ISSOCK(path.stat().st_mode)
    assert stat.S_IMODE(path.stat().st_mode) == 0o660
    with KServeClient(f"unix:{path}") as client:
        assert client.live()
    loop.run(server.stop(0))
    assert not path.exists()


def test_a_stale_socket_is_replaced_and_a_live_one_is_refused(
    loop: LoopThread, empty_repo: ModelRepository, short_dir: Path
) -> None:
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(short_dir / "i.sock"))  # bound, never listening: what a killed agent leaves behind
    stale.close()
    server = loop.run(InferenceServer.start(empty_repo, section(short_dir), "v"))
    try:
        with pytest.raises(ConfigError, match="in use by another process"):
            loop.run(InferenceServer.start(empty_repo, section(short_dir), "v"))
        with KServeClient(f"unix:{server.unix_socket}") as client:
            assert client.live()  # the refused second start did not take the socket away
    finally:
        loop.run(server.stop(0))
    (short_dir / "i.sock").write_text("not a socket")
    with pytest.raises(ConfigError, match="is not a socket"):
        loop.run(InferenceServer.start(empty_repo, section(short_dir), "v"))


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"tcp_address": "0.0.0.0:0"}, "not a loopback address"),
        ({"tcp_address": "192.168.1.10:8001"}, "not a loopback address"),
        ({"tcp_address": "localhost"}, "must be host:port"),
        ({"unix_socket": "", "tcp_address": ""}, "neither server.unix_socket nor server.tcp_address"),
    ],
)
def test_addresses_it_must_not_serve_on_are_config_errors(
    loop: LoopThread, empty_repo: ModelRepository, short_dir: Path, fields: dict[str, str], words: str
) -> None:
    with pytest.raises(ConfigError, match=words):
        loop.run(InferenceServer.start(empty_repo, section(short_dir, **fields), "v"))


def test_stop_lets_calls_in_flight_finish_and_refuses_new_ones(serve: Serve) -> None:
    served = serve("mobilenet-bench:1", inference={"adaptive": False, "instances": 1, "max_batch_size": 32})
    model, blocker = served.repo.submit(
        InferRequest("mobilenet-bench", {"input": np.zeros((32, 3, 224, 224), np.float32)})
    )
    wait_for(lambda: model.batcher.pending() == 0, 20, "the blocker to start running")
    stub = served.stub()
    with ThreadPoolExecutor(1) as pool:
        request = build_request("mobilenet-bench", {"input": np.ones((1, 3, 224, 224), np.float32)})
        in_flight = pool.submit(stub.ModelInfer, request, timeout=60)
        wait_for(lambda: model.batcher.pending() == 1, 20, "the gRPC call to be queued behind the blocker")
        stopping = asyncio.run_coroutine_threadsafe(served.server.stop(30.0), served.loop.loop)
        wait_for(lambda: refuses_calls(served.tcp), 10, "the stopping server to refuse new calls")
        assert not in_flight.done()
        response = decode_response(in_flight.result(60))  # the queued call still gets its answer
    assert response.outputs["logits"].shape == (1, 1000)
    stopping.result(30)
    assert blocker.result(1).outputs["logits"].shape == (32, 1000)


def refuses_calls(target: str) -> bool:
    """Whether a new call is refused: grpc core cancels calls that reach a server shutting down, and a
    connection attempt after its listener closed is UNAVAILABLE."""
    with KServeClient(target, timeout_s=5) as client:
        try:
            client.live()
        except grpc.RpcError as error:
            assert error.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE), error
            return True
    return False
