"""Triton's shared-memory extension, core side: a registry of POSIX shm segments (and CUDA IPC buffers) that
local apps register by name and then name in a tensor's parameters instead of sending its bytes.

Pure registry and checks, no grpc: shm_service.py is the gRPC edge, codec.py reads inputs and writes outputs
through `SystemSharedMemory.input_view` and `write_output`.
"""

from __future__ import annotations

import errno
import mmap
import os
import re
import stat
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.errors import InvalidInput, RegionExists, RegionNotFound, RequestTooLarge

__all__ = [
    "BYTE_SIZE_PARAMETER",
    "MAX_MAPPED_BYTES",
    "MAX_REGIONS",
    "OFFSET_PARAMETER",
    "REGION_PARAMETER",
    "CudaRegionStatus",
    "RegionStatus",
    "ShmRef",
    "SystemSharedMemory",
    "served_ref",
    "shm_ref",
]

REGION_PARAMETER = "shared_memory_region"
OFFSET_PARAMETER = "shared_memory_offset"
BYTE_SIZE_PARAMETER = "shared_memory_byte_size"
# Registered regions (system and CUDA together) and bytes mapped into the agent: a device has little
# address space and memory to spare, and every region is an open file and a mapping.
MAX_REGIONS = 64
MAX_MAPPED_BYTES = 2 << 30
SHM_DIR = Path("/dev/shm")
# NAME_MAX of tmpfs; glibc's named semaphores live in /dev/shm as "sem.NAME" and must not be mapped.
MAX_KEY_BYTES = 255
_KEY = re.compile(r"/?([^/\x00-\x1f\x7f]+)")
_REFUSED_PREFIXES = ("sem.",)
CUDA_IPC_HANDLE_SIZE = 64


@dataclass(frozen=True)
class ShmRef:
    """Where a tensor's bytes are: `byte_size` bytes at `offset` in registered region `region`."""

    region: str
    offset: int
    byte_size: int


@dataclass(frozen=True)
class RegionStatus:
    name: str
    key: str
    offset: int
    byte_size: int


@dataclass(frozen=True)
class CudaRegionStatus:
    name: str
    device_id: int
    byte_size: int


