"""InferenceServer: where it listens, what it refuses to listen on, and how it stops."""

from __future__ import annotations

import asyncio
import concurrent.futures
import socket
import stat
import threading
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
from edge_runtime.kserve.server import on_file_thread
from edge_runtime.models.repository import ModelRepository
from tests.edge_runtime.kserve.conftest import Serve
from tests.loopcheck import LoopThread
from tests.waiting import wait_for


@pytest.fixture
def loop() -> Iterator[LoopThread]:
    """The server's loop; the test fails if start or stop blocked it (a file touched on it included)."""
    thread = LoopThread()
    yield thread
    thread.close()
    assert not thread.blocking(), f"the loop was blocked: {thread.blocking()}"


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


def test_start_and_stop_do_their_file_work_off_the_loop(
    loop: LoopThread, empty_repo: ModelRepository, short_dir: Path
) -> None:
    """Every step that touches the disk: the missing directory, the lock file, a stale socket's probe and
    removal, chmod, and the removal at stop."""
    path = short_dir / "run" / "i.sock"
    path.parent.mkdir()
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()
    server = loop.run(InferenceServer.start(empty_repo, section(short_dir, unix_socket=str(path)), "v"))
    loop.run(server.stop(0))
    assert not path.exists()
    missing_dir = short_dir / "new" / "i.sock"
    server = loop.run(InferenceServer.start(empty_repo, section(short_dir, unix_socket=str(missing_dir)), "v"))
    assert stat.S_IMODE(missing_dir.stat().st_mode) == 0o660
    loop.run(server.stop(0))
    assert loop.blocking() == []


def test_a_second_stop_leaves_the_next_servers_socket_alone(
    loop: LoopThread, empty_repo: ModelRepository, short_dir: Path
) -> None:
    first = loop.run(InferenceServer.start(empty_repo, section(short_dir), "v"))
    loop.run(first.stop(0))
    second = loop.run(InferenceServer.start(empty_repo, section(short_dir), "v"))
    try:
        loop.run(first.stop(0))  # stopped already: the path is the second server's now
        with KServeClient(f"unix:{second.unix_socket}") as client:
            assert client.live()
    finally:
        loop.run(second.stop(0))


def test_a_failed_start_removes_the_socket_it_bound_and_lets_go_of_the_lock(
    loop: LoopThread, empty_repo: ModelRepository, short_dir: Path
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=f"cannot listen on server.tcp_address 127.0.0.1:{port}"):
            loop.run(InferenceServer.start(empty_repo, section(short_dir, tcp_address=f"127.0.0.1:{port}"), "v"))
    assert not (short_dir / "i.sock").exists()
    server = loop.run(InferenceServer.start(empty_repo, section(short_dir), "v"))  # the lock was let go
    loop.run(server.stop(0))


def test_a_refused_tcp_address_claims_no_socket(loop: LoopThread, empty_repo: ModelRepository, short_dir: Path) -> None:
    with pytest.raises(ConfigError, match="not a loopback address"):
        loop.run(InferenceServer.start(empty_repo, section(short_dir, tcp_address="0.0.0.0:0"), "v"))
    assert list(short_dir.iterdir()) == []  # neither the socket nor its lock file


def test_a_file_step_whose_caller_was_cancelled_is_taken_back_when_its_thread_finishes(loop: LoopThread) -> None:
    """What keeps a cancelled start from leaking the socket's lock: the claim's thread cannot be stopped, so
    its result (the lock's fd) is handed to `undo` once it is there."""
    entered, release = threading.Event(), threading.Event()
    undone: list[int] = []

    def slow_claim() -> int:
        entered.set()
        release.wait(10)
        return 42

    step = asyncio.run_coroutine_threadsafe(on_file_thread(slow_claim, undo=undone.append), loop.loop)
    assert entered.wait(10)
    step.cancel()
    with pytest.raises(concurrent.futures.CancelledError):
        step.result(10)
    assert undone == []  # the thread still holds it
    release.set()
    wait_for(lambda: undone == [42], 10, "the finished step to be taken back")


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
