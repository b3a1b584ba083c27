"""Building a TensorRT engine from a model's ONNX file, and the shared logger: the half of the TensorRT backend
that runs once per model version.

It never imports tensorrt: engines/tensorrt.py (the only module that does) hands the module in `BuildJob.trt`.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

import structlog

from edge_runtime.engines.base import ModelFile
from edge_runtime.engines.engine_cache import BuilderFlags, BuildOptions, EngineCache
from edge_runtime.errors import EngineError

__all__ = ["BuildJob", "GpuIdentity", "Progress", "build_plan", "cached_engine", "deserialize", "trt_logger"]

log = structlog.get_logger("edge_runtime.engines.tensorrt")

Progress = Callable[[str, float], None]

# TensorRT keeps one logger pointer for the whole library, so every builder and runtime shares one
# thread-safe logger (TensorRT developer guide, "Thread Safety").
_LOGGER_LOCK = threading.Lock()
_LOGGER: Any = None
# A builder may be used by one thread at a time and a build takes most of a Jetson's memory: build one
# engine at a time, which also serialises the read-modify-write of the shared timing cache.
_BUILD_LOCK = threading.Lock()


def trt_logger(trt: Any) -> Any:
    global _LOGGER
    with _LOGGER_LOCK:
        if _LOGGER is None:
            _LOGGER = _make_logger(trt)
        return _LOGGER


def _make_logger(trt: Any) -> Any:
    severity = trt.ILogger.Severity
    error_levels = (severity.INTERNAL_ERROR, severity.ERROR)

    class _Logger(trt.ILogger):  # type: ignore[misc]
        """Forwards TensorRT's messages to structlog and keeps the calling thread's errors for EngineError."""

        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self._local = threading.local()

        @contextlib.contextmanager
        def capture(self) -> Iterator[list[str]]:
            errors: list[str] = []
            self._local.errors = errors
            try:
                yield errors
            finally:
                self._local.errors = None

        def log(self, level: Any, message: str) -> None:
            if level in error_levels:
                log.error("tensorrt.error", message=message)
                sink = getattr(self._local, "errors", None)
                if sink is not None:
                    sink.append(message)
            elif level == severity.WARNING:
                log.warning("tensorrt.warning", message=message)

    return _Logger()


class GpuIdentity(Protocol):
    """What a build needs to know of the GPU: the timing cache is kept per device."""

    @property
    def name(self) -> str: ...

    @property
    def compute_capability(self) -> tuple[int, int]: ...


G = TypeVar("G", bound=GpuIdentity)


@dataclass(frozen=True)
class BuildJob(Generic[G]):
    """One load: the modules, the GPU, the model file and how to build it."""

    trt: Any
    cuda: Any
    gpu: G
    model: ModelFile
    cache: EngineCache
    options: BuildOptions
    flags: BuilderFlags
    progress: Progress | None

    @property
    def ref(self) -> str:
        return self.model.ref

    @property
    def version(self) -> str:
        return str(self.trt.__version__)

    def report(self, fraction: float) -> None:
        if self.progress is None:
            return
        try:
            self.progress("building", fraction)
        except Exception as exc:  # a broken progress callback must not fail a build
            log.warning("engine.progress_callback_failed", model=self.ref, error=str(exc))


def cached_engine(runtime: Any, job: BuildJob[Any], key: str) -> Any | None:
    plan = job.cache.load(key)
    if plan is None:
        return None
    engine = deserialize(runtime, plan)
    if engine is None:
        # Intact file TensorRT will not take (e.g. a plan from another build of the same version): rebuild.
        log.warning("engine.cache_dropped", model=job.ref, key=key, reason="TensorRT could not deserialize it")
        job.cache.drop(key)
    return engine


def deserialize(runtime: Any, plan: bytes) -> Any | None:
    try:
        return runtime.deserialize_cuda_engine(plan)
    except Exception as exc:  # versions differ on raising or returning None
        log.warning("engine.deserialize_failed", error=str(exc))
        return None


def build_plan(job: BuildJob[Any]) -> bytes:
    trt, options, flags = job.trt, job.options, job.flags
    logger = trt_logger(trt)
    with _BUILD_LOCK, logger.capture() as errors:
        started = time.monotonic()
        job.report(0.0)
        builder = trt.Builder(logger)
        network, parser = _parse_onnx(job, builder, logger)
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_mib << 20)
        if flags.fp16:  # only ever set on TensorRT 10: BuilderFlag.FP16 is gone in 11
            config.set_flag(trt.BuilderFlag.FP16)
        _add_profile(job, builder, network, config)
        timing = _attach_timing_cache(job, config)
        monitor = _progress_monitor(job)
        if monitor is not None:
            config.progress_monitor = monitor
        serialized = builder.build_serialized_network(network, config)
        del parser  # it owns the network's weights, so it had to live until the build was done
        if serialized is None:
            detail = "; ".join(errors[-3:]) or "see the tensorrt.error log lines"
            raise EngineError(f"{job.ref}: TensorRT could not build an engine: {detail}")
        _save_timing_cache(job, timing)
        job.report(1.0)
        seconds = round(time.monotonic() - started, 1)
        log.info("engine.built", model=job.ref, seconds=seconds, fp16=flags.fp16, batch=options.max_batch_size)
        return bytes(serialized)


def _parse_onnx(job: BuildJob[Any], builder: Any, logger: Any) -> tuple[Any, Any]:
    """The parsed network and its parser (which owns the weights, so must outlive the build)."""
    trt = job.trt
    network_flags = 0
    if job.flags.pass_strongly_typed_flag:
        network_flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    # No EXPLICIT_BATCH: every network is explicit-batch since TensorRT 10, where the flag is deprecated.
    network = builder.create_network(network_flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(job.model.path)):
        errors = [_parser_error(parser.get_error(i)) for i in range(parser.num_errors)]
        reason = "; ".join(errors[:5]) or "no reason given"
        raise EngineError(f"{job.ref}: TensorRT's ONNX parser rejected the model: {reason}")
    return network, parser


def _parser_error(error: Any) -> str:
    text = str(error.desc())
    parts = [getattr(error, name, None) for name in ("node_operator", "node_name")]  # TensorRT >= 8.6
    where = " ".join(str(part()) for part in parts if callable(part) and part())
    return f"{text} (node {where})" if where else text


def _add_profile(job: BuildJob[Any], builder: Any, network: Any, config: Any) -> None:
    shapes = job.options.shapes()
    tensors = [network.get_input(i) for i in range(network.num_inputs)]
    names = sorted(t.name for t in tensors)
    if names != sorted(shapes):
        raise EngineError(f"{job.ref}: the ONNX inputs {names} do not match the manifest's {sorted(shapes)}")
    dynamic = False
    for tensor in tensors:
        declared = tuple(int(d) for d in tensor.shape)
        low, _, high = shapes[tensor.name]
        # A static ONNX dimension must equal the manifest's (fixed) size; -1 takes the profile's range.
        fits = len(declared) == len(low) and all(
            d == -1 or lo == hi == d for d, lo, hi in zip(declared, low, high, strict=True)
        )
        if not fits:
            raise EngineError(
                f"{job.ref}: ONNX input {tensor.name!r} has shape {list(declared)}, which does not fit the "
                f"manifest's {list(low)}..{list(high)}"
            )
        dynamic = dynamic or -1 in declared
    if not dynamic:
        return  # a static network needs no optimisation profile
    profile = builder.create_optimization_profile()
    for name, (low, opt, high) in shapes.items():
        profile.set_shape(name, low, opt, high)
    if config.add_optimization_profile(profile) < 0:
        raise EngineError(f"{job.ref}: TensorRT rejected the optimisation profile {job.options.profile}")


def _attach_timing_cache(job: BuildJob[Any], config: Any) -> Any:
    gpu = job.gpu
    raw = job.cache.load_timing_cache(job.version, gpu.name, gpu.compute_capability) or b""
    timing = None
    if raw:
        try:
            timing = config.create_timing_cache(raw)
        except Exception as exc:
            log.warning("engine.timing_cache_unusable", error=str(exc))
    # ignore_mismatch=False: timing data from another device or TensorRT version is refused, not trusted.
    if timing is None or not config.set_timing_cache(timing, False):
        timing = config.create_timing_cache(b"")
        config.set_timing_cache(timing, False)
    return timing


def _save_timing_cache(job: BuildJob[Any], timing: Any) -> None:
    gpu = job.gpu
    try:
        job.cache.store_timing_cache(job.version, gpu.name, gpu.compute_capability, bytes(timing.serialize()))
    except OSError as exc:
        log.warning("engine.timing_cache_store_failed", error=exc.strerror)


def _progress_monitor(job: BuildJob[Any]) -> Any | None:
    """An IProgressMonitor (TensorRT >= 10) turning the top-level build phase's steps into fractions."""
    base: Any = getattr(job.trt, "IProgressMonitor", None)
    if job.progress is None or base is None:
        return None

    class _Monitor(base):  # type: ignore[misc]
        def __init__(self) -> None:
            base.__init__(self)
            self._lock = threading.Lock()  # TensorRT calls from its own threads
            self._top: tuple[str, int] = ("", 1)
            self._reported = 0.0

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            if parent_phase is None:
                with self._lock:
                    self._top = (phase_name, max(1, int(num_steps)))

        def step_complete(self, phase_name: str, step: int) -> bool:
            with self._lock:
                name, steps = self._top
                fraction = min(0.99, (int(step) + 1) / steps) if phase_name == name else 0.0
                due = fraction >= self._reported + 0.01
                self._reported = max(self._reported, fraction)
            if due:
                job.report(fraction)
            return True  # never cancel the build

        def phase_finish(self, phase_name: str) -> None:
            return None

    return _Monitor()
