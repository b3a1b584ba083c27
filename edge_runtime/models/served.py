"""One loaded model version: engine, signature, warm-up, batch plan and batcher, from load to retirement."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from edge_runtime.batching.batcher import DynamicBatcher
from edge_runtime.batching.policy import BatchPlan, ProfilePoint, plan_batching
from edge_runtime.batching.profiler import ProfileCache, profile_engine
from edge_runtime.config import EngineSection, InferencePolicy
from edge_runtime.engines import Engine, load_engine
from edge_runtime.errors import EngineError, InvalidInput, Overloaded, PackageError
from edge_runtime.inference import keeping
from edge_runtime.inference.stats import ModelStats
from edge_runtime.inference.synthetic import example_inputs
from edge_runtime.inference.types import InferRequest, InferResponse, PreparedRequest
from edge_runtime.inference.validation import Signature
from edge_runtime.models.package import ModelManifest, ModelPackage
from edge_runtime.observability.metrics import AgentMetrics, ModelSample

__all__ = ["ModelState", "ServedModel", "check_engine_matches"]

log = structlog.get_logger(__name__)


class ModelState(enum.Enum):
    LOADING = "LOADING"
    READY = "READY"
    FAILED = "FAILED"


@dataclass(frozen=True)
class LoadContext:
    """What loading needs besides the package."""

    engine: EngineSection
    policy: InferencePolicy
    max_request_bytes: int
    cache_dir: Path
    metrics: AgentMetrics
    # Where kept results and samples go; None: nothing is kept (no outbox).
    keeper: keeping.Keeper | None = None


def check_engine_matches(manifest: ModelManifest, engine: Engine) -> None:
    """The ONNX file must have the inputs and outputs its manifest promises; PackageError says how not."""
    for kind, promised, actual in (
        ("input", manifest.inputs, engine.inputs),
        ("output", manifest.outputs, engine.outputs),
    ):
        have = {t.name: t for t in actual}
        if set(have) != {t.name for t in promised}:
            raise PackageError(
                f"{manifest.ref}: manifest {kind}s {sorted(t.name for t in promised)} do not "
                f"match the model's {sorted(have)}"
            )
        for spec in promised:
            real = have[spec.name]
            fits = len(real.shape) == len(spec.shape) and all(
                r == -1 or r == s for r, s in zip(real.shape, spec.shape, strict=True)
            )
            if real.datatype != spec.datatype or not fits:
                raise PackageError(
                    f"{manifest.ref}: {kind} {spec.name!r} is {real.datatype}{list(real.shape)} "
                    f"in the model, {spec.datatype}{list(spec.shape)} in the manifest"
                )


class ServedModel:
    """A model version that passed loading and warm-up; `batcher` serves it."""

    def __init__(self, package: ModelPackage, engine: Engine, ctx: LoadContext, profile: list[ProfilePoint]):
        m = package.manifest
        self.package = package
        self.manifest = m
        self.name, self.version = m.name, m.version
        self.version_str = str(m.version)
        self.engine = engine
        self.profile = profile
        self.loaded_at = time.time()
        self.signature = Signature(m.inputs, m.outputs, m.max_batch_size, ctx.max_request_bytes)
        self._output_names = [o.name for o in m.outputs]
        self._input_names = [i.name for i in m.inputs]
        self.stats = ModelStats()
        self._metrics = ctx.metrics
        self._keeper = ctx.keeper
        self.ready = True
        self.policy = ctx.policy
        self.batcher: DynamicBatcher[PreparedRequest, InferResponse] = DynamicBatcher(
            f"{m.name}:{m.version}",
            self._run_batch,
            self._plan(ctx.policy),
            instances=ctx.policy.instances,
            max_queue_depth=ctx.policy.max_queue_depth,
            observer=self.stats,
        )
        ctx.metrics.track(m.name, m.version, self.sample)

    @classmethod
    def load(cls, package: ModelPackage, ctx: LoadContext) -> ServedModel:
        """Load, check, warm up and profile; raises EdgeRuntimeError with the reason on any failure."""
        m = package.manifest
        started = time.monotonic()
        cap = min(ctx.policy.max_batch_size, m.max_batch_size) if m.max_batch_size else 1
        # Engines are built for the model's own limit, so a live policy can raise the batch without a rebuild.
        engine = load_engine(
            package,
            ctx.engine,
            ctx.cache_dir,
            max_batch_size=max(m.max_batch_size, 1),
            instances=ctx.policy.instances,
        )
        try:
            check_engine_matches(m, engine)
            _warm_up(m, engine, ctx.engine.warmup_inferences)
            profile = _profile(m, engine, ctx, cap) if ctx.policy.adaptive and cap > 1 else []
        except BaseException:
            engine.close()
            raise
        served = cls(package, engine, ctx, profile)
        log.info(
            "model.ready",
            model=m.name,
            version=m.version,
            backend=engine.info.description,
            fallback=engine.info.fallback_reason or None,
            batch=served.batcher.plan.max_batch_size,
            plan=served.batcher.plan.reason,
            seconds=round(time.monotonic() - started, 3),
        )
        return served

    def _plan(self, policy: InferencePolicy) -> BatchPlan:
        m = self.manifest
        cap = min(policy.max_batch_size, m.max_batch_size) if m.max_batch_size else 1
        return plan_batching(
            self.profile if policy.adaptive else None,
            cap=cap,
            configured_delay_s=policy.max_queue_delay_ms / 1e3,
            slo_s=policy.latency_slo_ms / 1e3,
        )

    def apply_policy(self, policy: InferencePolicy) -> None:
        """Change batching live; queued and running requests are unaffected."""
        self.policy = policy
        plan = self._plan(policy)
        self.batcher.update(plan, instances=policy.instances, max_queue_depth=policy.max_queue_depth)

    def prepare(self, request: InferRequest) -> PreparedRequest:
        """Validate `request` in full against this version; InvalidInput (counted) when it does not fit."""
        try:
            arrays, rows, group = self.signature.validate(request.inputs, request.outputs)
            priority = request.priority or self.policy.default_priority
            if not 1 <= priority <= self.policy.priority_levels:
                raise InvalidInput(f"priority {priority} is outside 1..{self.policy.priority_levels}")
        except InvalidInput:
            self.stats.on_rejected("invalid_input")
            raise
        timeout = request.timeout_s
        if timeout is None and self.policy.default_timeout_ms > 0:
            timeout = self.policy.default_timeout_ms / 1e3
        deadline = None if timeout is None else time.monotonic() + timeout
        keep = self._keeper.decide(request.parameters) if self._keeper is not None else keeping.NONE
        return PreparedRequest(
            arrays, rows, priority, deadline, group, request.outputs, request.id, keep, request.parameters
        )

    def _run_batch(self, requests: list[PreparedRequest]) -> list[InferResponse]:
        if len(requests) == 1:
            outputs = self.engine.run(requests[0].inputs)
            return [self._response(requests[0], outputs)]
        feed = {n: np.concatenate([r.inputs[n] for r in requests]) for n in self._input_names}
        outputs = self.engine.run(feed)
        responses, start = [], 0
        for r in requests:
            end = start + r.rows
            responses.append(self._response(r, {n: a[start:end] for n, a in outputs.items()}))
            start = end
        return responses

    def _response(self, request: PreparedRequest, outputs: dict[str, Any]) -> InferResponse:
        response = InferResponse(self.name, self.version_str, outputs, id=request.id)
        if request.keep and self._keeper is not None:
            kept = self._keeper.keep(request.keep, response, self.version, request.inputs, request.parameters)
            if request.keep == keeping.RESULT:  # a sample is the agent's business, not the app's
                if kept is None:
                    keeping.settle_kept(response, Overloaded("the outbox refused the record"))
                elif request.parameters.get(keeping.KEEP_ASYNC_PARAMETER) is True:
                    response.parameters[keeping.KEPT_PARAMETER] = True
                else:
                    response.kept = kept
        if request.outputs is not None:
            response.outputs = {n: outputs[n] for n in request.outputs}
        return response

    def sample(self) -> ModelSample:
        """This version's figures for the Prometheus collector."""
        return ModelSample(
            name=self.name,
            version=self.version_str,
            stats=self.stats.snapshot(),
            pending=self.batcher.pending(),
            plan_batch_size=self.batcher.plan.max_batch_size,
            profile=tuple((p.batch_size, p.throughput) for p in self.profile),
            ready=self.ready,
        )

    def close(self, timeout: float) -> None:
        """Finish queued and running requests (up to `timeout`), then free the engine."""
        self.ready = False
        self.batcher.close(timeout)
        self.engine.close()
        self._metrics.untrack(self.name, self.version)
        log.info("model.unloaded", model=self.name, version=self.version)