def shm_ref(tensor: str, params: Mapping[str, Any]) -> ShmRef | None:
    """The shared-memory reference in a tensor's parameters; None when it has none.

    As Triton: a region needs a byte size, the offset defaults to 0, and neither comes without a region.
    """
    region = params.get(REGION_PARAMETER)
    offset = params.get(OFFSET_PARAMETER)
    size = params.get(BYTE_SIZE_PARAMETER)
    if region is None:
        for key, value in ((OFFSET_PARAMETER, offset), (BYTE_SIZE_PARAMETER, size)):
            if value is not None:
                raise InvalidInput(f"'{key}' can not be specified without '{REGION_PARAMETER}' for tensor {tensor!r}")
        return None
    if not isinstance(region, str) or not region:
        raise InvalidInput(f"'{REGION_PARAMETER}' of tensor {tensor!r} must be a non-empty string_param")
    if size is None:
        raise InvalidInput(
            f"'{BYTE_SIZE_PARAMETER}' must be specified along with '{REGION_PARAMETER}' for tensor {tensor!r}"
        )
    offset = 0 if offset is None else offset
    for key, value in ((OFFSET_PARAMETER, offset), (BYTE_SIZE_PARAMETER, size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise InvalidInput(f"'{key}' of tensor {tensor!r} must be a non-negative int64_param, not {value!r}")
    return ShmRef(region, offset, size)


def served_ref(tensor: str, params: Mapping[str, Any], shm: SystemSharedMemory | None) -> ShmRef | None:
    """`shm_ref`, refused when no registry `shm` serves shared memory here (either protocol's codec)."""
    ref = shm_ref(tensor, params)
    if ref is not None and shm is None:
        raise InvalidInput(f"tensor {tensor!r} names shared memory region {ref.region!r}; none is served here")
    return ref


def check_key(name: str, key: str) -> str:
    """The file name under /dev/shm of POSIX shm name `key`; InvalidInput unless it is a plain one."""
    match = _KEY.fullmatch(key)
    plain = match.group(1) if match else ""
    if not plain or plain in (".", "..") or len(plain.encode()) > MAX_KEY_BYTES or plain.startswith(_REFUSED_PREFIXES):
        raise InvalidInput(
            f"failed to register shared memory region {name!r}: key {key!r} is not a POSIX shm name "
            f"('/name': no other '/', not '.' or '..', at most {MAX_KEY_BYTES} bytes, not 'sem.*')"
        )
    return plain


def check_owner(name: str, key: str, st: os.stat_result) -> None:
    """A segment the agent will read and write: a regular file of the agent's user, or one its owner shared
    read-write with the agent's group (everyone who may call the agent is in that group: its socket is 0660).

    Anything else the agent could open would make it a confused deputy: an app could have the agent read
    (into an answer) or overwrite (with an output) a segment the app itself cannot open.
    """
    if not stat.S_ISREG(st.st_mode):
        raise InvalidInput(f"failed to register shared memory region {name!r}: {key!r} is not a regular shm file")
    if st.st_uid == os.geteuid():
        return
    if st.st_gid == os.getegid() and st.st_mode & 0o060 == 0o060:
        return
    raise InvalidInput(
        f"failed to register shared memory region {name!r}: segment {key!r} belongs to uid {st.st_uid} "
        f"gid {st.st_gid} mode {stat.S_IMODE(st.st_mode):o}; edge-agent maps only its own user's segments or "
        f"ones shared read-write with its group (gid {os.getegid()}): chgrp and chmod g+rw the segment"
    )


class _Mapped:
    """One registered system region: its segment's fd (kept for fstat) and a mapping that covers it."""

    def __init__(self, name: str, key: str, offset: int, byte_size: int, fd: int) -> None:
        self.name, self.key, self.offset, self.byte_size, self.fd = name, key, offset, byte_size, fd
        start = offset - offset % mmap.ALLOCATIONGRANULARITY
        self.base = offset - start  # where the region starts in the mapping
        self.mm = mmap.mmap(fd, self.base + byte_size, mmap.MAP_SHARED, offset=start)

    def check_segment(self, tensor: str, end: int) -> None:
        """The segment still holds the region up to `end`: touching a page past a truncated file is SIGBUS."""
        size = os.fstat(self.fd).st_size
        if self.offset + end > size:
            raise InvalidInput(
                f"tensor {tensor!r}: shared memory region {self.name!r} needs {self.offset + end} bytes of "
                f"segment {self.key!r}, which is now {size} bytes (truncated after it was registered?)"
            )

    def try_unmap(self) -> bool:
        """Unmap and close; False while a request still holds a view (mmap refuses: BufferError)."""
        try:
            self.mm.close()
        except BufferError:
            return False
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        return True


class _CudaRegion:
    """A registered CUDA IPC buffer, opened in its device's primary context (the one TensorRT uses).

    pycuda (the [tensorrt] extra) is imported on the first CUDA registration only. Reads and writes copy
    between the device buffer and host memory: the ONNX Runtime engines take host arrays.
    """

    def __init__(self, name: str, raw_handle: bytes, device_id: int, byte_size: int) -> None:
        self.name, self.device_id, self.byte_size = name, device_id, byte_size
        if len(raw_handle) != CUDA_IPC_HANDLE_SIZE:
            raise InvalidInput(
                f"failed to register shared memory region {name!r}: raw_handle is {len(raw_handle)} bytes, "
                f"a cudaIpcMemHandle_t is {CUDA_IPC_HANDLE_SIZE} (tritonclient's get_raw_handle, base64-decoded)"
            )
        self._cuda = cuda = _pycuda(name)
        try:
            cuda.init()
            if not 0 <= device_id < cuda.Device.count():
                raise InvalidInput(f"failed to register shared memory region {name!r}: no CUDA device {device_id}")
            self._context = cuda.Device(device_id).retain_primary_context()
        except InvalidInput:
            raise
        except Exception as exc:  # pycuda's own error types: no driver, a broken one
            raise InvalidInput(f"CUDA shared memory region {name!r}: CUDA is not usable here ({exc})") from exc
        self._context.push()
        try:
            self._ipc = cuda.IPCMemoryHandle(raw_handle)
            self.ptr = int(self._ipc)
            _base, size = cuda.mem_get_address_range(self.ptr)
            if byte_size > int(size):
                self._ipc.close()
                raise InvalidInput(f"failed to register shared memory region {name!r}: invalid args")
        except InvalidInput:
            raise
        except Exception as exc:
            raise InvalidInput(f"failed to register shared memory region {name!r}: invalid args ({exc})") from exc
        finally:
            cuda.Context.pop()

    def read(self, offset: int, nbytes: int) -> memoryview:
        host = bytearray(nbytes)
        self._context.push()
        try:
            self._cuda.memcpy_dtoh(host, self.ptr + offset)
        finally:
            self._cuda.Context.pop()
        return memoryview(host).toreadonly()

    def write(self, offset: int, array: np.ndarray[Any, Any]) -> None:
        self._context.push()
        try:
            self._cuda.memcpy_htod(self.ptr + offset, np.ascontiguousarray(array))
        finally:
            self._cuda.Context.pop()

    def close(self) -> None:
        self._context.push()
        try:
            self._ipc.close()
        finally:
            self._cuda.Context.pop()
            self._context.detach()


def _pycuda(name: str) -> Any:
    try:
        import pycuda.driver as cuda
    except (ImportError, OSError) as exc:
        raise InvalidInput(
            f"CUDA shared memory region {name!r}: this edge-agent has no CUDA (pycuda: {exc}); on an NVIDIA "
            "device pip install 'edgefleet[tensorrt]', or use system shared memory"
        ) from exc
    return cuda


class SystemSharedMemory:
    """The agent's registered shared-memory regions, by name; thread-safe.

    Unregistering removes the name at once; a mapping that a request still reads is unmapped when the
    last view of it is gone (mmap itself counts the views: close() refuses while any exists).
    """

    def __init__(self, max_regions: int = MAX_REGIONS, max_mapped_bytes: int = MAX_MAPPED_BYTES) -> None:
        self._lock = threading.Lock()
        self._regions: dict[str, _Mapped] = {}
        self._cuda: dict[str, _CudaRegion] = {}
        self._retired: list[_Mapped] = []
        self._max_regions = max_regions
        self._max_bytes = max_mapped_bytes
        self._closed = False

    # -- registration -------------------------------------------------------------------------------------

    def register(self, name: str, key: str, offset: int, byte_size: int) -> None:
        """Open and map `byte_size` bytes at `offset` of POSIX shm segment `key` as region `name`."""
        self._check_name(name)
        plain = check_key(name, key)
        if byte_size <= 0:
            raise InvalidInput(f"failed to register shared memory region {name!r}: byte_size must be positive")
        with self._lock:
            self._reap()
            self._check_room(name, byte_size)
            try:
                fd = os.open(SHM_DIR / plain, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
            except OSError as exc:
                raise InvalidInput(f"Unable to open shared memory region: {key!r} ({_why(exc)})") from exc
            try:
                st = os.fstat(fd)
                check_owner(name, key, st)
                if offset + byte_size > st.st_size:
                    raise InvalidInput(
                        f"failed to register shared memory region {name!r}: invalid args (offset {offset} + "
                        f"byte_size {byte_size} is past the end of segment {key!r}, {st.st_size} bytes)"
                    )
                try:
                    self._regions[name] = _Mapped(name, key, offset, byte_size, fd)
                except OSError as exc:  # out of address space or memory map areas
                    raise InvalidInput(f"failed to register shared memory region {name!r}: {exc}") from exc
            except BaseException:
                os.close(fd)
                raise

    def register_cuda(self, name: str, raw_handle: bytes, device_id: int, byte_size: int) -> None:
        """Open CUDA IPC handle `raw_handle` (device `device_id`) as region `name`."""
        self._check_name(name)
        if byte_size <= 0 or device_id < 0:
            raise InvalidInput(f"failed to register shared memory region {name!r}: invalid args")
        with self._lock:
            self._reap()
            self._check_room(name, 0)
            self._cuda[name] = _CudaRegion(name, raw_handle, device_id, byte_size)

    def _check_name(self, name: str) -> None:
        if not name or len(name.encode()) > MAX_KEY_BYTES:
            raise InvalidInput(f"a shared memory region needs a name of 1 to {MAX_KEY_BYTES} bytes, not {name!r}")

    def _check_room(self, name: str, byte_size: int) -> None:
        if self._closed:
            raise InvalidInput("edge-agent is shutting down: no shared memory is registered any more")
        if name in self._regions or name in self._cuda:
            raise RegionExists(f"shared memory region {name!r} already in manager")
        if len(self._regions) + len(self._cuda) >= self._max_regions:
            raise RequestTooLarge(
                f"failed to register shared memory region {name!r}: {self._max_regions} regions are registered, "
                "the most edge-agent keeps; unregister one first"
            )
        mapped = sum(r.byte_size for r in self._regions.values()) + sum(r.byte_size for r in self._retired)
        if mapped + byte_size > self._max_bytes:
            raise RequestTooLarge(
                f"failed to register shared memory region {name!r}: {byte_size} more bytes would map "
                f"{mapped + byte_size}, past edge-agent's limit of {self._max_bytes}"
            )

    def unregister(self, name: str = "", cuda: bool = False) -> None:
        """Forget region `name` ("" = every region of the kind); an unknown name is no error, as in Triton."""
        with self._lock:
            if cuda:
                # Reads and writes of CUDA regions are copies made under the lock: none is in flight here.
                for region in [r for n, r in self._cuda.items() if not name or n == name]:
                    del self._cuda[region.name]
                    region.close()
            else:
                for mapped in [r for n, r in self._regions.items() if not name or n == name]:
                    del self._regions[mapped.name]
                    self._retired.append(mapped)
            self._reap()

    def _reap(self) -> None:
        self._retired = [m for m in self._retired if not m.try_unmap()]

    def status(self, name: str = "") -> list[RegionStatus]:
        """The system regions ("" = all, by name); InvalidInput for an unknown name."""
        with self._lock:
            self._reap()
            if name and name not in self._regions:
                if name in self._cuda:
                    raise InvalidInput(
                        f"The region named {name!r} is registered as CUDA shared memory, not system shared memory"
                    )
                raise RegionNotFound(f"Unable to find system shared memory region: {name!r}")
            return [
                RegionStatus(r.name, r.key, r.offset, r.byte_size)
                for n, r in sorted(self._regions.items())
                if not name or n == name
            ]

    def cuda_status(self, name: str = "") -> list[CudaRegionStatus]:
        with self._lock:
            if name and name not in self._cuda:
                if name in self._regions:
                    raise InvalidInput(
                        f"The region named {name!r} is registered as system shared memory, not CUDA shared memory"
                    )
                raise RegionNotFound(f"Unable to find cuda shared memory region: {name!r}")
            return [
                CudaRegionStatus(r.name, r.device_id, r.byte_size)
                for n, r in sorted(self._cuda.items())
                if not name or n == name
            ]

    def mapped(self) -> tuple[int, int]:
        """(regions registered, mappings still held including unregistered ones a request reads)."""
        with self._lock:
            self._reap()
            return len(self._regions) + len(self._cuda), len(self._regions) + len(self._retired)

    # -- use by requests ----------------------------------------------------------------------------------

    def input_view(self, tensor: str, ref: ShmRef, nbytes: int) -> memoryview:
        """A read-only view of input `tensor`'s `nbytes` bytes in its region (zero-copy for system regions).

        The view keeps the mapping alive (unregistering then defers the unmap until it is released).
        """
        if ref.byte_size != nbytes:
            raise InvalidInput(
                f"input {tensor!r}: shared memory region {ref.region!r} gives {ref.byte_size} bytes "
                f"({BYTE_SIZE_PARAMETER}), but the tensor's datatype and shape need {nbytes}"
            )
        with self._lock:
            mapped = self._regions.get(ref.region)
            if mapped is None:
                return self._cuda_region(tensor, ref).read(ref.offset, nbytes)
            self._check_bounds(tensor, ref, mapped.byte_size)
            mapped.check_segment(tensor, ref.offset + nbytes)
            start = mapped.base + ref.offset
            return memoryview(mapped.mm)[start : start + nbytes].toreadonly()

    def check_output(self, tensor: str, ref: ShmRef) -> None:
        """Output `tensor` may go to `ref` (checked before the model runs, as Triton does)."""
        with self._lock:
            mapped = self._regions.get(ref.region)
            if mapped is None:
                self._cuda_region(tensor, ref)
                return
            self._check_bounds(tensor, ref, mapped.byte_size)
            mapped.check_segment(tensor, ref.offset + ref.byte_size)

    def write_output(self, tensor: str, ref: ShmRef, array: np.ndarray[Any, Any]) -> None:
        """Copy output `tensor` into its region; InvalidInput when it does not fit."""
        if array.nbytes > ref.byte_size:
            raise InvalidInput(
                f"shared memory size specified with the request for output {tensor!r} ({ref.byte_size} bytes) "
                f"should be at least {array.nbytes} bytes to hold the results"
            )
        with self._lock:
            mapped = self._regions.get(ref.region)
            if mapped is None:
                cuda = self._cuda_region(tensor, ref)
                cuda.write(ref.offset, array)
                return
            self._check_bounds(tensor, ref, mapped.byte_size)
            mapped.check_segment(tensor, ref.offset + array.nbytes)
            target: np.ndarray[Any, Any] = np.ndarray(
                array.shape, array.dtype, buffer=mapped.mm, offset=mapped.base + ref.offset
            )
        # Outside the lock: `target` holds the mapping, so an unregister meanwhile defers its unmap.
        np.copyto(target, array, casting="no")

    def _cuda_region(self, tensor: str, ref: ShmRef) -> _CudaRegion:
        region = self._cuda.get(ref.region)
        if region is None:
            raise InvalidInput(f"tensor {tensor!r}: Unable to find shared memory region: {ref.region!r}")
        self._check_bounds(tensor, ref, region.byte_size)
        return region

    @staticmethod
    def _check_bounds(tensor: str, ref: ShmRef, size: int) -> None:
        if ref.offset >= size:
            raise InvalidInput(
                f"tensor {tensor!r}: Invalid offset for shared memory region: {ref.region!r} "
                f"(offset {ref.offset}, region of {size} bytes)"
            )
        if ref.offset + ref.byte_size > size:
            raise InvalidInput(
                f"tensor {tensor!r}: Invalid offset + byte size for shared memory region: {ref.region!r} "
                f"({ref.offset} + {ref.byte_size} > {size} bytes)"
            )

    def close(self) -> None:
        """Forget every region at agent shutdown; mappings requests still read go when their views do."""
        with self._lock:
            self._closed = True
            for region in self._cuda.values():
                region.close()
            self._cuda.clear()
            self._retired.extend(self._regions.values())
            self._regions.clear()
            self._reap()
            for mapped in self._retired:  # still viewed: Python unmaps when the last view goes
                if mapped.fd >= 0:
                    os.close(mapped.fd)
                    mapped.fd = -1
            self._retired.clear()


def _why(exc: OSError) -> str:
    if exc.errno == errno.ENOENT:
        return "no such segment in /dev/shm"
    if exc.errno == errno.ELOOP:
        return "it is a symbolic link; edge-agent opens shm segments only, never links"
    if exc.errno == errno.EACCES:
        return "edge-agent's user may not open it read-write: share it with the agent's group (chmod g+rw)"
    return os.strerror(exc.errno or 0)
