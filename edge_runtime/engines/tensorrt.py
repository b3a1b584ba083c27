"""TensorRT backend: builds an engine from a model's ONNX file on the device, caches it, runs batches via pycuda.

The only module that imports tensorrt and pycuda, and only inside functions, so it imports anywhere. Not for
choosing a backend or falling back to ONNX Runtime: engines/__init__.py does that, using our EngineError.
"""

from __future__ import annotations

import contextlib
import math
import queue
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from edge_runtime.config import EngineSection
from edge_runtime.engines._tensorrt_build import BuildJob, Progress, build_plan, cached_engine, deserialize, trt_logger
from edge_runtime.engines.base import EngineInfo, ModelFile
from edge_runtime.engines.engine_cache import (
    BuildOptions,
    EngineCache,
    Shape,
    builder_flags,
    key_for,
    profile_shapes,
    tensorrt_major,
)
from edge_runtime.errors import EngineError
from edge_runtime.inference.tensors import TensorSpec, datatype_of

__all__ = ["INSTALL_HINT", "TensorRTEngine", "tensorrt_available"]

log = structlog.get_logger(__name__)

INSTALL_HINT = (
    "pip install 'edgefleet[tensorrt]' (on a Jetson: JetPack's python3-libnvinfer provides tensorrt, then "
    "pip install pycuda)"
)
Array = np.ndarray[Any, Any]


def _import_tensorrt() -> tuple[Any, Any]:
    try:
        import tensorrt as trt
    except (ImportError, OSError) as exc:  # OSError: the wheel is there but libnvinfer is not
        raise EngineError(f"TensorRT is not available ({exc}); install it with {INSTALL_HINT}") from exc
    try:
        import pycuda.driver as cuda
    except (ImportError, OSError) as exc:
        raise EngineError(f"pycuda is not available ({exc}); install it with {INSTALL_HINT}") from exc
    return trt, cuda


def tensorrt_available() -> tuple[bool, str]:
    """(True, TensorRT version) when tensorrt and pycuda import and a GPU is present, else (False, why)."""
    try:
        trt, cuda = _import_tensorrt()
    except EngineError as exc:
        return False, str(exc)
    try:
        cuda.init()
        count = int(cuda.Device.count())
    except Exception as exc:  # pycuda raises its own error types when the driver is missing or broken
        return False, f"CUDA is not usable ({exc})"
    if count < 1:
        return False, "no CUDA device found"
    return True, str(trt.__version__)


class _Gpu:
    """Device 0's primary CUDA context, made current on whichever thread needs it.

    A CUDA context is current per thread and engine workers are several threads. The primary context is the
    one the CUDA runtime (so TensorRT) uses, so pycuda's buffers and TensorRT's memory share it. Jetsons have
    one GPU; device 0 is the one we use.
    """

    def __init__(self, cuda: Any) -> None:
        cuda.init()
        if cuda.Device.count() < 1:
            raise EngineError("no CUDA device found")
        device = cuda.Device(0)
        self.name = str(device.name())
        major, minor = device.compute_capability()
        self.compute_capability = (int(major), int(minor))
        self._cuda = cuda
        self._context = device.retain_primary_context()

    @contextlib.contextmanager
    def current(self) -> Iterator[None]:
        self._context.push()
        try:
            yield
        finally:
            self._cuda.Context.pop()

    def release(self) -> None:
        self._context.detach()


@dataclass
class _Slot:
    """What one concurrent `run` owns: an execution context, a stream, device buffers and pinned staging."""

    context: Any
    stream: Any
    device: dict[str, Any]
    host: dict[str, Array]

    def free(self) -> None:
        for allocation in self.device.values():
            allocation.free()
        self.device.clear()
        self.host.clear()
        self.context = self.stream = None


