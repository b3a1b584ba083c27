"""One loaded model version: engine, signature, warm-up, batch plan and batcher, from load to retirement."""

from __future__ import annotations

import asyncio
import enum
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from google.protobuf.message import DecodeError

from edge_runtime.batching.batcher import DynamicBatcher
from edge_runtime.batching.merge import check_rows, merge_inputs, split_outputs
from edge_runtime.batching.policy import BatchPlan, ProfilePoint, plan_batching
from edge_runtime.batching.profiler import ProfileCache, profile_engine
from edge_runtime.config import EngineSection, InferencePolicy
from edge_runtime.engines import Engine, load_engine
from edge_runtime.errors import InvalidInput, Overloaded
from edge_runtime.inference import keeping
from edge_runtime.inference.hard import HardCounter, HardExamples, HardModel, manifest_uncertainty
from edge_runtime.inference.stats import ModelStats
from edge_runtime.inference.types import InferRequest, InferResponse, PreparedRequest
from edge_runtime.inference.validation import Signature
from edge_runtime.models.checks import check_engine_matches, warm_up
from edge_runtime.models.package import ModelManifest, ModelPackage
from edge_runtime.models.shadow import classes_output
from edge_runtime.models.warmup import WarmupInputs
from edge_runtime.observability.metrics import AgentMetrics, ModelSample
from edgefleet.proto.edgefleet.v1.onnx_header_pb2 import OnnxModel

__all__ = ["LoadContext", "ModelState", "ServedModel", "onnx_precision"]

log = structlog.get_logger(__name__)

# PreparedRequest.keep of a shadow's mirror: nothing of it is kept, not even as a hard example (the mirror
# judges the shadow's answer against the active's itself).
_MIRROR = -1
# ONNX TensorProto.DataType values (onnx/onnx.proto).
_ONNX_FLOAT, _ONNX_FLOAT16 = 1, 10
# What may also be kept as a hard example: a request kept for nothing else, or only for its answer.
_JUDGED = (keeping.NONE, keeping.RESULT)


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
    # Where hard examples go (uncertain answers, shadow disagreements); None: none are kept.
    hard: HardExamples | None = None
    # The server's event loop, where a model runs whose batches take less than a hop to a thread (batcher.py).
    loop: asyncio.AbstractEventLoop | None = None


