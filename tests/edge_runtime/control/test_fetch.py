"""fetch_package against a real grpc.aio Artifacts server on loopback: a verified package ModelStore installs,
resume across failures, and every refusal made before the body is fetched (or the damaged file deleted after)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from edge_runtime.control.download import DownloadFailed
from edge_runtime.control.fetch import download_dir, fetch_package, remove_download
from edge_runtime.control.trust import ArtifactRefused, TrustStore
from edge_runtime.errors import PackageError
from edge_runtime.models.package import read_package
from edge_runtime.models.store import ModelStore
from edgefleet.proto.edgefleet.v1.state_pb2 import MODEL_STATE_DOWNLOADING, MODEL_STATE_VERIFYING
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

NAME, VERSION = "digits", 2
MODEL = random_bytes(6 * CHUNK + 5)
WARMUP = random_bytes(CHUNK + 9)
SHA = hashlib.sha256(MODEL).hexdigest()


@pytest.fixture
def loop() -> Iterator[LoopThread]:
    thread = LoopThread("test-agent-loop")
    yield thread
    thread.close()
    assert not thread.blocking(), f"the fetch blocked the loop: {thread.blocking()}"


@pytest.fixture
def signer() -> Signer:
    return Signer()


@pytest.fixture
def artifacts(signer: Signer) -> ScriptedArtifacts:
    served = ScriptedArtifacts()
    manifest = manifest_for(NAME, VERSION, MODEL, WARMUP)
    served.add(NAME, VERSION, signer.sign(manifest), {"model.onnx": MODEL, "warmup.npz": WARMUP})
    return served


@pytest.fixture
def server(artifacts: ScriptedArtifacts) -> Iterator[ArtifactsServer]:
    running = ArtifactsServer(artifacts).start()
    yield running
    running.close()


class Device:
    """The device's side: a trust store, a downloads dir, a channel on the agent's loop."""

    def __init__(self, loop: LoopThread, target: str, data_dir: Path, signer: Signer) -> None:
        self.loop = loop
        self.data_dir = data_dir
        self.downloads = data_dir / "downloads"
        self.trust = TrustStore(data_dir, signer.public_key)
        self.channel: grpc.aio.Channel = loop.call(grpc.aio.insecure_channel, target)
        self.phases: list[int] = []
        self.progress: list[float] = []

    def fetch(self, name: str = NAME, version: int = VERSION, sha256: str | None = SHA, **options: Any) -> Path:
        coro = fetch_package(
            self.channel, TOKEN, self.trust, name, version, sha256, self.downloads,
            self.progress.append, self.phases.append, **options,
        )  # fmt: skip
        return self.loop.run(coro, 30)

    def close(self) -> None:
        self.loop.run(self.channel.close())


def nothing_written(device: Device) -> bool:
    """No byte of the package's body landed on the device (the server may have queued some: never read)."""
    directory = download_dir(device.downloads, NAME, VERSION)
    return all(not p.exists() or p.stat().st_size == 0 for p in directory.glob("*.onnx*"))


@pytest.fixture
def device(loop: LoopThread, server: ArtifactsServer, tmp_path: Path, signer: Signer) -> Iterator[Device]:
    made = Device(loop, server.target, tmp_path / "agent", signer)
    yield made
    made.close()


def test_fetches_a_complete_verified_package_that_the_store_installs(
    device: Device, artifacts: ScriptedArtifacts
) -> None:
    directory = device.fetch()
    assert directory == device.downloads / NAME / str(VERSION)
    assert sorted(p.name for p in directory.iterdir()) == ["manifest.json", "model.onnx", "warmup.npz"]
    package = read_package(directory, verify=True)
    assert package.manifest.sha256 == SHA and package.warmup_path is not None
    installed = ModelStore(device.data_dir / "models").install(directory)
    assert installed.model_path.read_bytes() == MODEL
    assert device.phases == [MODEL_STATE_DOWNLOADING, MODEL_STATE_VERIFYING]
    assert device.progress[-1] == 1.0 and device.progress == sorted(device.progress)
    assert [(r[2], r[3]) for r in artifacts.requests] == [("model.onnx", 0), ("warmup.npz", 0)]
    assert device.trust.highest_serial(NAME, VERSION) == 1


