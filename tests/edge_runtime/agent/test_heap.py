"""The agent pins malloc's mmap threshold so freed request buffers leave its resident memory."""

from __future__ import annotations

import platform

from edge_runtime.agent.heap import limit_heap_retention


def test_the_heap_threshold_can_be_pinned_on_glibc() -> None:
    assert limit_heap_retention() == (platform.libc_ver()[0] == "glibc")