class ServedModel:
    """A model version that passed loading and warm-up; `batcher` serves it."""

    def __init__(
        self,
        package: ModelPackage,
        engine: Engine,
        ctx: LoadContext,
        profile: list[ProfilePoint],
        notes: tuple[str, ...] = (),
        precision: str = "",
    ):
        m = package.manifest
        self.package = package
        self.manifest = m
        self.name, self.version = m.name, m.version
        self.version_str = str(m.version)
        self.engine = engine
        self.profile = profile
        # What an operator should know about how this version serves (warm-up sizes guessed, no profile).
        self.notes = notes
        self.loaded_at = time.time()
        self.signature = Signature(m.inputs, m.outputs, m.max_batch_size, ctx.max_request_bytes)
        self._output_names = [o.name for o in m.outputs]
        self._input_names = [i.name for i in m.inputs]
        self._batched = m.max_batch_size > 0
        self.stats = ModelStats()
        self._metrics = ctx.metrics
        self._keeper = ctx.keeper
        self.ready = True
        self.policy = ctx.policy
        # The numeric precision it computes in ("fp32", "fp16", "int8"; "" unknown): reported per device.
        self.precision = precision
        self.hard_examples = ctx.hard
        classes = classes_output(m)
        self.hard = HardModel(
            m.name,
            m.version,
            engine.info.description,
            precision,
            self._batched,
            classes,
            manifest_uncertainty(m.extra, classes, m.ref),
            HardCounter(),
        )
        self.batcher: DynamicBatcher[PreparedRequest, InferResponse] = DynamicBatcher(
            f"{m.name}:{m.version}",
            self._run_batch,
            self._plan(ctx.policy),
            instances=ctx.policy.instances,
            max_queue_depth=ctx.policy.max_queue_depth,
            observer=self.stats,
            loop=ctx.loop,
        )
        ctx.metrics.track(m.name, m.version, self.sample)

    @classmethod
    def load(cls, package: ModelPackage, ctx: LoadContext) -> ServedModel:
        """Load, check, warm up and profile; raises EdgeRuntimeError with the reason on any failure."""
        m = package.manifest
        started = time.monotonic()
        cap = min(ctx.policy.max_batch_size, m.max_batch_size) if m.max_batch_size else 1
        manifest_uncertainty(m.extra, classes_output(m), m.ref)  # a bad extra.uncertainty fails before the build
        precision = m.lineage.precision if m.lineage is not None else onnx_precision(package.model_path)
        inputs = WarmupInputs.of(package)
        # Engines are built for the model's own limit, so a live policy can raise the batch without a rebuild.
        engine = load_engine(
            package.model_file(),
            ctx.engine,
            ctx.cache_dir,
            max_batch_size=max(m.max_batch_size, 1),
            instances=ctx.policy.instances,
        )
        adaptive = ctx.policy.adaptive and cap > 1
        try:
            check_engine_matches(m, engine)
            warm_up(m, engine, inputs, ctx.engine.warmup_inferences)
            # Never plan batching from a guess: sizes of 1 make batches look cheap that are slow at real sizes.
            profile = _profile(m, engine, ctx, cap, inputs) if adaptive and inputs.representative else []
        except BaseException:
            engine.close()
            raise
        notes: tuple[str, ...] = ()
        if inputs.guessed:
            notes = (
                f"warm-up guessed size 1 for {', '.join(inputs.guessed)}: the package has no warm-up data"
                + ("; batch size not profiled, inference.max_batch_size applies as configured" if adaptive else ""),
            )
            log.warning("model.warmup_guessed", model=m.name, version=m.version, note=notes[0])
        served = cls(package, engine, ctx, profile, notes, precision)
        log.info(
            "model.ready",
            model=m.name,
            version=m.version,
            backend=engine.info.description,
            precision=precision or None,
            fallback=engine.info.fallback_reason or None,
            warmup=inputs.source,
            batch=served.batcher.plan.max_batch_size,
            plan=served.batcher.plan.reason,
            seconds=round(time.monotonic() - started, 3),
        )
        return served

    def _plan(self, policy: InferencePolicy) -> BatchPlan:
        m = self.manifest
        cap = min(policy.max_batch_size, m.max_batch_size) if m.max_batch_size else 1
        if m.max_batch_size == 0:
            # Axis 0 may be time, not batch: one request per run, never concatenated with another's.
            return BatchPlan(1, 0.0, "batch size 1: the model has no batch axis (max_batch_size 0)")
        return plan_batching(
            self.profile if policy.adaptive else None,
            cap=cap,
            configured_delay_s=policy.max_queue_delay_ms / 1e3,
            slo_s=policy.latency_slo_ms / 1e3,
            # A batch's cost is only known where the shapes are: a variable axis could make one far slower
            # than its profile, and a batch on the loop holds every other conversation of the agent.
            on_loop_allowed=policy.run_on_loop and self.signature.fixed_inner,
        )

    def apply_policy(self, policy: InferencePolicy) -> None:
        """Change batching live; queued and running requests are unaffected."""
        self.policy = policy
        plan = self._plan(policy)
        self.batcher.update(plan, instances=policy.instances, max_queue_depth=policy.max_queue_depth)

    def prepare(self, request: InferRequest, *, mirror_of: bool = False) -> PreparedRequest:
        """Validate `request` in full against this version; InvalidInput (counted) when it does not fit.

        `mirror_of`: a shadow's copy of a live request (edge_runtime/models/shadow.py), never kept in the outbox.
        """
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
        if mirror_of:
            keep = _MIRROR
        else:
            keep = self._keeper.decide(request.parameters) if self._keeper is not None else keeping.NONE
        return PreparedRequest(
            arrays, rows, priority, deadline, group, request.outputs, request.id, keep, request.parameters
        )

    def _run_batch(self, requests: list[PreparedRequest]) -> list[InferResponse]:
        if len(requests) == 1:  # the common case, kept to the engine call and a shape check
            request = requests[0]
            outputs = self.engine.run(request.inputs)
            if self._batched:
                check_rows(outputs, request.rows, self._output_names)
            return [self._response(request, outputs)]
        if not self._batched:
            # The plan is one request per batch; a model without a batch axis is never merged.
            return [self._response(r, self.engine.run(r.inputs)) for r in requests]
        outputs = self.engine.run(merge_inputs([r.inputs for r in requests], self._input_names))
        split = split_outputs(outputs, [r.rows for r in requests], self._output_names)
        return [self._response(r, out) for r, out in zip(requests, split, strict=True)]

    def _response(self, request: PreparedRequest, outputs: dict[str, Any]) -> InferResponse:
        response = InferResponse(self.name, self.version_str, outputs, id=request.id)
        if request.keep > 0 and self._keeper is not None:
            kept = self._keeper.keep(request.keep, response, self.version, request.inputs, request.parameters)
            if request.keep == keeping.RESULT:  # a sample is the agent's business, not the app's
                refused = kept.exception() if kept is not None and kept.done() else None
                if kept is None:
                    keeping.settle_kept(response, Overloaded("the outbox refused the record"))
                elif refused is not None:  # refused at the door: the answer says why, waiting or not
                    keeping.settle_kept(response, refused)
                elif request.parameters.get(keeping.KEEP_ASYNC_PARAMETER) is True:
                    response.parameters[keeping.KEPT_PARAMETER] = True
                else:
                    response.kept = kept
        if request.keep in _JUDGED and self.hard_examples is not None and self.hard_examples.enabled:
            # A random sample holds its inputs and answer already; a kept result holds only the answer, so an
            # uncertain one is a hard example too (the people who retrain need its inputs).
            self.hard_examples.judge(self.hard, request.inputs, outputs, request.id)
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
            hard=self.hard.counter.snapshot(),
        )

    def close(self, timeout: float) -> None:
        """Finish queued and running requests (up to `timeout`), then free the engine."""
        self.ready = False
        self.batcher.close(timeout)
        self.engine.close()
        self._metrics.untrack(self.name, self.version)
        log.info("model.unloaded", model=self.name, version=self.version)