def test_a_package_without_warmup_inputs(device: Device, artifacts: ScriptedArtifacts, signer: Signer) -> None:
    artifacts.add(NAME, 5, signer.sign(manifest_for(NAME, 5, MODEL)), {"model.onnx": MODEL})
    directory = device.fetch(version=5)
    assert sorted(p.name for p in directory.iterdir()) == ["manifest.json", "model.onnx"]
    assert [r[2] for r in artifacts.requests] == ["model.onnx"]


def test_fetching_again_downloads_nothing(device: Device, artifacts: ScriptedArtifacts) -> None:
    device.fetch()
    sent = artifacts.data_bytes_sent
    directory = device.fetch()
    assert artifacts.data_bytes_sent == sent
    assert read_package(directory, verify=True).manifest.sha256 == SHA


def test_an_interrupted_fetch_resumes_where_it_stopped(device: Device, artifacts: ScriptedArtifacts) -> None:
    # One entry per call: model.onnx cut at 3 chunks; then it completes; then warmup.npz cut at 10 bytes.
    artifacts.faults.cut_after = [3 * CHUNK, 1 << 30, 10]
    with pytest.raises(DownloadFailed):
        device.fetch()
    assert not (download_dir(device.downloads, NAME, VERSION) / "manifest.json").exists()
    with pytest.raises(DownloadFailed):
        device.fetch()
    device.fetch()
    assert artifacts.data_bytes_sent == len(MODEL) + len(WARMUP)
    offsets = [(r[2], r[3]) for r in artifacts.requests]
    assert offsets == [("model.onnx", 0), ("model.onnx", 3 * CHUNK), ("warmup.npz", 0), ("model.onnx", len(MODEL)),
                       ("warmup.npz", 10)]  # fmt: skip


@pytest.mark.parametrize(
    ("arrange", "reason"),
    [
        (lambda device, artifacts, signer: setattr(device, "trust", TrustStore(device.data_dir, Signer().public_key)),
         "wrong-key"),
        (lambda device, artifacts, signer: artifacts.add(
            NAME, VERSION, signer.sign(manifest_for(NAME, VERSION, MODEL, WARMUP), expires_at_ms=1),
            artifacts.packages[(NAME, VERSION)].files), "expired"),
        (lambda device, artifacts, signer: device.trust.remember(device.trust.check(
            signer.sign(manifest_for(NAME, VERSION, MODEL, WARMUP), serial=99), NAME, VERSION, SHA, 0)), "rollback"),
        (lambda device, artifacts, signer: artifacts.add(
            NAME, VERSION, signer.sign(manifest_for(NAME, 9, MODEL)), artifacts.packages[(NAME, VERSION)].files),
         "mismatch"),
    ],
    ids=["wrong-key", "expired", "rollback", "another-version"],
)  # fmt: skip
def test_an_untrusted_manifest_is_refused_before_any_byte_of_the_body(
    device: Device, artifacts: ScriptedArtifacts, signer: Signer, arrange: Any, reason: str
) -> None:
    arrange(device, artifacts, signer)
    with pytest.raises(ArtifactRefused) as refused:
        device.fetch()
    assert refused.value.reason == reason
    assert nothing_written(device)
    assert device.phases == [MODEL_STATE_DOWNLOADING]


def test_a_model_other_than_the_assigned_one_is_refused_before_download(
    device: Device, artifacts: ScriptedArtifacts
) -> None:
    with pytest.raises(ArtifactRefused) as refused:
        device.fetch(sha256="f" * 64)
    assert refused.value.reason == "mismatch" and nothing_written(device)


def test_a_package_larger_than_the_device_takes_is_refused_before_download(
    device: Device, artifacts: ScriptedArtifacts
) -> None:
    with pytest.raises(ArtifactRefused) as refused:
        device.fetch(max_bytes=len(MODEL))
    assert refused.value.reason == "too-large" and nothing_written(device)


def test_a_blob_that_does_not_match_its_manifest_is_deleted_and_fetched_again(
    device: Device, artifacts: ScriptedArtifacts
) -> None:
    files = artifacts.packages[(NAME, VERSION)].files
    files["model.onnx"] = random_bytes(len(MODEL))  # same size, other bytes: mix-and-match
    with pytest.raises(ArtifactRefused) as refused:
        device.fetch()
    assert refused.value.reason == "mismatch" and "deleted it" in str(refused.value)
    directory = download_dir(device.downloads, NAME, VERSION)
    assert not (directory / "model.onnx.part").exists() and not (directory / "model.onnx").exists()
    files["model.onnx"] = MODEL  # the registry fixed
    device.fetch()
    assert read_package(directory, verify=True).model_path.read_bytes() == MODEL


