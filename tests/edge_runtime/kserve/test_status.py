"""The one mapping from edge_runtime errors to gRPC status codes, checked through a real channel."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from structlog.testing import capture_logs

from edge_runtime import errors
from edge_runtime.config import ServerSection
from edge_runtime.errors import EdgeRuntimeError
from edge_runtime.kserve import InferenceServer, KServeClient
from edge_runtime.kserve.client import build_request
from edge_runtime.kserve.status import STATUS_CODES
from tests.edge_runtime.kserve.conftest import digits_inputs, rpc_error
from tests.loopcheck import LoopThread


def all_subclasses(cls: type) -> list[type]:
    found = []
    for sub in cls.__subclasses__():
        found += [sub, *all_subclasses(sub)]
    return found


ERROR_CLASSES = [EdgeRuntimeError, *all_subclasses(EdgeRuntimeError)]


def test_every_edge_runtime_error_has_its_own_status_code() -> None:
    assert set(errors.__all__) <= {c.__name__ for c in ERROR_CLASSES}  # the walk found them all
    unmapped = [c.__name__ for c in ERROR_CLASSES if c not in STATUS_CODES]
    assert not unmapped, f"add these to edge_runtime/kserve/status.py STATUS_CODES: {unmapped}"
    assert STATUS_CODES[errors.InvalidInput] == grpc.StatusCode.INVALID_ARGUMENT
    assert STATUS_CODES[errors.Overloaded] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert STATUS_CODES[errors.RequestTooLarge] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert STATUS_CODES[errors.ModelNotFound] == grpc.StatusCode.NOT_FOUND
    assert STATUS_CODES[errors.RequestTimeout] == grpc.StatusCode.DEADLINE_EXCEEDED


class FailingRepository:
    """A ModelRepository double whose every lookup raises `error`.

    A stand-in, not the real repository, because a real one cannot raise VerificationFailed or EngineError
    from ModelInfer, or an arbitrary unexpected exception, on cue; everything else in these tests is real
    (grpc.aio server, channel, servicer, codec and status mapping).
    """

    def __init__(self) -> None:
        self.error: BaseException = RuntimeError("unset")

    def ready(self) -> bool:
        return True

    def attach_loop(self, loop: object) -> None:
        """The server hands its loop to the repository; this double runs nothing on it."""

    def models(self) -> list[Any]:
        return []

    def model(self, name: str, version: str = "") -> Any:
        raise self.error

    def submit(self, request: Any) -> Any:
        raise self.error

    def submit_awaitable(self, request: Any) -> Any:
        raise self.error


@pytest.fixture
def failing(short_dir: Path) -> Iterator[tuple[FailingRepository, KServeClient]]:
    repo = FailingRepository()
    loop = LoopThread()
    section = ServerSection(unix_socket=str(short_dir / "s.sock"), tcp_address="127.0.0.1:0", metrics_address="")
    server: InferenceServer = loop.run(InferenceServer.start(repo, section, "test"))  # type: ignore[arg-type]
    client = KServeClient(server.targets[0], timeout_s=10)
    try:
        yield repo, client
    finally:
        client.close()
        loop.run(server.stop(1.0))
        loop.close()
    assert not loop.slow.blocking()


@pytest.mark.parametrize("cls", ERROR_CLASSES, ids=lambda c: c.__name__)
def test_each_error_reaches_the_client_as_its_status_with_its_message(
    failing: tuple[FailingRepository, KServeClient], cls: type[EdgeRuntimeError]
) -> None:
    repo, client = failing
    repo.error = cls(f"the reason for {cls.__name__}")
    for call in (
        lambda: client.infer("digits", {"pixels": digits_inputs(1)}),
        lambda: client.model_metadata("digits"),
        lambda: client.statistics("digits"),
    ):
        error = rpc_error(call)
        assert error.code() == STATUS_CODES[cls]
        assert error.details() == f"the reason for {cls.__name__}"


def test_an_unexpected_exception_becomes_internal_with_a_generic_message_and_a_log_line(
    failing: tuple[FailingRepository, KServeClient],
) -> None:
    repo, client = failing
    repo.error = KeyError("secret-internal-detail")
    with capture_logs() as logs:
        for call in (
            lambda: client.infer_raw(build_request("digits", {"pixels": digits_inputs(1)})),
            lambda: client.model_metadata("digits"),
            lambda: client.model_ready("digits"),
            lambda: client.statistics("digits"),
        ):
            error = rpc_error(call)
            assert error.code() == grpc.StatusCode.INTERNAL
            assert error.details() == "internal error in edge-agent; see its log"
    events = [e for e in logs if e["event"] == "kserve.internal_error"]
    assert len(events) == 4
    assert all("secret-internal-detail" in e["error"] for e in events)
    assert client.live()  # and the server goes on answering
