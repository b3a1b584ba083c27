"""The converger against a real repository, real model packages and a real Artifacts server on loopback.

Each test runs the converger on a loop thread in debug mode (tests/loopcheck.py judges it), downloads with
edge_runtime/control/fetch.py over gRPC from the scripted server (which makes the faults on cue), and reads
what the converger published: the reported states, in order.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest

from edge_runtime.config import AgentConfig
from edge_runtime.control.converge import Converger, Deadlines, backoff_delay
from edge_runtime.control.desired_store import DesiredStore
from edge_runtime.control.fetch import fetch_package
from edge_runtime.control.trust import TrustStore
from edge_runtime.models.package import MANIFEST_FILE, MODEL_FILE, WARMUP_FILE
from edge_runtime.models.repository import ModelRepository
from edge_runtime.policy import EffectivePolicy, parse_policy
from edgefleet.proto.edgefleet.v1 import state_pb2
from edgefleet.proto.edgefleet.v1.state_pb2 import (
    MODEL_ROLE_ACTIVE,
    MODEL_ROLE_SHADOW,
    MODEL_STATE_ACTIVE,
    MODEL_STATE_DOWNLOADING,
    MODEL_STATE_FAILED,
    MODEL_STATE_READY,
    DesiredState,
    ModelAssignment,
    ReportedState,
)
from tests.edge_runtime.control.artifacts_server import TOKEN, ArtifactsServer, ScriptedArtifacts, Signer
from tests.loopcheck import LoopThread
from tests.processes import install
from tests.waiting import wait_for

DEVICE = "cam-1"


def package_files(directory: Path) -> tuple[dict[str, Any], dict[str, bytes]]:
    manifest = json.loads((directory / MANIFEST_FILE).read_text())
    files = {MODEL_FILE: (directory / MODEL_FILE).read_bytes()}
    if (directory / WARMUP_FILE).exists():
        files[WARMUP_FILE] = (directory / WARMUP_FILE).read_bytes()
    return manifest, files


class Harness:
    """A converger as the agent wires it: loader and builder threads, the repository loaded first."""

    def __init__(
        self, config: AgentConfig, target: str, signing_key: bytes | None, deadlines: Deadlines | None = None
    ) -> None:
        self.config = config
        self.loop = LoopThread("converge-loop")
        self.repository = ModelRepository(config)
        self.loader = ThreadPoolExecutor(1, thread_name_prefix="model-loader")
        self.builder = ThreadPoolExecutor(1, thread_name_prefix="model-builder")
        self.reports: list[ReportedState] = []
        self.applied: list[str] = []
        self.base = EffectivePolicy.from_config(config)
        self.trust = TrustStore(config.data_dir, signing_key) if signing_key else None
        self.channel: grpc.aio.Channel | None = None
        self.target = target
        self.converger = Converger(
            device_id=DEVICE,
            repository=self.repository,
            persistence=DesiredStore(config.data_dir),
            accept_policy=self._accept,
            publish=self.reports.append,
            loader=self.loader,
            builder=self.builder,
            fetch=self._fetch if self.trust else None,
            no_fetch_reason="no fleet signing key: enroll the device",
            deadlines=deadlines,
            backoff=lambda failures: 0.05,
        )
        self.loader.submit(self.repository.load_active)
        self.loop.run(self.converger.start())

    async def _accept(self, state: DesiredState) -> Callable[[], Any]:
        parse_policy(state.policy_json, self.base)

        async def apply() -> None:
            self.applied.append(state.policy_json)

        return apply

    async def _fetch(self, name: str, version: int, sha256: str, on_progress: Any, on_phase: Any) -> Path:
        if self.channel is None:
            self.channel = grpc.aio.insecure_channel(self.target)
        assert self.trust is not None
        downloads = self.config.data_dir / "downloads"
        return await fetch_package(
            self.channel, TOKEN, self.trust, name, version, sha256, downloads, on_progress, on_phase
        )

    def offer(self, state: DesiredState) -> None:
        self.loop.call(self.converger.offer, state)

    def last(self) -> ReportedState | None:
        return self.reports[-1] if self.reports else None

    def model(self, name: str) -> state_pb2.ModelStatus | None:
        last = self.last()
        return next((m for m in last.models if m.name == name), None) if last else None

    def wait_model(
        self, name: str, test: Callable[[state_pb2.ModelStatus], bool], what: str, timeout: float = 30
    ) -> state_pb2.ModelStatus:
        def found() -> state_pb2.ModelStatus | None:
            m = self.model(name)
            return m if m is not None and test(m) else None

        return wait_for(found, timeout, what)  # type: ignore[return-value]  # found() is truthy when it returns

    def wait_state(self, name: str, state: int, timeout: float = 30) -> state_pb2.ModelStatus:
        return self.wait_model(name, lambda m: m.state == state, f"{name} in state {state}", timeout)

    def wait_report(self, test: Callable[[ReportedState], bool], what: str, timeout: float = 30) -> ReportedState:
        def found() -> ReportedState | None:
            r = self.last()
            return r if r is not None and test(r) else None

        return wait_for(found, timeout, what)  # type: ignore[return-value]  # found() is truthy when it returns

    def close(self) -> list[str]:
        self.loop.run(self.converger.aclose())
        if self.channel is not None:
            self.loop.run(self.channel.close())
        self.loader.submit(self.repository.close, 2).result(30)
        self.loader.shutdown()
        self.builder.shutdown()
        blocked = self.loop.blocking()
        self.loop.close()
        return blocked


@pytest.fixture
def signer() -> Signer:
    return Signer()


@pytest.fixture
def artifacts(model_packages: dict[str, Path], signer: Signer) -> Iterator[ScriptedArtifacts]:
    scripted = ScriptedArtifacts()
    for ref in ("digits:1", "digits:2"):
        manifest, files = package_files(model_packages[ref])
        scripted.add(manifest["name"], manifest["version"], signer.sign(manifest), files)
    server = ArtifactsServer(scripted).start()
    scripted.target = server.target  # type: ignore[attr-defined]
    yield scripted
    server.close()


@pytest.fixture
def harness(
    make_config: Callable[..., AgentConfig],
    config_data: dict[str, Any],
    model_packages: dict[str, Path],
    artifacts: ScriptedArtifacts,
    signer: Signer,
) -> Iterator[Callable[..., Harness]]:
    made: list[Harness] = []

    def make(*, key: bool = True, deadlines: Deadlines | None = None, installed: bool = True) -> Harness:
        if installed and not made:
            install(config_data, model_packages["digits:1"])
        h = Harness(make_config(), artifacts.target, signer.public_key if key else None, deadlines)  # type: ignore[attr-defined]
        made.append(h)
        return h

    yield make
    for h in made:
        if h.loop.thread.is_alive():
            assert not h.close(), "the converger blocked its loop"


def assign(generation: int, *models: tuple[str, int, str], shadow: bool = False, policy: str = "") -> DesiredState:
    role = MODEL_ROLE_SHADOW if shadow else MODEL_ROLE_ACTIVE
    return DesiredState(
        device_id=DEVICE,
        generation=generation,
        models=[ModelAssignment(name=n, version=v, role=role, sha256=s) for n, v, s in models],
        policy_json=policy,
        policy_hash=f"h{generation}",
    )


def sha(model_packages: dict[str, Path], ref: str) -> str:
    return str(json.loads((model_packages[ref] / MANIFEST_FILE).read_text())["sha256"])


# -- the happy path, and what must not happen again ------------------------------------------------------------


def test_an_assigned_version_is_downloaded_verified_built_and_switched_to_then_reported_converged(
    harness: Callable[..., Harness], model_packages: dict[str, Path], artifacts: ScriptedArtifacts
) -> None:
    h = harness()
    h.offer(assign(1, ("digits", 2, sha(model_packages, "digits:2")), policy='{"upload": {"sample_rate": 0.5}}'))
    done = h.wait_state("digits", MODEL_STATE_ACTIVE)
    assert (done.version, done.role, done.attempts, done.reason) == (2, MODEL_ROLE_ACTIVE, 0, "")
    assert done.backend and done.sha256 == sha(model_packages, "digits:2")
    assert h.repository.running("digits") == (2, done.sha256)
    assert h.repository.store.active("digits").version == 2  # type: ignore[union-attr]
    assert not (h.config.data_dir / "downloads" / "digits" / "2").exists()  # installed: the download is freed
    last = h.last()
    assert last is not None and last.converged and (last.generation, last.policy_hash) == (1, "h1")
    assert h.applied == ['{"upload": {"sample_rate": 0.5}}']
    states = [m.state for r in h.reports for m in r.models if m.name == "digits"]
    assert states[0] == MODEL_STATE_DOWNLOADING and states[-1] == MODEL_STATE_ACTIVE  # throttled: steps coalesce
    assert not any(r.converged for r in h.reports[:-1])
    assert DesiredStore(h.config.data_dir).load() == assign(
        1, ("digits", 2, sha(model_packages, "digits:2")), policy='{"upload": {"sample_rate": 0.5}}'
    )
    # The retained copy again (every reconnect): nothing downloads, nothing reloads, nothing is reported.
    asked, reported = len(artifacts.requests), len(h.reports)
    h.offer(assign(1, ("digits", 2, sha(model_packages, "digits:2"))))
    h.offer(assign(2, ("digits", 2, sha(model_packages, "digits:2"))))
    h.wait_report(lambda r: r.generation == 2 and r.converged, "generation 2 converged", 10)
    assert len(artifacts.requests) == asked and len(h.reports) <= reported + 2


def test_the_version_that_already_runs_is_neither_downloaded_nor_reloaded(
    harness: Callable[..., Harness], model_packages: dict[str, Path], artifacts: ScriptedArtifacts
) -> None:
    h = harness()
    served = wait_for(lambda: h.repository.models(), 30, "digits:1 loaded")[0]
    h.offer(assign(4, ("digits", 1, sha(model_packages, "digits:1"))))
    done = h.wait_state("digits", MODEL_STATE_ACTIVE)
    assert done.version == 1 and h.last().converged  # type: ignore[union-attr]
    assert artifacts.requests == [] and h.repository.models() == [served]


def test_a_persisted_desired_state_is_converged_to_at_start_without_the_cloud(
    harness: Callable[..., Harness], model_packages: dict[str, Path], artifacts: ScriptedArtifacts
) -> None:
    first = harness()
    first.offer(assign(3, ("digits", 2, sha(model_packages, "digits:2"))))
    first.wait_state("digits", MODEL_STATE_ACTIVE)
    assert not first.close()
    asked = len(artifacts.requests)
    again = harness(key=False)  # no key, so no way to download: nothing needs one
    last = again.wait_report(lambda r: r.converged, "the start report, converged", 30)
    assert (last.generation, [(m.name, m.version, m.state) for m in last.models]) == (
        3,
        [("digits", 2, MODEL_STATE_ACTIVE)],
    )
    assert len(artifacts.requests) == asked
    # The persisted state is the newest it knows: the same generation arriving from the cloud changes nothing.
    again.offer(assign(3, ("digits", 1, "")))
    assert again.converger.generation == 3 and again.repository.running("digits")[0] == 2  # type: ignore[index]


def test_a_shadow_assignment_is_built_and_ready_but_never_answers(
    harness: Callable[..., Harness], model_packages: dict[str, Path]
) -> None:
    h = harness()
    h.offer(assign(1, ("digits", 2, sha(model_packages, "digits:2")), shadow=True))
    done = h.wait_state("digits", MODEL_STATE_READY)
    assert done.role == MODEL_ROLE_SHADOW and h.last().converged  # type: ignore[union-attr]
    assert h.repository.running("digits")[0] == 1  # type: ignore[index]
    assert h.repository.model("digits", "2").version == 2


# -- failures: reported, retried, never absorbing ---------------------------------------------------------------


def test_a_failing_download_is_reported_with_its_reason_and_retried_until_it_succeeds(
    harness: Callable[..., Harness], model_packages: dict[str, Path], artifacts: ScriptedArtifacts
) -> None:
    artifacts.faults.refuse = grpc.StatusCode.UNAVAILABLE
    h = harness()
    h.offer(assign(1, ("digits", 2, sha(model_packages, "digits:2"))))
    failed = h.wait_model(
        "digits", lambda m: m.state == MODEL_STATE_FAILED and m.attempts >= 2, "two failed attempts", 30
    )
    assert "refused by the test" in failed.reason and failed.next_attempt_at_ms > 0
    assert not failed.package_fault  # the link's failure: no rollout gate counts it against the candidate
    assert not h.last().converged and h.repository.running("digits")[0] == 1  # type: ignore[union-attr,index]
    artifacts.faults.refuse = None
    done = h.wait_state("digits", MODEL_STATE_ACTIVE)
    assert (done.attempts, done.next_attempt_at_ms, done.reason) == (0, 0, "")


def test_an_interrupted_download_resumes_from_its_offset(
    harness: Callable[..., Harness], model_packages: dict[str, Path], artifacts: ScriptedArtifacts
) -> None:
    size = (model_packages["digits:2"] / MODEL_FILE).stat().st_size
    artifacts.faults.cut_after = [size // 3, size // 3]
    h = harness()
    h.offer(assign(1, ("digits", 2, sha(model_packages, "digits:2"))))
    h.wait_state("digits", MODEL_STATE_ACTIVE)
    model_calls = [offset for _, _, file, offset in artifacts.requests if file == MODEL_FILE]
    assert model_calls[:3] == [0, size // 3, 2 * (size // 3)]


@pytest.mark.parametrize("attack", ["wrong-key", "expired", "rollback", "mismatch"])
def test_an_untrustworthy_package_is_refused_with_its_reason_and_the_old_version_keeps_serving(
    harness: Callable[..., Harness],
    model_packages: dict[str, Path],
    artifacts: ScriptedArtifacts,
    signer: Signer,
    attack: str,
) -> None:
    manifest, files = package_files(model_packages["digits:2"])
    pinned = sha(model_packages, "digits:2")
    h = harness()
    if attack == "wrong-key":
        artifacts.add("digits", 2, Signer().sign(manifest), files)
    elif attack == "expired":
        artifacts.add("digits", 2, signer.sign(manifest, expires_at_ms=1_700_000_000_001), files)
    elif attack == "rollback":
        h.trust.remember(h.trust.check(signer.sign(manifest, serial=50), "digits", 2, pinned, 1_700_000_000_000))  # type: ignore[union-attr]
        artifacts.add("digits", 2, signer.sign(manifest, serial=49), files)
    else:
        pinned = "0" * 64  # the assignment names other content than the signed manifest
    h.offer(assign(1, ("digits", 2, pinned)))
    failed = h.wait_model("digits", lambda m: m.state == MODEL_STATE_FAILED, "the refusal", 30)
    assert failed.reason.startswith(attack), failed.reason
    assert failed.package_fault  # the package's own: a rollout's apply-failure gate counts it
    assert h.repository.running("digits")[0] == 1  # type: ignore[index]
    assert h.repository.store.versions("digits") == [1]
    # Retried (the registry may fix the cause), never absorbing.
    h.wait_model("digits", lambda m: m.attempts >= 2, "a retry", 10)


def test_without_a_signing_key_an_assignment_fails_saying_to_enroll(
    harness: Callable[..., Harness], model_packages: dict[str, Path]
) -> None:
    h = harness(key=False)
    h.offer(assign(1, ("digits", 2, sha(model_packages, "digits:2"))))
    failed = h.wait_model("digits", lambda m: m.state == MODEL_STATE_FAILED, "the refusal", 30)
    assert "no fleet signing key: enroll the device" in failed.reason


def test_a_stalled_download_times_out_and_a_newer_generation_supersedes_it_at_once(
    harness: Callable[..., Harness], model_packages: dict[str, Path], artifacts: ScriptedArtifacts
) -> None:
    artifacts.faults.stall_after = [1000] * 10
    h = harness(deadlines=Deadlines(download_stall_s=0.5))
    h.offer(assign(1, ("digits", 2, sha(model_packages, "digits:2"))))
    failed = h.wait_model("digits", lambda m: m.state == MODEL_STATE_FAILED, "the timeout", 30)
    assert failed.reason.startswith("timeout: the download of digits:2 made no progress")
    h.wait_model("digits", lambda m: m.state == MODEL_STATE_DOWNLOADING, "stuck again", 10)
    h.offer(assign(2, ("digits", 1, sha(model_packages, "digits:1"))))
    last = h.wait_report(lambda r: r.generation == 2 and r.converged, "generation 2 converged", 10)
    assert [(m.version, m.state) for m in last.models] == [(1, MODEL_STATE_ACTIVE)]
    part = h.config.data_dir / "downloads" / "digits" / "2" / f"{MODEL_FILE}.part"
    assert part.exists()  # kept for resume, should version 2 be wanted again


# -- bad desired states ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("state", "says"),
    [
        (DesiredState(device_id="cam-2", generation=5), "desired state for device 'cam-2' arrived at 'cam-1'"),
        (assign(5, ("digits", 2, ""), ("digits", 1, "")), "'digits' is assigned twice"),
        (assign(5, ("../etc", 2, "")), "models:"),
        (assign(5, ("digits", 2, "NOT-HEX")), "sha256 must be 64 lower-case hex digits"),
        (assign(5, policy='{"inference": {"max_batch_sze": 8}}'), "inference.max_batch_sze"),
        (DesiredState(device_id=DEVICE, generation=5, models=[ModelAssignment(name="digits", version=2)]), "no role"),
    ],
    ids=["other-device", "twice", "bad-name", "bad-sha", "bad-policy", "no-role"],
)
def test_a_bad_desired_state_is_refused_and_reported_and_changes_nothing(
    harness: Callable[..., Harness], model_packages: dict[str, Path], state: DesiredState, says: str
) -> None:
    h = harness()
    h.offer(assign(1, ("digits", 1, sha(model_packages, "digits:1"))))
    h.wait_report(lambda r: r.converged, "generation 1 converged", 30)
    h.offer(state)
    refused = h.wait_report(lambda r: bool(r.error), "the refusal", 10)
    assert says in refused.error and refused.generation == 1
    assert DesiredStore(h.config.data_dir).load().generation == 1  # type: ignore[union-attr]
    assert h.applied == [""]


def test_reports_are_throttled_and_the_latest_wins(
    harness: Callable[..., Harness], model_packages: dict[str, Path]
) -> None:
    h = harness()
    for generation in range(1, 30):
        h.offer(assign(generation, policy=f'{{"upload": {{"sample_rate": {generation / 100}}}}}'))
    last = h.wait_report(lambda r: r.generation == 29, "the last generation reported", 10)
    assert last.converged and len(h.reports) <= 8


def test_backoff_doubles_from_one_second_to_five_minutes_jittered() -> None:
    delays = [backoff_delay(n) for n in range(1, 16)]
    assert 0.5 <= delays[0] <= 1.0 and 1.0 <= delays[1] <= 2.0
    assert all(150 <= d <= 300 for d in delays[10:])
