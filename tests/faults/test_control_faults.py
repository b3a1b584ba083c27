"""The control plane under faults, with real processes: a real Mosquitto, a real cloud-sync (its registry signs
and serves the packages, its reconciler writes the desired states) and edge-agent processes that converge.

- kill -9 at each step of a model update: one version active (store pointer = what KServe serves), the report
  consistent with it, and the next start converges;
- a download cut mid-stream resumes from its offset;
- reported states lost between device and broker, and cloud-sync restarted mid-change: every device still
  ends in a state the cloud sees;
- the update-framework attacks, each refused with its reason while the old version keeps serving.

See tests/faults/control.py for the pieces and docs/notes/stream-F2.md for the choices.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import onnx
import pytest

from cloud_sync.registry.signer import FleetSigner
from edgefleet.proto.edgefleet.v1.state_pb2 import (
    MODEL_STATE_ACTIVE,
    MODEL_STATE_FAILED,
    ReportedState,
)
from tests.faults.control import ControlCloud, ControlDevice, TcpProxy, package_with_version
from tests.faults.mqtt_proxy import MqttDropProxy
from tests.mosquitto import Mosquitto
from tests.processes import AgentProcess
from tests.waiting import wait_for

pytestmark = pytest.mark.slow

CHUNK = 256 * 1024


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    with Mosquitto(tmp_path_factory.mktemp("broker")) as started:
        yield started


@pytest.fixture(scope="module")
def plane(
    tmp_path_factory: pytest.TempPathFactory, broker: Mosquitto, model_packages: dict[str, Path]
) -> Iterator[ControlCloud]:
    """One cloud-sync for the module, digits 1 and 2 in its registry; each test targets its own devices."""
    cloud = ControlCloud(tmp_path_factory.mktemp("cloud"), broker.url)
    cloud.start()
    for ref in ("digits:1", "digits:2"):
        cloud.push(model_packages[ref])
    yield cloud
    cloud.kill()


@pytest.fixture
def sockets() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="ef-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def make_device(
    tmp_path: Path, sockets: Path, plane: ControlCloud, broker: Mosquitto, model_packages: dict[str, Path]
) -> Iterator[Callable[..., ControlDevice]]:
    """make_device(id, labels=..., mqtt_url=..., grpc_target=..., engine=...): registered in the cloud, digits:1
    installed and active, reporting over MQTT, downloading over gRPC (directly, or through a proxy)."""
    devices: list[ControlDevice] = []
    key = plane.signing_key()

    def make(
        device_id: str,
        *,
        labels: dict[str, str] | None = None,
        mqtt_url: str = "",
        grpc_target: str = "",
        engine: dict[str, Any] | None = None,
    ) -> ControlDevice:
        token = plane.add_device(device_id, labels or {"fault": device_id})
        device = ControlDevice(
            tmp_path / device_id,
            sockets,
            device_id,
            plane.cloud,
            token,
            model_packages["digits:1"],
            upload={"sample_rate": 0.0},
            mqtt={"url": mqtt_url or broker.url, "keepalive_s": 5},
            signing_key=key,
            grpc_target=grpc_target,
            engine=engine or {},
        )
        devices.append(device)
        return device

    yield make
    for device in devices:
        device.kill()


def digits_status(report: ReportedState) -> Any:
    return next(m for m in report.models if m.name == "digits")


def assert_serves(device: ControlDevice, version: int) -> None:
    """The store's pointer and KServe agree on `version`, and it is the only version loaded."""
    assert device.agreed_version() == version
    wait_for(lambda: device.loaded_versions() == [str(version)], 20, f"{device.device_id} to hold only {version}")


# -- 1. kill -9 at each step of a model update -------------------------------------------------------------------

STEPS = ["downloading", "verifying", "building", "warming", "switching", "reporting"]


def _events(device: ControlDevice, name: str, **fields: Any) -> list[dict[str, Any]]:
    assert device.proc is not None
    events = list(device.proc.events)  # a copy: the reader thread appends while we look
    return [e for e in events if e.get("event") == name and all(e.get(k) == v for k, v in fields.items())]


