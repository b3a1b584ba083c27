"""The agent's heap: malloc's mmap threshold pinned, and the start-up heap frozen out of the cyclic GC."""

from __future__ import annotations

import platform
import subprocess
import sys

from edgefleet.heap import limit_heap_retention


def test_the_heap_threshold_can_be_pinned_on_glibc() -> None:
    assert limit_heap_retention() == (platform.libc_ver()[0] == "glibc")


def test_the_startup_heap_leaves_the_gc_and_later_garbage_is_still_collected() -> None:
    # In a child process: freezing is for the life of a process, and this one runs every other test.
    script = """
import gc, weakref
import onnxruntime, grpc  # a start-up heap like the agent's
from edgefleet.heap import freeze_startup_heap
frozen = freeze_startup_heap()
class Node: pass
a, b = Node(), Node()
a.other, b.other = b, a  # a cycle: only the cyclic GC frees it
alive = weakref.ref(a)
del a, b
gc.collect()
print(frozen, gc.get_freeze_count(), alive() is None)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    frozen, count, collected = result.stdout.split()
    assert int(frozen) == int(count) > 10_000
    assert collected == "True"