def test_a_blob_longer_than_its_manifest_is_refused(device: Device, artifacts: ScriptedArtifacts) -> None:
    artifacts.packages[(NAME, VERSION)].files["model.onnx"] = MODEL + b"endless"
    with pytest.raises(ArtifactRefused) as refused:
        device.fetch()
    assert refused.value.reason == "too-large" and nothing_written(device)


def test_a_cloud_without_the_warmup_file_is_a_refusal_not_a_crash(device: Device, artifacts: ScriptedArtifacts) -> None:
    del artifacts.packages[(NAME, VERSION)].files["warmup.npz"]
    with pytest.raises(DownloadFailed) as failed:
        device.fetch()
    assert not failed.value.retryable and "INVALID_ARGUMENT" in failed.value.reason


@pytest.mark.parametrize(("name", "version"), [("../etc", 1), ("Digits", 1), ("digits", 0)])
def test_a_name_or_version_that_is_not_a_model_s_never_touches_the_disk(
    device: Device, name: str, version: int
) -> None:
    with pytest.raises(PackageError):
        device.fetch(name=name, version=version)
    assert not device.downloads.exists()


def test_remove_download_forgets_a_partial_download(device: Device, artifacts: ScriptedArtifacts) -> None:
    artifacts.faults.cut_after = [CHUNK]
    with pytest.raises(DownloadFailed):
        device.fetch()
    remove_download(device.downloads, NAME, VERSION)
    assert not download_dir(device.downloads, NAME, VERSION).exists()
    device.fetch()
    assert artifacts.requests[-2][3] == 0  # started over


@pytest.fixture
def cloud(tmp_path: Path) -> Iterator[Any]:
    pytest.importorskip("sqlalchemy", reason="the real cloud-sync needs the [cloud] extra (not in the device's venv)")
    from tests.cloud_inprocess import InProcessCloud

    running = InProcessCloud(tmp_path / "cloud").start()
    yield running
    running.close()
    assert not running.blocked, f"cloud-sync blocked its loop: {running.blocked}"


def test_against_cloud_sync_s_registry_only_what_is_assigned_and_resumable(
    cloud: Any, loop: LoopThread, tmp_path: Path
) -> None:
    from cloud_sync.store.devices import DeviceRegistry
    from tests.cloud_sync.registry.helpers import package

    registry = cloud.app.model_registry
    manifest, model, warmup = package(registry.blobs, NAME, VERSION, size=5 * 256 * 1024 + 17, warmup=4000)
    registry.register(manifest, 4_102_444_800_000)
    token = DeviceRegistry(cloud._database()).add_device("cam-1", {"site": "lab"})
    other = DeviceRegistry(cloud._database()).add_device("cam-2", {"site": "home"})
    # As the admin API assigns: the running cloud's reconciler computes each device's desired state.
    cloud.app.assignment_store.assign(NAME, VERSION, {"site": "lab"})
    cloud.app.reconciler.on_change()
    assert [m.name for m in cloud.control.desired("cam-1").models] == [NAME]
    trust = TrustStore(tmp_path / "agent", registry.signer.public_key)
    downloads = tmp_path / "agent" / "downloads"
    channel = loop.call(grpc.aio.insecure_channel, cloud.target)
    try:
        with pytest.raises(DownloadFailed) as refused:
            loop.run(fetch_package(channel, other, trust, NAME, VERSION, None, downloads))
        assert not refused.value.retryable and "not assigned to this device" in refused.value.reason
        part = download_dir(downloads, NAME, VERSION) / "model.onnx.part"
        part.write_bytes(model[:300_000])  # what an interrupted call left
        directory = loop.run(fetch_package(channel, token, trust, NAME, VERSION, manifest["sha256"], downloads))
    finally:
        loop.run(channel.close())
    package_on_disk = read_package(directory, verify=True)
    assert package_on_disk.model_path.read_bytes() == model
    assert package_on_disk.warmup_path is not None and package_on_disk.warmup_path.read_bytes() == warmup
    assert trust.highest_serial(NAME, VERSION) == registry.get(NAME, VERSION).serial