def _moment(step: str, device: ControlDevice, size: int, proxy: TcpProxy) -> Callable[[], bool]:
    """When the agent is in `step` of installing digits:2, as seen from outside (its log, its files, the bytes
    through its link)."""
    part = device.data_dir / "downloads" / "digits" / "2" / "model.onnx.part"

    def part_size() -> int:
        try:
            return part.stat().st_size
        except FileNotFoundError:
            return -1

    moments: dict[str, Callable[[], bool]] = {
        # The proxy paces the bytes (seconds of this); the file is one gRPC message, so it lands on disk whole.
        "downloading": lambda: size // 4 < proxy.downstream < size // 2,
        "verifying": lambda: part_size() == size or bool(_events(device, "model.fetched")),  # every byte on disk
        "building": lambda: bool(_events(device, "model.fetched")),  # verified; install + engine build next
        "warming": lambda: bool(_events(device, "engine.loaded", model="digits:2")),  # warm-up inferences next
        "switching": lambda: bool(_events(device, "model.ready", model="digits", version=2)),  # READY, switch next
        "reporting": lambda: bool(_events(device, "model.activated", model="digits", version=2)),  # switched
    }
    return moments[step]


# What must not have happened yet when the kill landed in `step` (checked from the dead agent's log).
NOT_YET = {
    "downloading": ("model.fetched", {}),
    "verifying": ("model.ready", {"model": "digits", "version": 2}),
    "building": ("model.ready", {"model": "digits", "version": 2}),
    "warming": ("model.ready", {"model": "digits", "version": 2}),
    "switching": None,
    "reporting": None,
}


@pytest.mark.parametrize("step", STEPS)
def test_kill_9_at_each_step_of_an_update_leaves_one_version_active_and_the_next_start_converges(
    step: str, plane: ControlCloud, make_device: Callable[..., ControlDevice], model_packages: dict[str, Path]
) -> None:
    size = (model_packages["digits:2"] / "model.onnx").stat().st_size
    # A paced link gives the download seconds; elsewhere it is left unpaced.
    proxy = TcpProxy(plane.grpc_port, rate=6000 if step == "downloading" else None)
    engine = {"warmup_inferences": 1000} if step == "warming" else {}
    device = make_device(f"kill-{step}", grpc_target=proxy.target, engine=engine)
    try:
        device.start()
        plane.assign("digits", 2, {"fault": device.device_id})
        generation = plane.wait_desired(device.device_id, "digits", 2).generation
        wait_for(_moment(step, device, size, proxy), 60, f"the agent to be {step}", poll=0.001)
        assert device.proc is not None
        dead = device.proc
        device.kill()  # SIGKILL
        proxy.rate = None
        not_yet = NOT_YET[step]
        if not_yet is not None:
            assert not [
                e
                for e in dead.events
                if e.get("event") == not_yet[0] and all(e.get(k) == v for k, v in not_yet[1].items())
            ], f"the kill meant for {step} landed after {not_yet[0]}"

        # Exactly one version active, and what the cloud was told agrees with it.
        active = device.active_version()
        assert active in (1, 2)
        if step in ("downloading", "verifying", "building", "warming"):
            assert active == 1
        if step == "reporting":
            assert active == 2
        for version in device.store.versions("digits"):  # nothing half-installed under a version's name
            device.store.package("digits", version, verify=True)
        told = plane.reported(device.device_id)
        if told is not None and told.generation == generation:
            status = digits_status(told)
            if status.state == MODEL_STATE_ACTIVE:
                assert status.version == active, "the cloud was told of a version the device does not run"

        # The next start serves the active version at once, then converges to the desired one.
        device.start()
        first = device.agreed_version()
        assert first in (active, 2)
        report = plane.wait_reported(device.device_id, generation, 60)
        assert report.converged and (digits_status(report).version, digits_status(report).state) == (
            2,
            MODEL_STATE_ACTIVE,
        )
        assert_serves(device, 2)
        assert device.store.active("digits").previous == 1  # type: ignore[union-attr]  # the rollback target
        device.stop()  # nothing stuck: a clean exit
    finally:
        proxy.close()


# -- 2. a download cut mid-stream resumes from its offset ----------------------------------------------------------


