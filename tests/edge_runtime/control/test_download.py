"""download_file against a real grpc.aio Artifacts server on loopback: resume, faults, refusals, and no file
work on the loop (the client's loop runs in debug mode, judged by tests/loopcheck.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from edge_runtime.control.download import DownloadFailed, download_file
from edge_runtime.control.trust import ArtifactRefused
from edgefleet.proto.edgefleet.v1.models_pb2 import SignedManifest
from tests.edge_runtime.control.artifacts_server import (
    CHUNK,
    TOKEN,
    ArtifactsServer,
    ScriptedArtifacts,
    Signer,
    manifest_for,
    random_bytes,
)
from tests.loopcheck import LoopThread

NAME, VERSION = "digits", 3
SIZE = 10 * CHUNK + 123


@pytest.fixture
def loop() -> Iterator[LoopThread]:
    thread = LoopThread("test-agent-loop")
    yield thread
    thread.close()
    assert not thread.blocking(), f"the download blocked the loop: {thread.blocking()}"


@pytest.fixture
def model() -> bytes:
    return random_bytes(SIZE)


@pytest.fixture
def artifacts(model: bytes) -> ScriptedArtifacts:
    served = ScriptedArtifacts()
    served.add(NAME, VERSION, Signer().sign(manifest_for(NAME, VERSION, model)), {"model.onnx": model})
    return served


@pytest.fixture
def server(artifacts: ScriptedArtifacts) -> Iterator[ArtifactsServer]:
    running = ArtifactsServer(artifacts).start()
    yield running
    running.close()


class Client:
    """Runs download_file on the test's agent loop, over one channel."""

    def __init__(self, loop: LoopThread, target: str) -> None:
        self.loop = loop
        self.channel: grpc.aio.Channel = loop.call(grpc.aio.insecure_channel, target)
        self.progress: list[tuple[int, int]] = []

    def download(self, partial: Path, expected: Any = SIZE, token: str = TOKEN, **options: Any) -> SignedManifest:
        coro = download_file(
            self.channel, token, NAME, VERSION, "model.onnx", partial, expected,
            lambda done, total: self.progress.append((done, total)), **options,
        )  # fmt: skip
        return self.loop.run(coro, 30)

    def close(self) -> None:
        self.loop.run(self.channel.close())


@pytest.fixture
def client(loop: LoopThread, server: ArtifactsServer) -> Iterator[Client]:
    made = Client(loop, server.target)
    yield made
    made.close()


def test_downloads_the_file_and_returns_the_signed_manifest(
    client: Client, artifacts: ScriptedArtifacts, model: bytes, tmp_path: Path
) -> None:
    partial = tmp_path / "d" / "model.onnx.part"
    signed = client.download(partial)
    assert signed == artifacts.packages[(NAME, VERSION)].signed
    assert partial.read_bytes() == model
    assert artifacts.requests == [(NAME, VERSION, "model.onnx", 0)]
    assert client.progress[0] == (0, SIZE) and client.progress[-1] == (SIZE, SIZE)
    assert [d for d, _ in client.progress] == sorted(d for d, _ in client.progress)


def test_resumes_from_the_partial_file_s_end(
    client: Client, artifacts: ScriptedArtifacts, model: bytes, tmp_path: Path
) -> None:
    partial = tmp_path / "model.onnx.part"
    partial.write_bytes(model[: 4 * CHUNK + 7])
    client.download(partial)
    assert partial.read_bytes() == model
    assert artifacts.requests[-1][3] == 4 * CHUNK + 7
    assert artifacts.data_bytes_sent == SIZE - (4 * CHUNK + 7)


