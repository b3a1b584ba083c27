"""Did code under test block an asyncio loop? Two judges: blocking calls seen on the loop's thread, and
asyncio's debug-mode reports of slow callbacks, judged so machine noise passes.

Blocking calls (deterministic). A Python audit hook sees every file open, directory listing, link, rename,
SQLite connect or subprocess the code makes; one made on a watched loop thread is blocking work on the loop
(a sysfs read for telemetry, a token file written and fsynced), however fast this disk answers. The import
machinery and linecache (source lines for asyncio's debug tracebacks) are left out: an import on the loop
happens once per process.

Slow callbacks (by time). asyncio measures a callback by wall time, so on the shared 2-core CI box a callback
also "takes" as long as its thread waits for a CPU or for the GIL while other threads hold it. Measured on
that box (load average 7-11) with an agent (4 apps inferring and keeping every result, uplink, MQTT telemetry
every 0.1 s, a policy change every 2 s) beside cloud-sync (3 MQTT devices at 20 Hz, admin API polled), 3 x 25 s:
a healthy loop's largest report was 0.09-0.11 s, and once 0.24 s (cloud-sync's start, while its MQTT threads
started); one-off reports of 0.31 s were seen before inside grpc's own request handler on a busy CI run. Real
blocking repeats (per request, per tick) or is long, so a loop fails on REPEATED reports (asyncio reports past
loop.slow_callback_duration, SLOW_CALLBACK_S by default), or on one of BLOCKED_S or more. Reports are counted
per loop (each LoopThread judges its own thread), so two loops in one test do not add up each other's noise.

Time spent waiting for a CPU is not the loop's doing. Since `make test` runs the suite in 3 processes on the
2 cores (pytest-xdist), a healthy loop thread was seen runnable but not running for 0.6-2.6 s at a time. So on
a LoopThread each callback is also timed by the kernel's own count of the thread's run-queue wait
(/proc/thread-self/schedstat, its second field), and a report is judged by its wall time less that wait:
blocking on I/O, a lock or a future still counts in full (the thread is not runnable then), a starved CPU
does not.

Nor is time in the garbage collector. A pytest worker holds 300,000+ objects after a few hundred tests, and one
full collection of them took 206 ms on a quiet box (2026-12-04); any thread's collection holds the GIL, so a
loop callback that overlapped one waited it out, whatever the callback does (CI once failed a cloud-sync test
on three such reports). Collections are timed process-wide (gc.callbacks) and discounted like CPU waits.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Iterable
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, TypeVar

SLOW_CALLBACK_S = 0.2
BLOCKED_S = 0.6
REPEATED = 2

T = TypeVar("T")

_REPORT = re.compile(r"^Executing (?P<what>.*) took (?P<seconds>[0-9.]+) seconds$", re.DOTALL)

# sys.audit events that mean the calling thread waits on a disk or another process.
BLOCKING_EVENTS = frozenset(
    {
        "open",
        "os.listdir",
        "os.scandir",
        "glob.glob",
        "os.link",
        "os.symlink",
        "os.remove",
        "os.rename",
        "os.mkdir",
        "os.rmdir",
        "os.truncate",
        "os.chmod",
        "shutil.copyfile",
        "shutil.rmtree",
        "sqlite3.connect",
        "subprocess.Popen",
        "os.system",
        "os.fork",
    }
)
_REPO = str(Path(__file__).resolve().parent.parent) + "/"
# Frames of these files mean the call is the import system's or linecache's, not the code under test's.
_EXEMPT_FILES = ("<frozen importlib._bootstrap", "linecache.py", "tokenize.py")


class _RunQueueWait:
    """Per watched loop thread: seconds its last callback spent runnable but waiting for a CPU, or waiting out a
    garbage collection.

    The schedstat file is opened by the thread itself (/proc/thread-self names the opening thread) before its
    blocking calls are watched; each callback then costs two pread() calls on it, which are no audit events.
    """

    def __init__(self) -> None:
        self._local = threading.local()
        # Seconds of garbage collection so far, all threads together, less what the collecting thread itself
        # waited for a CPU meanwhile when it is a watched one (counted as its run-queue wait already).
        self._gc_s = 0.0
        self._gc_began: tuple[float, int | None] = (0.0, None)
        gc.callbacks.append(self._on_gc)
        original = asyncio.events.Handle._run

        def timed(handle: asyncio.events.Handle) -> None:
            fd = getattr(self._local, "fd", None)
            if fd is None:
                original(handle)
                return
            before, collected = _waited_ns(fd), self._gc_s
            try:
                original(handle)
            finally:
                after = _waited_ns(fd)
                waited = (after - before) / 1e9 if before is not None and after is not None else 0.0
                self._local.last_s = waited + (self._gc_s - collected)

        asyncio.events.Handle._run = timed  # type: ignore[method-assign]

    def _on_gc(self, phase: str, info: dict[str, int]) -> None:
        """A collection holds the GIL throughout: every other thread waits it out, whatever it runs."""
        now = time.perf_counter()
        fd = getattr(self._local, "fd", None)
        waited = _waited_ns(fd) if fd is not None else None
        if phase == "start":
            self._gc_began = (now, waited)
            return
        began, waited_before = self._gc_began
        pause = now - began
        if waited is not None and waited_before is not None:
            pause -= (waited - waited_before) / 1e9
        self._gc_s += max(pause, 0.0)

    def start_on_this_thread(self) -> None:
        try:
            self._local.fd = os.open("/proc/thread-self/schedstat", os.O_RDONLY)
        except OSError:  # no schedstat: wall time alone, as before
            self._local.fd = None

    def stop_on_this_thread(self) -> None:
        fd = getattr(self._local, "fd", None)
        self._local.fd = None
        if fd is not None:
            os.close(fd)

    def last_s(self) -> float:
        """The wait of the callback that just ran on this thread (0.0 where not measured)."""
        return float(getattr(self._local, "last_s", 0.0))


def _waited_ns(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 128, 0).split()[1])
    except (OSError, IndexError, ValueError):
        return None


_RUN_QUEUE = _RunQueueWait()


class SlowCallbacks(logging.Handler):
    """Collects asyncio's reports of a callback that held the loop past loop.slow_callback_duration.

    With `thread` (an ident), only the reports of the loop running on that thread. Use as a context
    manager (attaches to the "asyncio" logger) or attach()/detach() it.
    """

    def __init__(self, thread: int | None = None) -> None:
        super().__init__(logging.WARNING)
        self.thread = thread
        self.reports: list[tuple[float, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        if self.thread is not None and record.thread != self.thread:
            return
        match = _REPORT.match(record.getMessage())
        if match:
            # Logged by the loop's thread right after the callback: its run-queue wait is this callback's.
            waited = _RUN_QUEUE.last_s()
            seconds = float(match["seconds"]) - waited
            if waited > 0 and seconds < SLOW_CALLBACK_S:
                return  # slow only for want of a CPU
            self.reports.append((seconds, match["what"][:300]))

    def attach(self) -> SlowCallbacks:
        logging.getLogger("asyncio").addHandler(self)
        return self

    def detach(self) -> None:
        logging.getLogger("asyncio").removeHandler(self)

    def __enter__(self) -> SlowCallbacks:
        return self.attach()

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.detach()

    def blocking(self) -> list[str]:
        """The reports that show the loop was blocked by code (see the module's docstring); [] if none."""
        if len(self.reports) >= REPEATED:
            chosen = self.reports
        else:
            chosen = [(seconds, what) for seconds, what in self.reports if seconds >= BLOCKED_S]
        return [f"{seconds:.3f} s in {what}" for seconds, what in chosen]


class BlockingCalls:
    """Blocking calls made on watched threads, seen by one process-wide audit hook (hooks cannot be removed,
    so there is one, installed on first use, and threads are watched and unwatched)."""

    _instance: BlockingCalls | None = None
    _lock = threading.Lock()

    def __init__(self) -> None:
        self._watched: dict[int, list[str]] = {}
        self._busy = threading.local()

    @classmethod
    def shared(cls) -> BlockingCalls:
        with cls._lock:
            if cls._instance is None:
                cls._instance = cls()
                sys.addaudithook(cls._instance._hook)
            return cls._instance

    def watch(self, thread: int) -> list[str]:
        """Start recording on `thread`; the list fills with one line per blocking call made there."""
        found: list[str] = []
        self._watched[thread] = found
        return found

    def unwatch(self, thread: int) -> None:
        self._watched.pop(thread, None)

    def _hook(self, event: str, args: tuple[Any, ...]) -> None:
        if event not in BLOCKING_EVENTS:
            return
        found = self._watched.get(threading.get_ident())
        if found is None or getattr(self._busy, "on", False):
            return
        self._busy.on = True  # what the hook itself does must not be judged
        try:
            where = _culprit(sys._getframe(1))
            if where is not None:
                found.append(f"{event}({_first_arg(args)}) at {where}")
        finally:
            self._busy.on = False


def _culprit(frame: FrameType | None) -> str | None:
    """Where the call came from: the chain of this repository's frames, innermost first (else the innermost
    frame), or None when the import system or linecache made it."""
    chain: list[str] = []
    innermost = None
    while frame is not None:
        filename = frame.f_code.co_filename
        if filename.startswith(_EXEMPT_FILES[0]) or filename.endswith(_EXEMPT_FILES[1:]):
            return None
        here = f"{filename.removeprefix(_REPO)}:{frame.f_lineno} in {frame.f_code.co_name}"
        innermost = innermost or here
        if filename.startswith(_REPO) and "/.venv" not in filename and filename != __file__ and len(chain) < 4:
            chain.append(here)
        frame = frame.f_back
    return " <- ".join(chain) if chain else innermost or "?"


def _first_arg(args: tuple[Any, ...]) -> str:
    return repr(args[0])[:120] if args else ""


class LoopThread:
    """An asyncio loop in debug mode on a named thread, as edge-agent runs its one loop.

    `slow` has its slow-callback reports, `calls` the blocking calls made on its thread (both judged by
    `blocking()`). `calls` may be cleared by a test that hands the loop work it knows blocks (none should).
    """

    def __init__(self, name: str = "test-loop") -> None:
        self.loop = asyncio.new_event_loop()
        self.loop.set_debug(True)
        self.loop.slow_callback_duration = SLOW_CALLBACK_S
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._started = threading.Event()
        self.calls: list[str] = []
        self.slow = SlowCallbacks()
        self.thread.start()
        self._started.wait(10)
        assert self.thread.ident is not None
        self.slow.thread = self.thread.ident
        self.slow.attach()

    def _run(self) -> None:
        _RUN_QUEUE.start_on_this_thread()  # before the watch: opening the file is no call of the code under test
        self.calls = BlockingCalls.shared().watch(threading.get_ident())
        self._started.set()
        try:
            self.loop.run_forever()
        finally:
            BlockingCalls.shared().unwatch(threading.get_ident())
            _RUN_QUEUE.stop_on_this_thread()

    def blocking(self, allow: Iterable[str] = ()) -> list[str]:
        """What shows the loop was blocked: blocking calls made on it, and slow callbacks past the rules.

        `allow` names code (a path, e.g. "edge_runtime/kserve/server.py") whose blocking calls a test knows of
        and accepts for now; each use says why, so the exceptions stay few and visible.
        """
        allowed = tuple(allow)
        calls = [c for c in self.calls if not any(a in c for a in allowed)]
        return [*calls, *self.slow.blocking()]

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        """Run a coroutine on the loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run fn(*args) on the loop thread and return its result (as the agent's own code would call it)."""

        async def run() -> T:
            return fn(*args)

        return self.run(run(), 10)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()
        self.slow.detach()