def test_a_download_cut_three_times_resumes_from_its_offset(
    plane: ControlCloud, make_device: Callable[..., ControlDevice], model_packages: dict[str, Path]
) -> None:
    package = model_packages["mobilenet-bench:1"]
    size = (package / "model.onnx").stat().st_size
    plane.push(package)
    cuts = [size // 5, size // 4, size // 3]
    # A link slower than the device writes (as an edge link is): what is lost at a cut is what was in flight.
    proxy = TcpProxy(plane.grpc_port, rate=16e6, cuts=list(cuts))
    device = make_device("resume", grpc_target=proxy.target)
    try:
        device.start()
        plane.assign("mobilenet-bench", 1, {"fault": device.device_id})
        assert device.proc is not None
        agent = device.proc
        fetched = agent.wait_event("model.fetched", 90)
        device.kill()  # the engine build of a 13 MiB model is not this test's business
        assert fetched["model"] == "mobilenet-bench" and proxy.cut == len(cuts)
        assert proxy.downstream <= 1.1 * size + len(cuts) * CHUNK, (proxy.downstream, size)
        assert plane.cloud.proc is not None
        calls = [
            e
            for e in plane.cloud.proc.events
            if e.get("event") == "artifacts.download" and e.get("device") == device.device_id
        ]
        offsets = [int(e["offset"]) for e in calls]
        # Each call after a cut asks from where the device's file ends: never from 0 again.
        assert len(offsets) == len(cuts) + 1 and offsets[0] == 0, offsets
        assert offsets == sorted(offsets) and len(set(offsets)) == len(offsets), offsets
    finally:
        proxy.close()


# -- 3. reported states lost, cloud-sync restarted mid-change ------------------------------------------------------


def test_lost_reports_and_a_cloud_restart_mid_change_still_end_with_every_device_done(
    plane: ControlCloud, broker: Mosquitto, make_device: Callable[..., ControlDevice]
) -> None:
    proxy = MqttDropProxy(broker.port, lambda topic: topic.endswith("/reported"), share=0.1, seed=4)
    devices = [make_device(f"lossy-{i}", labels={"fault": "lossy", "n": str(i)}, mqtt_url=proxy.url) for i in range(3)]
    try:
        for device in devices:  # started side by side: each pays the interpreter's start-up
            device.proc = AgentProcess(device.config)
        for device in devices:
            assert device.proc is not None
            device.proc.wait_ready(60)
        plane.assign("digits", 2, {"fault": "lossy"})
        generations = {d.device_id: plane.wait_desired(d.device_id, "digits", 2).generation for d in devices}
        plane.restart()  # mid-change: the devices download and report while it is away
        for device in devices:
            generation = generations[device.device_id]
            report = plane.wait_reported(device.device_id, generation, 90)
            status = digits_status(report)
            assert report.converged or (status.state == MODEL_STATE_FAILED and status.reason)
            if not report.converged:  # a download the restart cut, reported with its reason: retried to the end
                wait_for(
                    lambda d=device.device_id, g=generation: (
                        (r := plane.reported(d)) is not None and r.generation == g and r.converged
                    ),
                    90,
                    f"{device.device_id} to converge after its failed attempt",
                )
        assert proxy.stats.dropped > 0, "no report was dropped: the test tested nothing"
        for device in devices:
            assert_serves(device, 2)
    finally:
        proxy.close()


# -- 4. the update-framework attacks -------------------------------------------------------------------------------


def variant(source: Path, out: Path, version: int) -> Path:
    """digits:`version` with its own bytes (the ONNX doc string names the version): its own blob."""
    package = package_with_version(source, out, version)
    model = onnx.load_from_string((package / "model.onnx").read_bytes())
    model.doc_string = f"digits variant {version:04d}"
    data = model.SerializeToString()
    (package / "model.onnx").write_bytes(data)
    manifest = json.loads((package / "manifest.json").read_text())
    manifest.update(sha256=hashlib.sha256(data).hexdigest(), size=len(data))
    (package / "manifest.json").write_text(json.dumps(manifest, sort_keys=True))
    return package


def refused(plane: ControlCloud, device: ControlDevice, version: int, reason: str) -> ReportedState:
    """Assign digits:`version`; wait until the cloud sees it FAILED; its reason must lead with `reason`."""
    plane.assign("digits", version, {"fault": device.device_id})
    generation = plane.wait_desired(device.device_id, "digits", version).generation

    def seen() -> ReportedState | None:
        # An attempt may fail for a passing cause first (cloud-sync restarting): retried, then refused.
        report = plane.reported(device.device_id)
        if report is None or report.generation != generation:
            return None
        assert not report.converged, f"digits:{version} was accepted: {report}"
        status = digits_status(report)
        done = (status.version, status.state) == (version, MODEL_STATE_FAILED) and status.reason.startswith(reason)
        return report if done else None

    report = wait_for(seen, 60, f"the cloud to see digits:{version} refused for {reason}")
    assert report is not None
    return report


def test_the_update_framework_attacks_are_refused_with_their_reason_and_the_old_version_serves(
    plane: ControlCloud, make_device: Callable[..., ControlDevice], model_packages: dict[str, Path], tmp_path: Path
) -> None:
    digits2 = model_packages["digits:2"]
    out = tmp_path / "packages"
    device = make_device("attacked")
    device.start()
    assert_serves(device, 1)

    # Mix-and-match: the registry's blob of 11 holds another version's bytes (same size, other sha256).
    eleven, twelve = variant(digits2, out, 11), variant(digits2, out, 12)
    plane.push(eleven)
    plane.push(twelve)
    created = plane.call("GET", "/v1/models/digits/11")
    plane.blob_path(created["sha256"]).write_bytes((twelve / "model.onnx").read_bytes())
    refused(plane, device, 11, "mismatch")
    assert_serves(device, 1)

    # Endless data: bytes appended to the blob and the registry's size raised to match; the signed manifest
    # still says the real size, so the device refuses what the cloud offers.
    thirteen = variant(digits2, out, 13)
    row = plane.push(thirteen)
    with plane.blob_path(row["sha256"]).open("ab") as blob:
        blob.write(b"\0" * (1 << 20))
    plane.set_version_row("digits", 13, size=int(row["size"]) + (1 << 20))
    refused(plane, device, 13, "too-large")
    assert_serves(device, 1)

    # Expired: an envelope signed by the fleet's real key, with an expiry already past (a registry that
    # stopped re-signing, or a frozen copy replayed).
    fourteen = variant(digits2, out, 14)
    row = plane.push(fourteen)
    stored = plane.version_row("digits", 14)
    serial = int(stored["serial"]) + 1000
    past = time.time_ns() // 1_000_000 - 3_600_000
    signed = FleetSigner.open(plane.signing_key_file).sign(stored["manifest"], serial, past, past - 60_000)
    plane.set_version_row(
        "digits",
        14,
        envelope=signed.manifest_json,
        signature=signed.signature,
        key_id=signed.key_id,
        serial=serial,
        expires_at_ms=past,
    )
    refused(plane, device, 14, "expired")
    assert_serves(device, 1)

    # Rollback: the device installs 15 under a re-signed envelope, later needs it again (it pruned it) and is
    # offered the older envelope, put back in the registry's table (a restored backup, a replaying replica).
    fifteen = variant(digits2, out, 15)
    plane.push(fifteen)
    older = plane.version_row("digits", 15)
    plane.call("POST", "/v1/models/digits/15/sign", json={"expires_in_s": 86400})
    plane.assign("digits", 15, {"fault": device.device_id})
    generation = plane.wait_desired(device.device_id, "digits", 15).generation
    assert plane.wait_reported(device.device_id, generation).converged
    for back in (1, 2):  # two switches on, 15 is neither active nor the rollback target
        plane.assign("digits", back, {"fault": device.device_id})
        generation = plane.wait_desired(device.device_id, "digits", back).generation
        assert plane.wait_reported(device.device_id, generation).converged
    # The agent keeps the active version and the rollback target only: 15 is gone from its disk.
    wait_for(lambda: 15 not in device.store.versions("digits"), 20, "the agent to prune digits:15")
    plane.set_version_row(
        "digits", 15, **{k: older[k] for k in ("envelope", "signature", "key_id", "serial", "expires_at_ms")}
    )
    refused(plane, device, 15, "rollback")
    assert_serves(device, 2)

    # Wrong key: the registry's key replaced (cloud-sync makes a new one at start); what it signs now is not
    # what the device pinned.
    key = plane.signing_key_file
    kept = key.with_name("fleet-signing.key.kept")
    key.rename(kept)
    try:
        plane.restart()
        plane.push(variant(digits2, out, 16))
        refused(plane, device, 16, "wrong-key")
        assert_serves(device, 2)
    finally:
        plane.cloud.stop()
        kept.replace(key)
        plane.start()