def test_ten_cuts_cost_no_more_than_the_file_once(
    client: Client, artifacts: ScriptedArtifacts, model: bytes, tmp_path: Path
) -> None:
    partial = tmp_path / "model.onnx.part"
    artifacts.faults.cut_after = [SIZE // 12 + i for i in range(10)]
    failures = 0
    while True:
        try:
            client.download(partial)
            break
        except DownloadFailed as exc:
            assert exc.retryable, exc.reason
            assert "UNAVAILABLE" in exc.reason
            failures += 1
    assert failures == 10
    assert partial.read_bytes() == model
    assert artifacts.data_bytes_sent == SIZE  # every byte once: each call resumed where the last one stopped
    assert [r[3] for r in artifacts.requests] == sorted(r[3] for r in artifacts.requests)


def test_a_complete_partial_costs_only_the_manifest(
    client: Client, artifacts: ScriptedArtifacts, model: bytes, tmp_path: Path
) -> None:
    partial = tmp_path / "model.onnx.part"
    partial.write_bytes(model)
    client.download(partial)
    assert artifacts.requests[-1][3] == SIZE and artifacts.data_bytes_sent == 0
    assert partial.read_bytes() == model


def test_a_partial_longer_than_the_file_is_cut_back_to_its_size(
    client: Client, artifacts: ScriptedArtifacts, model: bytes, tmp_path: Path
) -> None:
    partial = tmp_path / "model.onnx.part"
    partial.write_bytes(model + b"junk")
    client.download(partial)
    assert partial.read_bytes() == model
    assert artifacts.requests[-1][3] == SIZE


def test_endless_data_is_refused_and_the_partial_stays_within_the_size(
    client: Client, artifacts: ScriptedArtifacts, model: bytes, tmp_path: Path
) -> None:
    declared = SIZE - 1000  # the manifest says less than the cloud streams
    partial = tmp_path / "model.onnx.part"
    artifacts.faults.announce_size = declared
    with pytest.raises(ArtifactRefused) as refused:
        client.download(partial, expected=declared)
    assert refused.value.reason == "too-large"
    assert partial.stat().st_size <= declared
    assert partial.read_bytes() == model[: partial.stat().st_size]


def test_a_larger_announced_size_is_refused_before_any_data(
    client: Client, artifacts: ScriptedArtifacts, tmp_path: Path
) -> None:
    partial = tmp_path / "model.onnx.part"
    with pytest.raises(ArtifactRefused) as refused:
        client.download(partial, expected=SIZE - 1)
    assert refused.value.reason == "too-large"
    assert "signed manifest says" in str(refused.value)
    assert partial.stat().st_size == 0


def test_a_smaller_announced_size_is_a_mismatch(client: Client, tmp_path: Path) -> None:
    with pytest.raises(ArtifactRefused) as refused:
        client.download(tmp_path / "model.onnx.part", expected=SIZE + 1)
    assert refused.value.reason == "mismatch"


def test_a_chunk_at_the_wrong_offset_is_refused_and_not_written(
    client: Client, artifacts: ScriptedArtifacts, tmp_path: Path
) -> None:
    partial = tmp_path / "model.onnx.part"
    artifacts.faults.wrong_offset = True
    with pytest.raises(DownloadFailed) as failed:
        client.download(partial)
    assert failed.value.retryable
    assert "offset 1, the file ends at 0" in failed.value.reason
    assert partial.stat().st_size == 0


def test_a_stream_that_does_not_start_with_the_manifest_is_refused(
    client: Client, artifacts: ScriptedArtifacts, tmp_path: Path
) -> None:
    artifacts.faults.data_first = True
    with pytest.raises(DownloadFailed, match="did not start with the signed manifest"):
        client.download(tmp_path / "model.onnx.part")


def test_a_silent_cloud_fails_the_call_after_the_idle_timeout_and_keeps_what_came(
    client: Client, artifacts: ScriptedArtifacts, model: bytes, tmp_path: Path
) -> None:
    partial = tmp_path / "model.onnx.part"
    artifacts.faults.stall_after = [3 * CHUNK]
    with pytest.raises(DownloadFailed) as failed:
        client.download(partial, idle_timeout_s=0.5)
    assert failed.value.retryable and "no data from the cloud for 0.5 s" in failed.value.reason
    assert partial.read_bytes() == model[: 3 * CHUNK]
    client.download(partial)
    assert partial.read_bytes() == model


def test_cancelling_keeps_what_was_written_for_the_next_call(
    client: Client, loop: LoopThread, artifacts: ScriptedArtifacts, model: bytes, tmp_path: Path
) -> None:
    partial = tmp_path / "model.onnx.part"
    artifacts.faults.stall_after = [2 * CHUNK]

    async def cancel_midway() -> None:
        midway = asyncio.Event()

        def progress(done: int, total: int) -> None:
            if done >= 2 * CHUNK:
                midway.set()

        task = asyncio.ensure_future(download_file(client.channel, TOKEN, NAME, VERSION, "", partial, SIZE, progress))
        await midway.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    loop.run(cancel_midway())
    assert partial.read_bytes() == model[: 2 * CHUNK]  # closed and fsynced on the way out
    client.download(partial)
    assert partial.read_bytes() == model


@pytest.mark.parametrize(
    ("code", "retryable"),
    [
        (grpc.StatusCode.PERMISSION_DENIED, False),
        (grpc.StatusCode.UNAVAILABLE, True),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, True),
    ],
)
def test_refusals_say_the_cloud_s_reason_and_whether_retrying_can_help(
    client: Client, artifacts: ScriptedArtifacts, tmp_path: Path, code: grpc.StatusCode, retryable: bool
) -> None:
    artifacts.faults.refuse = code
    with pytest.raises(DownloadFailed) as failed:
        client.download(tmp_path / "model.onnx.part")
    assert failed.value.retryable is retryable
    assert code.name in failed.value.reason and "refused by the test" in failed.value.reason


def test_a_revoked_token_is_not_retryable(client: Client, tmp_path: Path) -> None:
    with pytest.raises(DownloadFailed) as failed:
        client.download(tmp_path / "model.onnx.part", token="revoked")
    assert not failed.value.retryable and "UNAUTHENTICATED" in failed.value.reason


def test_a_model_not_assigned_is_refused_with_the_cloud_s_words(
    client: Client, artifacts: ScriptedArtifacts, tmp_path: Path
) -> None:
    artifacts.packages.clear()
    with pytest.raises(DownloadFailed, match="is not assigned to this device"):
        client.download(tmp_path / "model.onnx.part")


def test_the_size_check_sees_the_manifest_before_any_data_and_can_refuse_it(
    client: Client, artifacts: ScriptedArtifacts, tmp_path: Path
) -> None:
    seen: list[SignedManifest] = []

    def refuse(signed: SignedManifest, total: int) -> int:
        seen.append(signed)
        raise ArtifactRefused("bad-signature", "refused by the test")

    partial = tmp_path / "model.onnx.part"
    with pytest.raises(ArtifactRefused):
        client.download(partial, expected=refuse)
    assert seen == [artifacts.packages[(NAME, VERSION)].signed]
    assert partial.stat().st_size == 0


def test_the_size_check_s_answer_is_the_size_the_file_gets(client: Client, model: bytes, tmp_path: Path) -> None:
    partial = tmp_path / "model.onnx.part"
    client.download(partial, expected=lambda signed, total: total)
    assert partial.read_bytes() == model