def onnx_precision(path: Path) -> str:
    """The precision an ONNX file computes in, read from its graph: "int8" when it carries quantization
    (QuantizeLinear/DequantizeLinear, QLinear*, *Integer ops), "fp16" when float16 initializers hold most of its
    weights, else "fp32"; "" when it cannot be read.

    Read through edgefleet.v1.OnnxModel (the few fields of ONNX's ModelProto it needs, at ONNX's field numbers),
    not the onnx package: importing that costs every agent 9+ MiB of resident memory for one look at load.
    """
    try:
        model = OnnxModel.FromString(path.read_bytes())
    except (OSError, DecodeError) as exc:  # a damaged or foreign file: the engine's load says what is wrong
        log.warning("model.precision_unknown", path=str(path), error=f"{type(exc).__name__}: {exc}")
        return ""
    ops = {node.op_type for node in model.graph.node}  # subgraphs (If, Loop): rare in classifiers, not walked
    if ops & {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"} or any(
        op.startswith("QLinear") or op.endswith("Integer") for op in ops
    ):
        return "int8"
    sizes: dict[int, int] = {}
    for init in model.graph.initializer:
        sizes[init.data_type] = sizes.get(init.data_type, 0) + math.prod(init.dims)
    fp16, fp32 = sizes.get(_ONNX_FLOAT16, 0), sizes.get(_ONNX_FLOAT, 0)
    return "fp16" if fp16 > fp32 else "fp32"


def _profile(m: ModelManifest, engine: Engine, ctx: LoadContext, cap: int, inputs: WarmupInputs) -> list[ProfilePoint]:
    cache = ProfileCache(ctx.cache_dir / "profiles")
    shapes = m.warmup.shapes if m.warmup is not None else None
    key = ProfileCache.key(m.sha256, engine.info.description, ctx.engine.intra_op_threads, cap, shapes)
    points = cache.load(key)
    if points is None:
        started = time.monotonic()
        points = profile_engine(engine, cap, ctx.policy.latency_slo_ms / 1e3, lambda size: inputs.at(size, seed=size))
        cache.store(key, points)
        log.info(
            "model.profiled",
            model=m.name,
            version=m.version,
            seconds=round(time.monotonic() - started, 3),
            points=[(p.batch_size, round(p.latency_s * 1e3, 3)) for p in points],
        )
    return points
