"""The model repository: which versions are loaded and active, and the in-process inference API.

Apps embed it directly (`ModelRepository.open(config).infer(...)`); the agent's gRPC server calls the same
methods, so both paths have the same semantics. A version becomes active only after it loaded, matched its
manifest and passed warm-up (READY); the pointer on disk switches first, and requests already queued on the
old version finish there. At start, an active version that fails to load gives way to the previous one,
and the status, the log and the outbox's events say so.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import structlog

from edge_runtime.batching.batcher import Outcome
from edge_runtime.config import AgentConfig, InferencePolicy
from edge_runtime.errors import EdgeRuntimeError, InvalidInput, ModelNotFound, ModelNotReady, ShuttingDown
from edge_runtime.inference import keeping
from edge_runtime.inference.hard import HardExamples
from edge_runtime.inference.types import InferRequest, InferResponse
from edge_runtime.models.package import ModelPackage
from edge_runtime.models.served import LoadContext, ModelState, ServedModel
from edge_runtime.models.shadow import ShadowCounts, ShadowMirror, check_sample_rate
from edge_runtime.models.store import ActivePointer, ModelStore
from edge_runtime.observability.metrics import AgentMetrics

__all__ = ["ModelRepository", "ModelStatus"]

log = structlog.get_logger(__name__)

# Longest an answer waits for its kept result to be committed before it goes out marked not kept.
KEEP_WAIT_S = 30.0


class ModelStatus:
    """A model version's state as reported: LOADING, READY (and whether active) or FAILED with a reason.

    A READY version's reason says what an operator should know about how it serves: an engine fallback,
    warm-up sizes that were guessed, or that it serves because the version meant to be active failed.
    """

    def __init__(
        self,
        name: str,
        version: int,
        state: ModelState,
        reason: str = "",
        active: bool = False,
        backend: str = "",
        precision: str = "",
    ) -> None:
        self.name, self.version, self.state = name, version, state
        self.reason, self.active, self.backend = reason, active, backend
        self.precision = precision  # "fp32", "fp16", "int8" of a loaded version; "" unknown

    def __repr__(self) -> str:
        return f"ModelStatus({self.name}:{self.version} {self.state.value}{' active' if self.active else ''})"


class ModelRepository:
    def __init__(
        self,
        config: AgentConfig,
        metrics: AgentMetrics | None = None,
        keeper: keeping.Keeper | None = None,
        hard: HardExamples | None = None,
    ) -> None:
        self.config = config
        self.keeper = keeper
        self.hard = hard  # hard examples (samples policy section), shared by every version
        self.metrics = metrics or AgentMetrics()
        self.store = ModelStore(config.data_dir / "models")
        self._policy = config.inference
        self._served: dict[str, dict[int, ServedModel]] = {}
        # The version that answers requests naming none (the active one, or the fallback serving for it).
        self._active: dict[str, int] = {}
        self._status: dict[tuple[str, int], ModelStatus] = {}
        # Models that should be served, and the version asked to be active (loaded or not).
        self._wanted: dict[str, int] = {}
        # Model name -> the mirror to its shadow version (a loaded version that is not the active one).
        self._shadows: dict[str, ShadowMirror] = {}
        self._switch = threading.RLock()  # one load/activate at a time
        self._closed = False
        # Set by expect_load() until load_active() has run: the store's models are wanted before they are known.
        self._load_pending = False
        # The inference server's event loop: models whose batches are cheaper than a thread hop run on it.
        self._loop: asyncio.AbstractEventLoop | None = None

    def attach_loop(self, loop: asyncio.AbstractEventLoop | None) -> None:
        """The event loop the inference servers answer on (None: none). A model whose planned batch takes less
        than policy.ON_LOOP_LIMIT_S runs its batches there instead of on an engine thread."""
        with self._switch:
            self._loop = loop
            for served in self.models():
                served.batcher.attach_loop(loop)

    @classmethod
    def open(cls, config: AgentConfig, metrics: AgentMetrics | None = None) -> ModelRepository:
        """A repository serving every model that is active in the store (failures are recorded, not raised)."""
        repo = cls(config, metrics)
        repo.load_active()
        return repo

    # -- lifecycle --------------------------------------------------------------------------------------

    def expect_load(self) -> None:
        """The agent will call load_active soon (off the loop): until it has, ServerReady (strict) is false.

        Without it, a server listening before the store was read would answer ready with nothing loaded:
        every model is wanted only once load_active has read the store."""
        self._load_pending = True

    def load_active(self) -> list[ModelStatus]:
        """Load each model's active version; one that fails gives way to the previous version, if it loads."""
        try:
            self._load_active()
        finally:
            self._load_pending = False
        return self.status()

    def _load_active(self) -> None:
        for name in self.store.names():
            try:
                pointer = self.store.active(name)
            except EdgeRuntimeError as exc:
                log.error("model.load_failed", model=name, reason=str(exc))
                continue
            if pointer is None:
                continue
            try:
                self.activate(name, pointer.version)
            except EdgeRuntimeError as exc:
                self._fall_back(name, pointer, str(exc))

    def install(self, source: Path, *, activate: bool = True) -> ModelPackage:
        """Install a package directory into the store (verified) and, by default, make it active.

        Activation loads, checks and warms the version up first: a package that fails stays inactive and
        the error says why.
        """
        package = self.store.install(source)
        if activate:
            self.activate(package.manifest.name, package.manifest.version)
        return package

    def activate(self, name: str, version: int) -> ServedModel:
        """Load `version` (unless loaded), and switch to it once READY; the old version drains and unloads."""
        with self._switch:
            self._check_open()
            self._wanted[name] = version
            served = self._served.get(name, {}).get(version) or self._load(name, version)
            self.store.set_active(name, version)
            old = self._serve(served)
            log.info("model.activated", model=name, version=version, previous=old)
            if old != version:  # loading what is active again (a second load_active) is no news
                self._event("model.activated", name, version, previous=old)
            return served

    def prepare(self, name: str, version: int) -> ServedModel:
        """Load, check and warm up an installed `version` without switching to it (a converging device's
        BUILDING step): until `activate` switches to it, it answers only requests that name its version.

        The load runs outside the switch lock, so a live policy change or a switch of another model does not
        wait for an engine build; the version is registered under the lock (the current policy applied).
        """
        with self._switch:
            self._check_open()
            served = self._served.get(name, {}).get(version)
            if served is not None:
                return served
            ctx = self._load_context()
        built = self._build(name, version, ctx)
        with self._switch:
            raced = self._served.get(name, {}).get(version)
            if self._closed or raced is not None:
                built.close(0)
                self._check_open()
                assert raced is not None
                return raced
            if self._policy != ctx.policy:
                built.apply_policy(self._policy)
            if self._loop is not ctx.loop:  # the servers started or stopped while it was built
                built.batcher.attach_loop(self._loop)
            self._served.setdefault(name, {})[version] = built
            self._set_status(_ready_status(built, active=False))
            return built

    def running(self, name: str) -> tuple[int, str] | None:
        """(version, sha256 of its ONNX file) of the version answering `name`'s requests, if one does."""
        with self._switch:
            version = self._active.get(name)
            served = self._served.get(name, {}).get(version) if version is not None else None
            return None if served is None else (served.version, served.manifest.sha256)

    def loaded_versions(self, name: str) -> list[int]:
        return sorted(self._served.get(name, {}))

    def unload(self, name: str, version: int) -> None:
        """Unload a loaded version that is not answering `name`'s requests (a build a newer desired state
        superseded); queued requests naming it finish first. Refused for the active version."""
        with self._switch:
            if self._active.get(name) == version:
                raise EdgeRuntimeError(f"{name}:{version} is the active version; switch to another one first")
            self._retire(name, version)

    def rollback(self, name: str) -> ServedModel:
        """Return `name` to the version that was active before the current one."""
        pointer = self.store.active(name)
        if pointer is None or pointer.previous is None:
            raise ModelNotFound(f"model {name} has no previous version to roll back to")
        return self.activate(name, pointer.previous)

    def set_shadow(self, name: str, version: int, sample_rate: float) -> ShadowCounts:
        """Mirror `sample_rate` (0..1) of the requests `name`'s active version answers to loaded `version`
        and compare the answers; setting the same version again changes the rate and keeps the counts.

        Refused (InvalidInput) for a rate outside 0..1 or the active version; ModelNotFound / ModelNotReady
        when `version` is not loaded; PackageError for a bad `extra.shadow_tolerance` in its manifest.
        """
        rate = check_sample_rate(sample_rate)
        with self._switch:
            self._check_open()
            served = self.model(name, str(version))
            if self._active.get(name) == version:
                raise InvalidInput(f"{name}:{version} is the active version; a version cannot shadow itself")
            mirror = self._shadows.get(name)
            if mirror is not None and mirror.shadow is served:
                mirror.set_rate(rate)
            else:
                if mirror is not None:
                    mirror.close()
                mirror = self._shadows[name] = ShadowMirror(served, rate)
                log.info("model.shadow_set", model=name, version=version, sample_rate=rate, rule=mirror.comparator.rule)
            return mirror.counts()

    def clear_shadow(self, name: str) -> ShadowCounts | None:
        """Stop mirroring `name`'s requests (its shadow version stays loaded); its final counts, if one was set."""
        with self._switch:
            mirror = self._shadows.pop(name, None)
        if mirror is None:
            return None
        mirror.close()
        counts = mirror.counts()
        log.info(
            "model.shadow_cleared",
            model=name,
            version=counts.version,
            compared=counts.compared,
            agreed=counts.agreed,
            dropped=counts.dropped,
        )
        return counts

    def shadow_version(self, name: str) -> int | None:
        mirror = self._shadows.get(name)
        return None if mirror is None else mirror.version

    def shadow_counts(self) -> dict[tuple[str, int], tuple[object, ShadowCounts]]:
        """(name, shadow version) -> (the mirror, as the identity of its counters; its cumulative counts).

        Sends each shadow's gathered mirrors first, so none wait past the next read (telemetry's interval)."""
        mirrors = list(self._shadows.items())
        for _, mirror in mirrors:
            mirror.flush()
        return {(name, m.version): (m, m.counts()) for name, m in mirrors}

    def apply_policy(self, policy: InferencePolicy) -> None:
        """Apply a new inference policy to every loaded version live, without dropping a request."""
        with self._switch:
            self._policy = policy
            for versions in self._served.values():
                for served in versions.values():
                    served.apply_policy(policy)
            log.info("policy.applied", section="inference")

    def close(self, timeout: float = 10.0) -> None:
        """Finish what is queued (up to `timeout`) and unload everything."""
        with self._switch:
            self._closed = True
            served = [s for versions in self._served.values() for s in versions.values()]
            for mirror in self._shadows.values():
                mirror.close()
            self._shadows.clear()
            self._served.clear()
            self._active.clear()
        for s in served:
            s.close(timeout)

    # -- serving ----------------------------------------------------------------------------------------

    def infer(self, request: InferRequest) -> InferResponse:
        """Run one request to completion on the caller's thread (or wait for an engine worker)."""
        served = self.model(request.model_name, request.model_version)
        try:
            prepared = served.prepare(request)
            response = served.batcher.run(prepared)
        except ShuttingDown:
            served = self._replacement(served, request)
            prepared = served.prepare(request)
            response = served.batcher.run(prepared)
        mirror = self._mirror_for(served)
        if mirror is not None:
            mirror.offer(request, response, served.hard, prepared.keep == keeping.SAMPLE)
        if response.kept is None:
            return response
        try:
            response.kept.result(timeout=KEEP_WAIT_S)
        except (EdgeRuntimeError, concurrent.futures.TimeoutError) as exc:
            return keeping.settle_kept(response, exc)
        return keeping.settle_kept(response, None)

    def submit(self, request: InferRequest) -> tuple[ServedModel, Future[InferResponse]]:
        """Validate and queue; raises at once for a bad or unservable request. Await the future for the result."""
        served, future = self._submit(request, awaitable=False)
        assert isinstance(future, Future)
        return served, future

    def submit_awaitable(self, request: InferRequest) -> tuple[ServedModel, Outcome[InferResponse]]:
        """`submit` for a caller on the inference servers' loop: the result may be an asyncio future there."""
        return self._submit(request, awaitable=True)

    def _submit(self, request: InferRequest, awaitable: bool) -> tuple[ServedModel, Outcome[InferResponse]]:
        served = self.model(request.model_name, request.model_version)
        try:
            prepared = served.prepare(request)
            future = served.batcher.submit_awaitable(prepared) if awaitable else served.batcher.submit(prepared)
        except ShuttingDown:
            served = self._replacement(served, request)
            prepared = served.prepare(request)
            future = served.batcher.submit_awaitable(prepared) if awaitable else served.batcher.submit(prepared)
        mirror = self._mirror_for(served)
        if mirror is not None:  # once answered, on the engine thread that answered it
            source, kept = served.hard, prepared.keep == keeping.SAMPLE
            future.add_done_callback(lambda f: mirror.offer_future(request, f, source, kept))
        return served, future

    def model(self, name: str, version: str = "") -> ServedModel:
        """The loaded version a request names ("" = active); ModelNotFound / ModelNotReady otherwise.

        ModelNotReady (UNAVAILABLE) carries the reason when the version is loading or failed to load.
        """
        self._check_open()
        versions = self._served.get(name)
        if version == "":
            active = self._active.get(name)
            if versions is not None and active is not None and active in versions:
                return versions[active]
            return self._missing(name, None)
        if not (version.isascii() and version.isdigit()) or len(version) > 10:
            raise InvalidInput(f"model version {version!r} is not a version: versions are positive integers")
        served = versions.get(int(version)) if versions else None
        return served if served is not None else self._missing(name, int(version))

    def models(self) -> list[ServedModel]:
        return [s for versions in list(self._served.values()) for s in list(versions.values())]

    def active_version(self, name: str) -> int | None:
        """The version answering requests that name none (the fallback, while the active one failed)."""
        return self._active.get(name)

    def status(self) -> list[ModelStatus]:
        return sorted(self._status.values(), key=lambda s: (s.name, s.version))

    def ready(self) -> bool:
        """ServerReady. Strict (the default, as Triton's): every model that should be served has a READY
        version serving it, and nothing is loading. Not strict: the repository is open; apps then judge each
        model by ModelReady."""
        if self._closed:
            return False
        if not self.config.server.strict_readiness:
            return True
        if self._load_pending:
            return False
        if any(s.state is ModelState.LOADING for s in list(self._status.values())):
            return False
        return all(self._active.get(name) in self._served.get(name, {}) for name in list(self._wanted))

    # -- internals --------------------------------------------------------------------------------------

    def _mirror_for(self, served: ServedModel) -> ShadowMirror | None:
        """The mirror to feed with what `served` answered: only the active version's answers are mirrored."""
        mirror = self._shadows.get(served.name)
        if mirror is None or self._active.get(served.name) != served.version:
            return None
        return mirror

    def _check_open(self) -> None:
        if self._closed:
            raise ShuttingDown("the model repository is closed")

    def _load(self, name: str, version: int) -> ServedModel:
        served = self._build(name, version, self._load_context())
        self._served.setdefault(name, {})[version] = served
        self._set_status(_ready_status(served, active=False))
        return served

    def _load_context(self) -> LoadContext:
        return LoadContext(
            engine=self.config.engine,
            policy=self._policy,
            max_request_bytes=self.config.server.max_request_bytes,
            cache_dir=self.config.data_dir / "cache",
            metrics=self.metrics,
            keeper=self.keeper,
            hard=self.hard,
            loop=self._loop,
        )

    def _build(self, name: str, version: int, ctx: LoadContext) -> ServedModel:
        """Load, check and warm up one version (status LOADING, then FAILED with the reason if it fails)."""
        self._set_status(ModelStatus(name, version, ModelState.LOADING))
        try:
            return ServedModel.load(self.store.package(name, version, verify=True), ctx)
        except EdgeRuntimeError as exc:
            self._set_status(ModelStatus(name, version, ModelState.FAILED, reason=str(exc)))
            log.error("model.failed", model=name, version=version, reason=str(exc))
            self._event("model.failed", name, version, reason=str(exc))
            raise

    def _serve(self, served: ServedModel, why: str = "") -> int | None:
        """Make `served` the version answering its model's requests; retire the one it replaces."""
        name, version = served.name, served.version
        old = self._active.get(name)
        self._active[name] = version
        mirror = self._shadows.get(name)
        if mirror is not None and mirror.version == version:  # promoted: it answers now, it shadows nothing
            self._shadows.pop(name).close()
        self._set_status(_ready_status(served, active=True, why=why))
        if old is not None and old != version:
            self._retire(name, old)
        return old

    def _fall_back(self, name: str, pointer: ActivePointer, reason: str) -> None:
        """At start: the active version failed to load; serve the previous one, without moving the pointer.

        The pointer stays: the next start tries the active version again (a GPU short of memory at boot is
        not a broken model), and the cloud or an operator decides about rolling back.
        """
        previous = pointer.previous
        if previous is None or previous not in self.store.versions(name):
            log.error(
                "model.unavailable", model=name, version=pointer.version, reason=reason, fallback="no previous version"
            )
            return
        why = f"active version {pointer.version} failed: {reason}; serving version {previous}"
        with self._switch:
            if self._closed:
                return
            try:
                served = self._served.get(name, {}).get(previous) or self._load(name, previous)
            except EdgeRuntimeError as exc:
                log.error("model.unavailable", model=name, version=pointer.version, reason=reason, fallback=str(exc))
                return
            self._serve(served, why)
        log.error("model.fallback", model=name, version=pointer.version, serving=previous, reason=reason)
        self._event("model.fallback", name, pointer.version, serving=previous, reason=reason)

    def _retire(self, name: str, version: int) -> None:
        mirror = self._shadows.get(name)
        if mirror is not None and mirror.version == version:
            self._shadows.pop(name).close()
        served = self._served.get(name, {}).pop(version, None)
        self._status.pop((name, version), None)
        if served is None:
            return
        # Close off the caller's thread: requests queued on the old version still finish there.
        threading.Thread(
            target=served.close,
            args=(self.config.agent.shutdown_grace_s,),
            name=f"retire-{name}-{version}",
            daemon=True,
        ).start()

    def _replacement(self, retired: ServedModel, request: InferRequest) -> ServedModel:
        """After a version switch raced the request: the version that replaced it, if the request allows."""
        served = self.model(request.model_name, request.model_version)
        if served is retired:
            raise ShuttingDown(f"{retired.name}:{retired.version} is shutting down")
        return served

    def _missing(self, name: str, version: int | None) -> ServedModel:
        if version is None:
            version = self._wanted.get(name)
        status = self._status.get((name, version)) if version is not None else None
        if status is not None and status.state is ModelState.LOADING:
            raise ModelNotReady(f"model {name} version {version} is loading; retry shortly")
        if status is not None and status.state is ModelState.FAILED:
            raise ModelNotReady(f"model {name} version {version} failed to load: {status.reason}")
        if name not in self._served and name not in self._wanted:
            known = sorted(self._served)
            raise ModelNotFound(f"unknown model {name!r}; this device serves {known or 'no models'}")
        loaded = sorted(self._served.get(name, {}))
        raise ModelNotFound(f"model {name!r} version {version} is not loaded (loaded: {loaded})")

    def _set_status(self, status: ModelStatus) -> None:
        self._status[(status.name, status.version)] = status

    def _event(self, event: str, name: str, version: int, **fields: Any) -> None:
        """Keep a model event in the outbox (priority 50), so the cloud learns of it even after a restart."""
        if self.keeper is not None:
            self.keeper.event(event, name, version, **fields)


def _ready_status(served: ServedModel, *, active: bool, why: str = "") -> ModelStatus:
    info = served.engine.info
    reason = "; ".join(part for part in (why, info.fallback_reason, *served.notes) if part)
    return ModelStatus(
        served.name,
        served.version,
        ModelState.READY,
        reason=reason,
        active=active,
        backend=info.description,
        precision=served.precision,
    )
