"""The device-facing Control service: desired state down a WatchDesired stream, reported state and telemetry up.

The embedded control transport when no MQTT broker is configured. The device's identity comes from its token,
never from a message; a device is online while its WatchDesired stream is open (presence as MQTT's status).
Not the store (cloud_sync/store/control.py) nor the checks of telemetry (cloud_sync/telemetry/validation.py).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NoReturn, TypeVar

import grpc
import structlog
from prometheus_client import CollectorRegistry, Counter

from cloud_sync.errors import CloudSyncError, InvalidArgument
from cloud_sync.status import INTERNAL_MESSAGE, grpc_code, unexpected_error_fields
from cloud_sync.store.control import ControlStore
from cloud_sync.store.database import now_ms
from cloud_sync.store.telemetry import StatusReceived, TelemetryReceived, TelemetryStore
from cloud_sync.telemetry.validation import Rejected, check_telemetry
from cloud_sync.uplink import DeviceAuthenticator, bearer_token
from edgefleet.proto.edgefleet.v1 import services_pb2
from edgefleet.proto.edgefleet.v1.state_pb2 import DesiredState, ReportedState
from edgefleet.proto.edgefleet.v1.telemetry_pb2 import Telemetry

__all__ = ["WATCH_OPEN_METADATA", "ControlServicer", "DesiredChanges", "Presence"]

T = TypeVar("T")
log = structlog.get_logger(__name__)

# Sent as the stream's initial metadata once it is accepted: the device counts itself connected from then on.
WATCH_OPEN_METADATA = (("edgefleet-watch", "open"),)
# How often open streams look for desired states written by another replica (or another process). One query
# for every device watched here, not one per stream.
POLL_S = 2.0
# How often an open WatchDesired stream checks its device's credential again: a device revoked on another
# replica loses its stream within this (plus the authenticator's cache); one revoked here loses it at once.
RECHECK_S = 10.0


class DesiredChanges:
    """Wakes the WatchDesired streams of a device when its desired state changes.

    `ControlStore.set_desired` in this process notifies at once (from its thread, through the loop); a change
    written elsewhere is found by `poll`, which reads the generations of every watched device in one query.
    """

    def __init__(self, store: ControlStore, loop: asyncio.AbstractEventLoop) -> None:
        self._store = store
        self._loop = loop
        self._waiters: dict[str, set[asyncio.Event]] = {}
        self._seen: dict[str, int] = {}
        store.on_desired(self._changed_elsewhere)

    def watch(self, device_id: str) -> asyncio.Event:
        """An event set whenever `device_id`'s desired state may have changed (call on the loop)."""
        event = asyncio.Event()
        self._waiters.setdefault(device_id, set()).add(event)
        return event

    def unwatch(self, device_id: str, event: asyncio.Event) -> None:
        waiters = self._waiters.get(device_id)
        if waiters is not None:
            waiters.discard(event)
            if not waiters:
                del self._waiters[device_id]
                self._seen.pop(device_id, None)

    def notify(self, device_id: str, generation: int) -> None:
        """On the loop: wake the device's streams if `generation` is news."""
        if generation <= self._seen.get(device_id, 0):
            return
        self._seen[device_id] = generation
        for event in self._waiters.get(device_id, ()):
            event.set()

    def wake(self, device_id: str) -> None:
        """On the loop: wake every stream of `device_id` (to check its credential again)."""
        for event in self._waiters.get(device_id, ()):
            event.set()

    def revoked(self, device_id: str) -> None:
        """From any thread: `device_id` was revoked; its open streams check their credential now."""
        with contextlib.suppress(RuntimeError):  # the loop is closed: cloud-sync is stopping
            self._loop.call_soon_threadsafe(self.wake, device_id)

    def _changed_elsewhere(self, device_id: str, generation: int) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: cloud-sync is stopping
            self._loop.call_soon_threadsafe(self.notify, device_id, generation)

    async def poll(self, executor: ThreadPoolExecutor, interval_s: float = POLL_S) -> None:
        """Until cancelled: every `interval_s`, wake the streams of devices whose generation moved."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(interval_s)
            if not self._waiters:
                continue
            try:
                found = await loop.run_in_executor(executor, self._store.desired_generations, list(self._waiters))
            except CloudSyncError as exc:
                log.warning("control.poll_failed", error=exc.message)
                continue
            for device_id, generation in found.items():
                self.notify(device_id, generation)


class Presence:
    """Online while a device has a WatchDesired stream open here; stored as MQTT's status messages are.

    Writes go through one thread, in the order the streams opened and closed, so a quick reconnect cannot
    store its `online` before the previous stream's `offline`.
    """

    def __init__(self, store: TelemetryStore) -> None:
        self._store = store
        self._open: dict[str, int] = {}
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="presence")

    def opened(self, device_id: str) -> Awaitable[None]:
        self._open[device_id] = self._open.get(device_id, 0) + 1
        return self._write(device_id, True) if self._open[device_id] == 1 else _done()

    def closed(self, device_id: str) -> Awaitable[None]:
        left = self._open.get(device_id, 0) - 1
        if left > 0:
            self._open[device_id] = left
            return _done()
        self._open.pop(device_id, None)
        return self._write(device_id, False)

    def _write(self, device_id: str, online: bool) -> Awaitable[None]:
        status = StatusReceived(device_id, online, now_ms())
        return asyncio.get_running_loop().run_in_executor(self._writer, self._store.write, [status])

    def close(self) -> None:
        """Wait for the presence writes queued (blocking: call it off the loop)."""
        self._writer.shutdown(wait=True)


async def _done() -> None:
    return None


class ControlMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.calls = Counter("cloud_sync_control_calls", "Control calls answered", ["method"], registry=registry)
        self.refused = Counter(
            "cloud_sync_control_refused", "Control calls refused", ["method", "code"], registry=registry
        )
        # Every method (and the refusals an operator alerts on) at 0 before its first call.
        for method in ("WatchDesired", "Report", "PublishTelemetry"):
            self.calls.labels(method)
            for code in ("UNAUTHENTICATED", "PERMISSION_DENIED", "INVALID_ARGUMENT", "INTERNAL"):
                self.refused.labels(method, code)


class ControlServicer:
    """edgefleet.v1.Control over the store; every store call runs on `executor`, never on the loop."""

    def __init__(
        self,
        auth: DeviceAuthenticator,
        control: ControlStore,
        telemetry: TelemetryStore,
        executor: ThreadPoolExecutor,
        changes: DesiredChanges,
        registry: CollectorRegistry | None = None,
        *,
        max_telemetry_bytes: int = 64 * 1024,
    ) -> None:
        self._auth = auth
        self._control = control
        self._telemetry = telemetry
        self._executor = executor
        self._changes = changes
        self.presence = Presence(telemetry)
        self._max_telemetry_bytes = max_telemetry_bytes
        self._metrics = ControlMetrics(registry or CollectorRegistry())

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def _device(self, context: grpc.aio.ServicerContext) -> str:
        return await self._run(self._auth.device_for, bearer_token(context.invocation_metadata()))

    async def WatchDesired(
        self, request: services_pb2.WatchDesiredRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[DesiredState]:
        device_id = "?"
        known = request.known_generation
        try:
            token = bearer_token(context.invocation_metadata())
            device_id = await self._run(self._auth.device_for, token)
        except Exception as exc:
            await self._refuse(context, "WatchDesired", device_id, exc)
        self._metrics.calls.labels("WatchDesired").inc()
        await self.presence.opened(device_id)
        wake = self._changes.watch(device_id)
        log.info("control.watching", device=device_id, known_generation=known)
        try:
            await context.send_initial_metadata(WATCH_OPEN_METADATA)
            while True:
                # Cleared before both checks, so a wake-up that comes during them is kept for the wait below. (It
                # was cleared before the desired state's read alone: a revocation that woke the stream while its
                # credential was checked, or before the first pass, waited out RECHECK_S; CI caught it.)
                wake.clear()
                try:
                    # Revoked since the stream opened: the stream ends (the device's retries are refused).
                    await self._run(self._auth.device_for, token)
                    state = await self._run(self._control.desired, device_id)
                except Exception as exc:
                    await self._refuse(context, "WatchDesired", device_id, exc)
                if state is not None and state.generation > known:
                    known = state.generation
                    yield state
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(wake.wait(), RECHECK_S)
        finally:
            self._changes.unwatch(device_id, wake)
            # Shielded: a cancelled stream (the device went away) must still be recorded as offline.
            await asyncio.shield(self.presence.closed(device_id))
            log.info("control.unwatched", device=device_id)

    async def Report(self, request: ReportedState, context: grpc.aio.ServicerContext) -> services_pb2.ReportAck:
        device_id = "?"
        try:
            device_id = await self._device(context)
            await self._run(self._control.report, device_id, request)
        except Exception as exc:
            await self._refuse(context, "Report", device_id, exc)
        self._metrics.calls.labels("Report").inc()
        log.info("control.reported", device=device_id, generation=request.generation, error=request.error or None)
        return services_pb2.ReportAck()

    async def PublishTelemetry(self, request: Telemetry, context: grpc.aio.ServicerContext) -> services_pb2.ReportAck:
        device_id = "?"
        try:
            device_id = await self._device(context)
            payload = request.SerializeToString()
            try:
                message = check_telemetry(device_id, payload, max_bytes=self._max_telemetry_bytes)
            except Rejected as exc:
                raise InvalidArgument(f"telemetry refused ({exc.reason}): {exc.detail}") from None
            await self._run(self._telemetry.write, [TelemetryReceived(device_id, message, payload, now_ms())])
        except Exception as exc:
            await self._refuse(context, "PublishTelemetry", device_id, exc)
        self._metrics.calls.labels("PublishTelemetry").inc()
        return services_pb2.ReportAck()

    async def _refuse(self, context: grpc.aio.ServicerContext, method: str, device_id: str, exc: Exception) -> NoReturn:
        """Abort the call with the status `exc` maps to (cloud_sync/status.py); never returns."""
        if isinstance(exc, grpc.aio.AbortError):
            raise exc  # a malformed message, aborted with its reason by the parsing wrapper
        if isinstance(exc, CloudSyncError):
            code, message = grpc_code(exc), exc.message
            log.warning("control.refused", method=method, device=device_id, error=type(exc).__name__, reason=message)
        else:
            # Else grpc answers UNKNOWN with the exception's text and logs the traceback with its locals.
            code, message = grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE
            log.error("control.internal_error", method=method, device=device_id, **unexpected_error_fields(exc))
        self._metrics.refused.labels(method, code.name).inc()
        await context.abort(code, message)
        raise AssertionError("context.abort returned")  # pragma: no cover
