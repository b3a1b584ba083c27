"""Convergence on the device: from the newest desired state to models that serve it, and the reported state.

`Converger` takes each DesiredState the control transport delivers (or the one persisted before a restart),
applies its policy at once, and converges every model it names: download (resumable) -> verify -> build
(install, load, warm up) -> READY -> ACTIVE (the repository's atomic switch). Every step has a deadline; a
failure is reported FAILED with its reason and retried with backoff, forever: there is no failed state that
only a restart clears. A newer generation cancels the work of the one it supersedes at once (a partial
download of a version still wanted stays for resume). Models the desired state does not name are left alone.

Not how bytes travel or what makes a manifest trustworthy (edge_runtime/control/fetch.py, trust.py), nor how
a version loads or switches (edge_runtime/models/repository.py), nor the pure pieces it reports and decides with
(edge_runtime/control/progress.py): this module only sequences them.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import structlog

from edge_runtime.control.progress import (
    SLOWEST_ATTEMPT,
    Deadlines,
    ModelProgress,
    assignments,
    backoff_delay,
    failure_reason,
    package_fault,
    repository_status,
    same_version,
)
from edge_runtime.errors import (
    ConfigError,
    EdgeRuntimeError,
    ModelNotFound,
    StepTimeout,
    VerificationFailed,
)
from edge_runtime.models.repository import ModelRepository
from edgefleet.proto.edgefleet.v1 import state_pb2

__all__ = [
    "Converger",
    "Deadlines",
    "DesiredPersistence",
    "Fetch",
    "ModelProgress",
    "StepTimeout",
    "backoff_delay",
    "package_fault",
    "repository_status",
]

log = structlog.get_logger(__name__)
T = TypeVar("T")

# Reported states go out at most this often (the latest wins; the transports keep only the newest anyway).
REPORT_INTERVAL_S = 0.25

_ACTIVE = state_pb2.MODEL_ROLE_ACTIVE
_SHADOW = state_pb2.MODEL_ROLE_SHADOW


class Fetch(Protocol):
    """Download and verify one model version's package; returns the directory holding it, complete.

    `on_progress(fraction)` while bytes arrive (0..1), `on_phase(state)` with MODEL_STATE_DOWNLOADING, then
    MODEL_STATE_VERIFYING once they all did (edge_runtime/control/fetch.py's fetch_package, bound). Raises
    VerificationFailed (with its reason word) for a package that must not be trusted, EdgeRuntimeError or
    OSError for anything else; both are retried by the converger.
    """

    def __call__(
        self,
        name: str,
        version: int,
        sha256: str,
        on_progress: Callable[[float], None],
        on_phase: Callable[[int], None],
    ) -> Awaitable[Path]: ...


class DesiredPersistence(Protocol):
    """Where the last accepted desired state survives a restart (edge_runtime/control/desired_store.py)."""

    def save(self, state: state_pb2.DesiredState) -> None: ...

    def load(self) -> state_pb2.DesiredState | None: ...


@dataclass
class _Accepted:
    state: state_pb2.DesiredState
    # (name, role) -> progress: a model has at most one ACTIVE and one SHADOW assignment.
    models: dict[tuple[str, int], ModelProgress] = field(default_factory=dict)
    tasks: list[asyncio.Future[None]] = field(default_factory=list)


class Converger:
    """Converges the device to its newest desired state; every method runs on the agent's loop.

    `accept_policy(state)` validates the state's policy (raises ConfigError, changing nothing) and returns a
    callable that applies it; `fetch` is None when this device cannot download (no cloud-sync configured, or
    no fleet signing key: then `no_fetch_reason` is reported). `loader` runs what touches the serving side
    (the "is it running" check and the switch) in order, behind the agent's own model loads; `builder` runs
    installs and engine builds, so a long build never holds up a policy change. `publish` sends a
    ReportedState (the transport keeps only the newest).
    """

    def __init__(
        self,
        *,
        device_id: str,
        repository: ModelRepository,
        persistence: DesiredPersistence | None,
        accept_policy: Callable[[state_pb2.DesiredState], Awaitable[Callable[[], Awaitable[Any]]]],
        publish: Callable[[state_pb2.ReportedState], None],
        loader: Executor,
        builder: Executor,
        fetch: Fetch | None,
        no_fetch_reason: str = "",
        agent_info: state_pb2.AgentInfo | None = None,
        deadlines: Deadlines | None = None,
        backoff: Callable[[int], float] = backoff_delay,
    ) -> None:
        self.device_id = device_id
        self.repository = repository
        self.persistence = persistence
        self.accept_policy = accept_policy
        self.publish = publish
        self.loader, self.builder = loader, builder
        self.fetch = fetch
        self.no_fetch_reason = no_fetch_reason or "this device has no way to download models"
        self.agent_info = agent_info
        self.deadlines = deadlines or Deadlines()
        self.backoff = backoff
        self.error = ""  # why the newest desired state was refused ("" once a newer one is accepted)
        self._accepted: _Accepted | None = None
        self._pending: state_pb2.DesiredState | None = None
        self._restored = False  # the pending state is the persisted one: accepting it needs no save
        self._wake: asyncio.Event | None = None
        self._runner: asyncio.Future[None] | None = None
        self._report_at = 0.0  # loop time of the last report
        self._report_handle: asyncio.TimerHandle | None = None

    # -- state ------------------------------------------------------------------------------------------------

    @property
    def generation(self) -> int:
        """The generation of the desired state accepted (0: none yet)."""
        return self._accepted.state.generation if self._accepted else 0

    @property
    def policy_hash(self) -> str:
        return self._accepted.state.policy_hash if self._accepted else ""

    def progress(self) -> list[ModelProgress]:
        return list(self._accepted.models.values()) if self._accepted else []

    @property
    def converged(self) -> bool:
        return self._accepted is not None and all(p.done for p in self._accepted.models.values())

    # -- lifecycle --------------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Take the persisted desired state (if any) as accepted, then follow what `offer` brings.

        Call once the agent loaded its active models (or queued that load on `loader`): a model that already
        runs the assigned version is found running and is neither downloaded nor reloaded.
        """
        self._wake = asyncio.Event()
        persisted = await asyncio.to_thread(self.persistence.load) if self.persistence else None
        if persisted is not None and persisted.device_id != self.device_id:
            log.warning("control.persisted_ignored", device_id=persisted.device_id[:128], reason="another device's")
            persisted = None
        if persisted is not None and (self._pending is None or self._pending.generation <= persisted.generation):
            self._pending = persisted
            self._restored = True
        self._runner = asyncio.ensure_future(self._run())
        if self._pending is not None:
            self._wake.set()

    async def aclose(self) -> None:
        """Stop converging (work in progress is cancelled; partial downloads stay for the next start)."""
        if self._report_handle is not None:
            self._report_handle.cancel()
            self._report_handle = None
        tasks = [self._runner] if self._runner else []
        if self._accepted:
            tasks += self._accepted.tasks
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def offer(self, state: state_pb2.DesiredState) -> None:
        """A desired state arrived (on the loop). Another device's is refused and reported; one no newer than
        what is accepted (the retained copy on every connect) is ignored; otherwise the newest waiting wins."""
        if state.device_id != self.device_id:
            # A broker ACL that lets another device's state through: refuse it, say so, change nothing.
            reason = f"desired state for device {state.device_id[:128]!r} arrived at {self.device_id!r}"
            log.error("control.desired_refused", generation=state.generation, reason=reason)
            self.error = reason
            self.changed()
            return
        newest = max(self.generation, self._pending.generation if self._pending else 0)
        if state.generation <= newest:
            if state.generation == self.generation:
                # The cloud sends the state again when our report of it never arrived (a lost message, a
                # broker restarted without persistence): answer with what we have, or it waits forever.
                self.changed()
            return
        self._pending, self._restored = state, False
        if self._wake is not None:
            self._wake.set()

    # -- the runner: one desired state at a time ----------------------------------------------------------------

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            state, self._pending = self._pending, None
            if state is None or state.generation <= self.generation:
                continue
            restored, self._restored = self._restored, False
            try:
                await self._accept(state, persist=not restored)
            except Exception:  # never let one state end the runner: log it, report it, wait for the next
                log.exception("control.desired_failed", generation=state.generation)
                self.error = f"generation {state.generation}: internal error while accepting it (see the agent log)"
                self.changed()

    async def _accept(self, state: state_pb2.DesiredState, *, persist: bool) -> None:
        try:
            apply = await self.accept_policy(state)
            refs = assignments(state)
        except ConfigError as exc:
            log.error("control.desired_refused", generation=state.generation, reason=str(exc))
            self.error = f"generation {state.generation} refused: {exc}"
            self.changed()
            return
        if persist and self.persistence is not None:
            # Persisted before anything acts on it: a restart converges to it even with the cloud unreachable.
            await asyncio.to_thread(self.persistence.save, state)
        previous = self._accepted
        if previous is not None:
            for task in previous.tasks:
                task.cancel()
            await asyncio.gather(*previous.tasks, return_exceptions=True)
        accepted = _Accepted(state)
        for ref in refs:
            key = (ref.name, ref.role)
            kept = previous.models.get(key) if previous else None
            if kept is not None and (kept.version, kept.sha256) == (ref.version, ref.sha256):
                kept.shadow_sample_rate = ref.shadow_sample_rate
                accepted.models[key] = kept  # the same assignment: its attempts and state carry over
            else:
                accepted.models[key] = ref
        self._accepted = accepted
        await self._clear_shadows(accepted)
        self.error = ""
        await apply()
        log.info("control.desired_applied", generation=state.generation, models=len(state.models))
        for progress in accepted.models.values():
            accepted.tasks.append(asyncio.ensure_future(self._converge_model(progress)))
        self.changed()

    # -- one model ----------------------------------------------------------------------------------------------

    async def _converge_model(self, p: ModelProgress) -> None:
        """Attempt until done; every failure is reported and retried after a backoff, forever."""
        while True:
            try:
                await self._attempt(p)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                p.attempts += 1
                # A refusal a person must fix (revoked, not assigned: DownloadFailed.retryable False) is still
                # retried, at the slowest pace; a newer desired state retries at once anyway.
                delay = self.backoff(p.attempts if getattr(exc, "retryable", True) else SLOWEST_ATTEMPT)
                p.state, p.reason = state_pb2.MODEL_STATE_FAILED, failure_reason(exc)
                p.package_fault = package_fault(exc)
                p.next_attempt_at_ms = time.time_ns() // 1_000_000 + int(delay * 1000)
                log.warning(
                    "model.converge_failed",
                    model=p.name,
                    version=p.version,
                    reason=p.reason,
                    attempts=p.attempts,
                    retry_in_s=round(delay, 3),
                )
                self.changed()
                await asyncio.sleep(delay)
                continue  # still FAILED, its next attempt due, until the attempt moves it on (_set)
            p.attempts, p.next_attempt_at_ms, p.package_fault = 0, 0, False
            self.changed()
            await self._unload_leftovers(p)
            return

    async def _clear_shadows(self, accepted: _Accepted) -> None:
        """Stop mirroring to shadow versions the accepted state no longer names (a later step unloads them)."""
        wanted = {p.name: p.version for p in accepted.models.values() if p.role == _SHADOW}
        loop = asyncio.get_running_loop()
        for name in {s.name for s in self.repository.status()}:
            shadow = self.repository.shadow_version(name)
            if shadow is not None and wanted.get(name) != shadow:
                await loop.run_in_executor(self.loader, self.repository.clear_shadow, name)

    async def _attempt(self, p: ModelProgress) -> None:
        loop = asyncio.get_running_loop()
        # On the loader thread, so it runs after every load or switch queued before it (the agent's start-up
        # load, a superseded generation's switch): what it sees is what serves.
        running = await loop.run_in_executor(self.loader, self.repository.running, p.name)
        if p.role == _ACTIVE and running is not None and same_version(running, p.version, p.sha256):
            self._set(p, state_pb2.MODEL_STATE_ACTIVE, reason="", backend=self._backend(p))
            return
        installed = await loop.run_in_executor(self.loader, self._installed_sha256, p.name, p.version)
        if installed is not None and p.sha256 and installed != p.sha256:
            raise VerificationFailed(
                f"mismatch: {p.name}:{p.version} is installed with sha256 {installed[:12]}… but the desired state "
                f"names {p.sha256[:12]}…; a version number is never reused for other content"
            )
        source: Path | None = None
        if p.role == _SHADOW and installed is not None and p.version in self.repository.loaded_versions(p.name):
            await self._shadow(p)  # already built (a new rate, a restarted attempt): mirror at the new rate
            return
        if installed is None:
            source = await self._download(p)
        self._set(p, state_pb2.MODEL_STATE_BUILDING, progress=0.0)
        await self._step(self.builder, self.deadlines.build_s, "build", p, self._build, p, source)
        if p.role == _SHADOW:
            await self._shadow(p)
            return
        self._set(p, state_pb2.MODEL_STATE_READY, reason="", backend=self._backend(p), progress=1.0)
        await self._step(
            self.loader, self.deadlines.activate_s, "switch", p, self.repository.activate, p.name, p.version
        )
        self._set(p, state_pb2.MODEL_STATE_ACTIVE, reason="", backend=self._backend(p))
        log.info("model.converged", model=p.name, version=p.version)

    async def _shadow(self, p: ModelProgress) -> None:
        """A built SHADOW version: mirror its model's requests to it at the assigned rate, then report READY."""
        await self._step(
            self.loader,
            self.deadlines.activate_s,
            "shadow set-up",
            p,
            self.repository.set_shadow,
            p.name,
            p.version,
            p.shadow_sample_rate,
        )
        self._set(p, state_pb2.MODEL_STATE_READY, reason="", backend=self._backend(p), progress=1.0)
        log.info("model.shadowing", model=p.name, version=p.version, sample_rate=p.shadow_sample_rate)

    async def _download(self, p: ModelProgress) -> Path:
        if self.fetch is None:
            raise EdgeRuntimeError(self.no_fetch_reason)
        loop = asyncio.get_running_loop()
        self._set(p, state_pb2.MODEL_STATE_DOWNLOADING, progress=0.0)
        last_progress = loop.time()
        verifying_since: float | None = None

        def on_progress(fraction: float) -> None:
            nonlocal last_progress
            last_progress = loop.time()
            p.progress = min(max(float(fraction), 0.0), 1.0)
            self.changed()

        def on_phase(phase: int) -> None:
            nonlocal verifying_since
            if phase == state_pb2.MODEL_STATE_VERIFYING and verifying_since is None:
                verifying_since = loop.time()
                self._set(p, state_pb2.MODEL_STATE_VERIFYING)

        task = asyncio.ensure_future(self.fetch(p.name, p.version, p.sha256, on_progress, on_phase))
        try:
            while True:
                if verifying_since is None:
                    limit, what = last_progress + self.deadlines.download_stall_s, "made no progress"
                    seconds = self.deadlines.download_stall_s
                else:
                    limit, what = verifying_since + self.deadlines.verify_s, "took longer than"
                    seconds = self.deadlines.verify_s
                timeout = limit - loop.time()
                if timeout <= 0:
                    step = "download" if verifying_since is None else "verification"
                    raise StepTimeout(f"timeout: the {step} of {p.name}:{p.version} {what} {seconds:g} s", step)
                done, _ = await asyncio.wait({task}, timeout=timeout)
                if done:
                    return task.result()
        finally:
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    async def _step(
        self, executor: Executor, seconds: float, what: str, p: ModelProgress, fn: Callable[..., T], *args: Any
    ) -> T:
        """`fn(*args)` on `executor`, within `seconds`. A thread cannot be stopped: past the deadline the step is
        reported and retried, and the late work finishes (or fails) behind it on the same thread."""
        future = asyncio.get_running_loop().run_in_executor(executor, fn, *args)
        try:
            return await asyncio.wait_for(asyncio.shield(future), seconds)
        except asyncio.TimeoutError:
            raise StepTimeout(
                f"timeout: the {what} of {p.name}:{p.version} took longer than {seconds:g} s", what
            ) from None

    def _build(self, p: ModelProgress, source: Path | None) -> None:
        """BUILDING, on the builder thread: install what was downloaded (verified again, landed atomically),
        then load and warm it up without switching."""
        if source is not None:
            package = self.repository.store.install(source)
            if p.sha256 and package.manifest.sha256 != p.sha256:
                raise VerificationFailed(
                    f"mismatch: the package of {p.name}:{p.version} has sha256 {package.manifest.sha256[:12]}… but "
                    f"the desired state names {p.sha256[:12]}…"
                )
            # Landed in the store (copied, verified, renamed): the download is no longer needed.
            shutil.rmtree(source, ignore_errors=True)
        self.repository.prepare(p.name, p.version)

    def _installed_sha256(self, name: str, version: int) -> str | None:
        try:
            return self.repository.store.package(name, version, verify=False).manifest.sha256
        except ModelNotFound:
            return None

    async def _unload_leftovers(self, p: ModelProgress) -> None:
        """Once an assignment is done: unload versions of its model that a superseded state had built and that
        neither serve nor are assigned."""
        if p.role == _SHADOW:
            return
        loop = asyncio.get_running_loop()
        wanted = {m.version for m in self.progress() if m.name == p.name}
        for version in self.repository.loaded_versions(p.name):
            if version not in wanted and version != self.repository.active_version(p.name):
                with contextlib.suppress(EdgeRuntimeError):
                    await loop.run_in_executor(self.loader, self.repository.unload, p.name, version)
        # On disk: the active version, its rollback target and what is assigned stay; older ones go.
        with contextlib.suppress(EdgeRuntimeError, OSError):
            await loop.run_in_executor(self.loader, self.repository.store.prune, p.name, wanted)

    def _backend(self, p: ModelProgress) -> str:
        for status in self.repository.status():
            if (status.name, status.version) == (p.name, p.version):
                return status.backend
        return ""

    def _set(self, p: ModelProgress, state: int, **fields: Any) -> None:
        p.state = state
        for key, value in fields.items():
            setattr(p, key, value)
        if state != state_pb2.MODEL_STATE_FAILED:
            # A FAILED model always says when it is tried again; once the retry moves it on, there is none.
            p.next_attempt_at_ms = 0
            if "reason" not in fields and p.reason:
                p.reason = ""
        self.changed()

    # -- reporting ----------------------------------------------------------------------------------------------

    def changed(self) -> None:
        """Something reportable changed: publish now, or at most REPORT_INTERVAL_S after the last report (the
        state is built when it goes, so the latest wins)."""
        if self._report_handle is not None:
            return
        loop = asyncio.get_running_loop()
        wait = self._report_at + REPORT_INTERVAL_S - loop.time()
        if wait <= 0:
            self._publish()
        else:
            self._report_handle = loop.call_later(wait, self._publish)

    def _publish(self) -> None:
        self._report_handle = None
        self._report_at = asyncio.get_running_loop().time()
        self.publish(self.reported())

    def reported(self) -> state_pb2.ReportedState:
        """The device's reported state now: each assignment's progress, and the other loaded models as they are."""
        progress = self.progress()
        assigned = {p.name for p in progress}
        statuses = self.repository.status()
        models = [p.to_proto() for p in progress]
        # A loaded version's precision (from its manifest's lineage or its ONNX), whatever its progress says.
        precision = {(s.name, s.version): s.precision for s in statuses}
        for m in models:
            m.precision = precision.get((m.name, m.version), "")
        models += [repository_status(s) for s in statuses if s.name not in assigned]
        return state_pb2.ReportedState(
            device_id=self.device_id,
            generation=self.generation,
            models=models,
            policy_hash=self.policy_hash,
            agent=self.agent_info,
            reported_at_ms=time.time_ns() // 1_000_000,
            error=self.error,
            converged=self.generation > 0 and self.converged,
        )