class TensorRTEngine:
    """A TensorRT engine with a pool of execution slots; `run` is safe from several threads at once."""

    def __init__(self, job: BuildJob[_Gpu], runtime: Any, engine: Any, instances: int) -> None:
        """Use `load`; this allocates `instances` slots in the current CUDA context."""
        self._cuda, self._gpu, self._ref = job.cuda, job.gpu, job.ref
        self._runtime = runtime  # the runtime must outlive the engine it deserialized
        self._engine = engine
        self._inputs, self._outputs = _io_specs(job.trt, engine)
        slots, self._max_shapes = _make_slots(job.cuda, engine, self._inputs, self._outputs, instances)
        # Only the declared outputs are copied back to the host (every output when none is declared).
        declared = {o.name for o in job.model.outputs}
        self._fetch = tuple(o for o in self._outputs if not declared or o.name in declared)
        self._slots: queue.SimpleQueue[_Slot | None] = queue.SimpleQueue()
        for slot in slots:
            self._slots.put(slot)
        self._instances = instances
        self._closed = False
        self._close_lock = threading.Lock()
        major, minor = job.gpu.compute_capability
        detail = f"TensorRT {job.version} on {job.gpu.name} sm_{major}{minor}"
        self._info = EngineInfo(backend="tensorrt", detail=detail, platform="tensorrt_plan")

    @classmethod
    def load(
        cls,
        model: ModelFile,
        config: EngineSection,
        cache_dir: Path,
        *,
        max_batch_size: int,
        instances: int,
        progress: Progress | None = None,
    ) -> TensorRTEngine:
        """Deserialize the cached engine for this model file, GPU and options, or build and cache one.

        Raises EngineError with the reason on any failure, so the caller can fall back and say why.
        `progress("building", fraction)` is called during a build, from TensorRT's threads too.
        """
        trt, cuda = _import_tensorrt()
        if instances < 1:
            raise EngineError(f"instances must be >= 1, not {instances}")
        major = tensorrt_major(str(trt.__version__))
        flags = builder_flags(major, fp16_requested=config.tensorrt_fp16)
        if flags.ignored:
            log.warning("engine.option_ignored", model=model.ref, reason=flags.ignored)
        # The model's limit is the manifest's, the caller's the policy's. 0: the model has no batch axis.
        batch = 0 if model.max_batch_size == 0 else max(1, min(max_batch_size, model.max_batch_size))
        # A variable non-batch axis is refused here (EngineError: the model falls back to ONNX Runtime and its
        # status says why): an engine built for the warm-up size alone would fail every other size.
        shapes = profile_shapes(model.inputs, batch)
        options = BuildOptions.create(
            tensorrt_major=major, max_batch_size=batch, shapes=shapes, flags=flags,
            workspace_mib=config.tensorrt_workspace_mib,
        )  # fmt: skip
        try:
            gpu = _Gpu(cuda)
        except EngineError:
            raise
        except Exception as exc:
            raise EngineError(f"CUDA is not usable ({exc})") from exc
        job = BuildJob(trt, cuda, gpu, model, EngineCache(cache_dir), options, flags, progress)
        try:
            with gpu.current():
                return cls._open(job, instances)
        except EngineError:
            gpu.release()
            raise
        except Exception as exc:
            gpu.release()
            raise EngineError(f"{model.ref}: TensorRT failed: {exc}") from exc

    @classmethod
    def _open(cls, job: BuildJob[_Gpu], instances: int) -> TensorRTEngine:
        started = time.monotonic()
        gpu = job.gpu
        key = key_for(job.model.sha256, job.version, gpu.name, gpu.compute_capability, job.options)
        runtime = job.trt.Runtime(trt_logger(job.trt))
        engine = cached_engine(runtime, job, key)
        source = "cache"
        if engine is None:
            plan = build_plan(job)
            try:
                job.cache.store(key, plan)
            except OSError as exc:  # the engine still serves; the next load builds it again
                log.warning("engine.cache_store_failed", model=job.ref, key=key, error=exc.strerror)
            engine = deserialize(runtime, plan)
            if engine is None:
                raise EngineError(f"{job.ref}: TensorRT could not deserialize the engine it just built")
            source = "built"
        loaded = cls(job, runtime, engine, instances)
        seconds = round(time.monotonic() - started, 3)
        log.info("engine.loaded", model=job.ref, backend="tensorrt", source=source, key=key, seconds=seconds)
        return loaded

    @property
    def info(self) -> EngineInfo:
        return self._info

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return self._inputs

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return self._outputs

    @property
    def unservable(self) -> Mapping[str, str]:
        return {}  # TensorRT's ONNX parser refuses a graph with non-tensor outputs outright

    def run(self, inputs: Mapping[str, Array], *, release_memory: bool = False) -> dict[str, Array]:
        """Run one batch on a free slot, waiting for one while all `instances` are busy.

        `release_memory` changes nothing here: buffers and each context's activation memory are sized for
        the largest batch once at load and reused, so a large trial batch leaves nothing extra behind.
        """
        slot = self._slots.get()
        try:
            if slot is None:
                raise EngineError(f"{self._ref}: the TensorRT engine is closed")
            with self._gpu.current():
                try:
                    return self._run_on(slot, inputs)
                except BaseException:
                    with contextlib.suppress(Exception):  # keep the original error if CUDA is broken too
                        slot.stream.synchronize()  # no copy may still target this slot's buffers
                    raise
        except EngineError:
            raise
        except Exception as exc:
            raise EngineError(f"{self._ref}: TensorRT inference failed: {exc}") from exc
        finally:
            self._slots.put(slot)

    def _run_on(self, slot: _Slot, inputs: Mapping[str, Array]) -> dict[str, Array]:
        cuda, context = self._cuda, slot.context
        for spec in self._inputs:
            staged = self._stage(slot, spec, inputs.get(spec.name))
            cuda.memcpy_htod_async(slot.device[spec.name], staged, slot.stream)
        shapes = {s.name: tuple(int(d) for d in context.get_tensor_shape(s.name)) for s in self._fetch}
        if not context.execute_async_v3(slot.stream.handle):
            raise EngineError(f"{self._ref}: TensorRT refused to run the batch (see tensorrt.error logs)")
        for name, shape in shapes.items():
            if math.prod(shape) > 0:
                cuda.memcpy_dtoh_async(slot.host[name][: math.prod(shape)], slot.device[name], slot.stream)
        slot.stream.synchronize()
        # Copies: the pinned buffers belong to the slot and its next batch overwrites them.
        return {name: slot.host[name][: math.prod(s)].reshape(s).copy() for name, s in shapes.items()}

    def _stage(self, slot: _Slot, spec: TensorSpec, array: Array | None) -> Array:
        """Set the input's shape on the context and copy it into pinned memory, as async copies need."""
        if array is None:
            raise EngineError(f"{self._ref}: input {spec.name!r} is missing")
        if array.dtype != spec.dtype:
            raise EngineError(f"{self._ref}: input {spec.name!r} is {array.dtype}; the engine takes {spec.dtype}")
        staging = slot.host[spec.name]
        if array.size > staging.size or not slot.context.set_input_shape(spec.name, tuple(array.shape)):
            raise EngineError(
                f"{self._ref}: input {spec.name!r} shape {list(array.shape)} is outside what the engine was "
                f"built for ({list(spec.shape)}, at most {list(self._max_shapes[spec.name])})"
            )
        view = staging[: array.size]
        np.copyto(view, array.reshape(-1))
        return view

    def close(self) -> None:
        """Wait for in-flight runs, then free every context, buffer and the engine."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        slots = [self._slots.get() for _ in range(self._instances)]
        with self._gpu.current():
            for slot in slots:
                if slot is not None:
                    slot.free()
            self._engine = self._runtime = None
        self._gpu.release()
        for _ in slots:
            self._slots.put(None)  # a late `run` is told "closed" instead of waiting forever
        log.info("engine.closed", model=self._ref, backend="tensorrt")


def _io_specs(trt: Any, engine: Any) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    inputs: list[TensorSpec] = []
    outputs: list[TensorSpec] = []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        trt_type = engine.get_tensor_dtype(name)
        try:
            datatype = datatype_of(np.dtype(trt.nptype(trt_type)))
        except (TypeError, KeyError) as exc:
            raise EngineError(f"tensor {name!r} has TensorRT type {trt_type}, which edgefleet does not serve") from exc
        shape = tuple(int(d) for d in engine.get_tensor_shape(name))
        spec = TensorSpec(name=name, datatype=datatype, shape=shape)
        if engine.get_tensor_mode(name) != trt.TensorIOMode.INPUT:
            outputs.append(spec)
        elif engine.is_shape_inference_io(name):
            raise EngineError(f"input {name!r} is a shape tensor; this backend serves execution tensors only")
        else:
            inputs.append(spec)
    return tuple(inputs), tuple(outputs)


def _max_shapes(
    engine: Any, context: Any, inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...]
) -> dict[str, Shape]:
    """Each I/O tensor's largest shape: inputs at the profile maximum, outputs as TensorRT infers them."""
    shapes: dict[str, Shape] = {}
    for spec in inputs:
        shape = spec.shape
        if -1 in shape:
            shape = tuple(int(d) for d in engine.get_tensor_profile_shape(spec.name, 0)[2])
        if not context.set_input_shape(spec.name, shape):
            raise EngineError(f"TensorRT refused input {spec.name!r} at its profile maximum {list(shape)}")
        shapes[spec.name] = shape
    for spec in outputs:
        shape = tuple(int(d) for d in context.get_tensor_shape(spec.name))
        if any(d < 0 for d in shape):
            raise EngineError(
                f"output {spec.name!r} has a data-dependent shape {list(spec.shape)}; this backend needs "
                "output shapes that follow from the input shapes"
            )
        shapes[spec.name] = shape
    return shapes