def _warm_up(m: ModelManifest, engine: Engine, runs: int) -> None:
    for i in range(runs):
        outputs = engine.run(example_inputs(m.inputs, 1, seed=i))
        for spec in m.outputs:
            out = outputs.get(spec.name)
            if out is None or out.dtype != spec.dtype:
                raise EngineError(f"{m.ref}: warm-up produced no {spec.datatype} output {spec.name!r}")
            if m.max_batch_size and (out.ndim == 0 or out.shape[0] != 1):
                raise EngineError(
                    f"{m.ref}: warm-up output {spec.name!r} has shape {list(out.shape)}, expected batch 1 first"
                )


def _profile(m: ModelManifest, engine: Engine, ctx: LoadContext, cap: int) -> list[ProfilePoint]:
    cache = ProfileCache(ctx.cache_dir / "profiles")
    key = ProfileCache.key(m.sha256, engine.info.description, ctx.engine.intra_op_threads, cap)
    points = cache.load(key)
    if points is None:
        started = time.monotonic()
        points = profile_engine(engine, cap, ctx.policy.latency_slo_ms / 1e3)
        cache.store(key, points)
        log.info(
            "model.profiled",
            model=m.name,
            version=m.version,
            seconds=round(time.monotonic() - started, 3),
            points=[(p.batch_size, round(p.latency_s * 1e3, 3)) for p in points],
        )
    return points
