"""The control transport over gRPC to cloud-sync, the embedded default when no MQTT broker is configured.

A WatchDesired server stream brings the desired state (and says the device is online while it is open);
Report and PublishTelemetry are unary calls. Same credential, TLS and loopback rules as the uplink.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

import grpc
import structlog

from edge_runtime.config import CloudSection
from edge_runtime.sync.control import DesiredHandler
from edge_runtime.sync.uplink import Backoff, CloudChannel
from edgefleet.proto.edgefleet.v1 import services_pb2, services_pb2_grpc
from edgefleet.proto.edgefleet.v1.state_pb2 import ReportedState

__all__ = ["WATCH_OPEN_METADATA", "ControlCounters", "GrpcControl"]

T = TypeVar("T")
log = structlog.get_logger(__name__)

# The initial metadata cloud-sync sends once it accepted a WatchDesired stream (credential checked, presence
# written): until then the device is not "connected", whatever the channel says.
WATCH_OPEN_METADATA = ("edgefleet-watch", "open")
CALL_TIMEOUT_S = 10.0
PUBLISH_TELEMETRY_METHOD = "/edgefleet.v1.Control/PublishTelemetry"
# Refusals a person must fix (a revoked device, a cloud-sync without the Control service): retry at the cap.
_PERMANENT = {
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.UNIMPLEMENTED,
}
# A message the cloud refused as such: sending it again gets the same answer.
_REFUSED_MESSAGE = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND}


@dataclass(frozen=True)
class ControlCounters:
    """What the transport did since it started (a snapshot, for tests and logs)."""

    connects: int  # WatchDesired streams the cloud accepted
    desired_received: int
    telemetry_sent: int
    telemetry_replaced: int  # held while it could not go, and overwritten by a newer one
    reported_sent: int
    refused: int  # messages the cloud refused (INVALID_ARGUMENT...), dropped


class _Latest(Generic[T]):
    """A one-message mailbox: `put` replaces what is waiting (counted), `take` waits for something."""

    def __init__(self) -> None:
        self._value: T | None = None
        self._ready = asyncio.Event()
        self.replaced = 0

    def put(self, value: T) -> None:
        if self._value is not None:
            self.replaced += 1
        self._value = value
        self._ready.set()

    def restore(self, value: T) -> None:
        """Put back a message that could not be sent, unless a newer one arrived meanwhile."""
        if self._value is None:
            self._value = value
            self._ready.set()
        else:
            self.replaced += 1

    async def take(self) -> T:
        while self._value is None:
            self._ready.clear()
            await self._ready.wait()
        value, self._value = self._value, None
        self._ready.clear()
        return value


class GrpcControl:
    """The Control service of cloud-sync as a ControlTransport; everything runs as tasks on the agent's loop.

    The stream resumes with `known_generation` (the highest generation received so far), so after a reconnect
    the cloud sends only a newer desired state. Telemetry and reported state go only while the stream is open
    (the cloud is reachable and accepted the credential); a failed send keeps the message unless a newer one
    came, and tries again after a backoff.
    """

    def __init__(
        self,
        cloud: CloudSection,
        device_id: str,
        token: str,
        *,
        known_generation: int = 0,
        backoff: Backoff | None = None,
        channel: CloudChannel | None = None,
    ) -> None:
        """`channel`: what CloudChannel.read(cloud) gave, when the caller read it already.

        Reads cloud.ca_file and checks cloud.grpc_target here (ConfigError naming the key), so construct it off
        the loop, before anything starts: `start` then opens the channel without touching the disk.
        """
        self.device_id = device_id
        self.known_generation = known_generation
        self._cloud_channel = channel or CloudChannel.read(cloud)
        self._metadata = (("authorization", f"Bearer {token}"),)
        self._backoff = backoff or Backoff()
        self._telemetry: _Latest[bytes] = _Latest()
        self._reported: _Latest[ReportedState] = _Latest()
        self._up = asyncio.Event()
        self._tasks: list[asyncio.Future[None]] = []
        self._channel: grpc.aio.Channel | None = None
        self._counts = {"connects": 0, "desired": 0, "telemetry": 0, "reported": 0, "refused": 0}
        self._started = self._closed = False

    @property
    def connected(self) -> bool:
        return self._up.is_set()

    def start(self, on_desired: DesiredHandler | None = None) -> None:
        """Open the channel and start the stream and the senders (on the loop); returns at once."""
        if self._started or self._closed:
            raise RuntimeError("GrpcControl.start() called twice or after aclose()")
        self._started = True
        self._channel = channel = self._cloud_channel.open()
        stub = services_pb2_grpc.ControlStub(channel)
        # Telemetry goes as the bytes the collector made: the stub would parse and serialize it once more.
        publish = channel.unary_unary(
            PUBLISH_TELEMETRY_METHOD,
            request_serializer=bytes,
            response_deserializer=services_pb2.ReportAck.FromString,
        )

        async def send_telemetry(payload: bytes) -> None:
            await publish(payload, metadata=self._metadata, timeout=CALL_TIMEOUT_S)

        self._tasks = [
            asyncio.ensure_future(self._watch(stub, on_desired or (lambda _state: None))),
            asyncio.ensure_future(self._send_loop("telemetry", self._telemetry, send_telemetry)),
            asyncio.ensure_future(self._send_loop("reported", self._reported, lambda s: self._report(stub, s))),
        ]
        log.info("control.started", transport="grpc", target=self._cloud_channel.target)

    def publish_telemetry(self, payload: bytes) -> None:
        if not self._closed:
            self._telemetry.put(payload)

    def publish_reported(self, state: ReportedState) -> None:
        if not self._closed:
            self._reported.put(state)

    def counters(self) -> ControlCounters:
        c = self._counts
        return ControlCounters(
            c["connects"], c["desired"], c["telemetry"], self._telemetry.replaced, c["reported"], c["refused"]
        )

    async def aclose(self) -> None:
        """Cancel the stream (the cloud marks the device offline) and the senders, close the channel."""
        if self._closed:
            return
        self._closed = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._up.clear()
        if self._channel is not None:
            await self._channel.close()
        log.info("control.closed", transport="grpc")

    # -- the stream -------------------------------------------------------------------------------------

    async def _watch(self, stub: services_pb2_grpc.ControlStub, on_desired: DesiredHandler) -> None:
        failures = 0
        while True:
            try:
                await self._stream(stub, on_desired)
                delay, failures = self._backoff.next_delay(), 0  # the cloud ended it (a restart): come back soon
                log.info("control.stream_ended", retry_in_s=round(delay, 3))
            except grpc.aio.AioRpcError as exc:
                failures += 1
                delay = self._failed(exc.code(), exc.details() or "", failures)
            except Exception as exc:  # a bug: keep the transport alive and say why
                failures += 1
                log.exception("control.error", error=repr(exc))
                delay = self._failed(grpc.StatusCode.UNKNOWN, repr(exc), failures)
            finally:
                self._up.clear()
            await asyncio.sleep(delay)

    async def _stream(self, stub: services_pb2_grpc.ControlStub, on_desired: DesiredHandler) -> None:
        request = services_pb2.WatchDesiredRequest(known_generation=self.known_generation)
        call = stub.WatchDesired(request, metadata=self._metadata)
        try:
            if WATCH_OPEN_METADATA not in tuple(await call.initial_metadata() or ()):
                async for _ in call:  # raises the refusal (UNAUTHENTICATED...) the stream ended with
                    pass
                return
            self._counts["connects"] += 1
            self._backoff.reset()
            self._up.set()
            log.info("control.connected", transport="grpc", known_generation=self.known_generation)
            async for state in call:
                self._counts["desired"] += 1
                self.known_generation = max(self.known_generation, state.generation)
                try:
                    on_desired(state)
                except Exception:  # a bug in the handler must not end the stream
                    log.exception("control.desired_handler_failed", generation=state.generation)
        finally:
            call.cancel()

    def _failed(self, code: grpc.StatusCode, details: str, failures: int) -> float:
        if code in _PERMANENT:
            delay = self._backoff.cap_s
            log.error("control.refused", code=code.name, details=details, retry_in_s=delay)
            return delay
        delay = self._backoff.next_delay()
        if failures in (1, 10) or failures % 100 == 0:
            log.warning(
                "control.unavailable", code=code.name, details=details, failures=failures, retry_in_s=round(delay, 3)
            )
        return delay

    # -- the senders ------------------------------------------------------------------------------------

    async def _send_loop(self, what: str, mailbox: _Latest[T], send: Callable[[T], Awaitable[None]]) -> None:
        """Send what `mailbox` holds while the stream is open; keep it through failures (unless replaced)."""
        backoff = Backoff(base_s=self._backoff.base_s, cap_s=self._backoff.cap_s)
        while True:
            await self._up.wait()
            message = await mailbox.take()
            if not self._up.is_set():  # the stream closed meanwhile: a newer message may replace this one
                mailbox.restore(message)
                continue
            try:
                await send(message)
                backoff.reset()
                self._counts[what] += 1
            except Exception as exc:
                if not isinstance(exc, grpc.aio.AioRpcError):  # a bug: this message is lost, the sender lives
                    log.exception("control.send_error", message=what, error=repr(exc))
                    continue
                if exc.code() in _REFUSED_MESSAGE:
                    self._counts["refused"] += 1
                    log.error("control.message_refused", message=what, code=exc.code().name, details=exc.details())
                    continue
                mailbox.restore(message)
                delay = backoff.next_delay()
                log.debug("control.send_failed", message=what, code=exc.code().name, retry_in_s=round(delay, 3))
                await asyncio.sleep(delay)  # then it waits for the stream to be open again, if it closed

    async def _report(self, stub: services_pb2_grpc.ControlStub, state: ReportedState) -> None:
        await stub.Report(state, metadata=self._metadata, timeout=CALL_TIMEOUT_S)