def _make_slots(
    cuda: Any, engine: Any, inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...], instances: int
) -> tuple[list[_Slot], dict[str, Shape]]:
    """One slot per instance, each with buffers for the largest batch, allocated once."""
    slots: list[_Slot] = []
    dtypes = {s.name: s.dtype for s in (*inputs, *outputs)}
    try:
        first = _new_context(engine)
        max_shapes = _max_shapes(engine, first, inputs, outputs)
        for i in range(instances):
            slots.append(_allocate(cuda, first if i == 0 else _new_context(engine), max_shapes, dtypes))
    except BaseException:
        for slot in slots:
            slot.free()
        raise
    return slots, max_shapes


def _new_context(engine: Any) -> Any:
    context = engine.create_execution_context()
    if context is None:
        raise EngineError("TensorRT could not create an execution context (out of GPU memory?)")
    return context


def _allocate(cuda: Any, context: Any, max_shapes: dict[str, Shape], dtypes: dict[str, np.dtype[Any]]) -> _Slot:
    slot = _Slot(context=context, stream=cuda.Stream(), device={}, host={})
    try:
        for name, shape in max_shapes.items():
            slot.host[name] = host = cuda.pagelocked_empty(max(1, math.prod(shape)), dtypes[name])
            slot.device[name] = cuda.mem_alloc(host.nbytes)
            # Addresses never change, so they are bound once here rather than on every run.
            if not context.set_tensor_address(name, int(slot.device[name])):
                raise EngineError(f"TensorRT refused the buffer address for tensor {name!r}")
    except BaseException:
        slot.free()
        raise
    return slot
