"""The agent's heap: resident memory kept flat, and the start-up heap kept out of Python's cyclic GC.

limit_heap_retention: measured with mobilenet-bench, the agent is at ~125 MiB when ready and grew 40-56 MiB
while serving, because glibc raises its mmap threshold after large frees and then keeps the freed ~600 KB
request buffers on the heap. Fixing the threshold at 128 KiB kept it at 123-139 MiB. glibc only.

freeze_startup_heap: importing onnxruntime, grpc, numpy, protobuf and the agent leaves ~55k objects that live
as long as the process, and every full collection walks them all. Hot paths that hold many young objects
(the outbox's pending appends, each with a Future) trigger such collections often: outbox appends measured
49k/s with the start-up heap in the GC and 69k/s with it frozen (gc.freeze), one thread, this 2-core box.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc

__all__ = ["freeze_startup_heap", "limit_heap_retention"]

_M_MMAP_THRESHOLD = -3  # from glibc's malloc.h


def limit_heap_retention(threshold_bytes: int = 128 * 1024) -> bool:
    """Pin malloc's mmap threshold (disabling its dynamic growth); False where that is not possible."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False  # not glibc (musl has no mallopt)
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, threshold_bytes))


def freeze_startup_heap() -> int:
    """Move every object alive now to the GC's permanent generation; returns how many are frozen.

    O(1). Start-up garbage not yet collected stays for the life of the process (a one-off, small);
    objects made later are collected as usual.
    """
    gc.freeze()
    return gc.get_freeze_count()
