"""The agent's uploader: streams outbox batches to cloud-sync and deletes what the cloud acknowledged.

Runs on the agent's event loop (grpc.aio); SQLite reads and acks go to one named thread. Nothing is deleted
before the cloud's ack, and a batch's range is marked in doubt before it is sent (DESIGN.md "Data plane"),
so a crash, a lost ack or a cloud outage at any point loses nothing and evicts nothing the cloud may hold.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import structlog

from edge_runtime.config import CloudSection, UploadPolicy
from edge_runtime.errors import ConfigError
from edge_runtime.kserve.server import parse_tcp_address
from edge_runtime.outbox import Outbox, UploadBatch
from edge_runtime.sync.tls import REFUSED_CERTIFICATE_HINT, warn_if_unusable
from edgefleet.addresses import is_loopback
from edgefleet.proto.edgefleet.v1 import results_pb2, services_pb2_grpc

__all__ = ["Backoff", "CloudChannel", "Pacer", "UplinkStatus", "Uploader", "read_token"]

log = structlog.get_logger(__name__)

# Bytes of records per batch; with batch_max_records it bounds a message well under cloud-sync's limit.
MAX_BATCH_BYTES = 4 * 1024 * 1024
# Batches sent in one stream before asking for the ack (each ack deletes, so this bounds re-sends).
BATCHES_PER_STREAM = 16
CALL_TIMEOUT_S = 120.0
# gzip only pays when the sample shrinks below this share of its size (float tensors barely compress).
COMPRESS_BELOW = 0.8
SAMPLE_BYTES = 64 * 1024
# These codes mean the cloud will refuse again until a person acts: retry slowly.
_PERMANENT = {
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.UNIMPLEMENTED,
}


class _CloudBehind(Exception):
    """The cloud's ack went backwards; retrying slowly is all the device can do."""


@dataclass
class Backoff:
    """Exponential backoff with full jitter (each delay uniform in [0, min(cap, base * 2**n)])."""

    base_s: float = 0.2
    cap_s: float = 30.0
    failures: int = 0
    rng: random.Random = field(default_factory=random.Random)

    def next_delay(self) -> float:
        ceiling = min(self.cap_s, self.base_s * 2 ** min(self.failures, 30))
        self.failures += 1
        return self.rng.uniform(0, ceiling)

    def reset(self) -> None:
        self.failures = 0


@dataclass
class Pacer:
    """Holds upload.max_bytes_per_s: a token bucket one second deep; 0 = no cap."""

    rate: int
    _tokens: float = 0.0
    _at: float = field(default_factory=time.monotonic)

    def delay_for(self, nbytes: int, now: float) -> float:
        """Seconds to wait before sending `nbytes`; the bytes are taken from the bucket."""
        if self.rate <= 0:
            return 0.0
        self._tokens = min(float(self.rate), self._tokens + (now - self._at) * self.rate)
        self._at = now
        self._tokens -= nbytes
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate


@dataclass
class UplinkStatus:
    """What telemetry and logs say about the uplink."""

    connected: bool = False
    uploaded_total: int = 0
    acked_seq: int = 0
    last_success_ms: int = 0
    consecutive_failures: int = 0
    last_error: str = ""
    failures: dict[str, int] = field(default_factory=dict)  # gRPC code name -> failed streams


def read_token(config: CloudSection) -> str:
    if not config.token_file:
        raise ConfigError("cloud.token_file is not set: the uplink needs the device token given at enrollment")
    try:
        token = Path(config.token_file).read_text().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read cloud.token_file {config.token_file}: {exc.strerror}") from exc
    if not token:
        raise ConfigError(f"cloud.token_file {config.token_file} is empty")
    return token


# What a PEM CA bundle holds; without it grpc would accept the bytes and fail every handshake, obscurely.
PEM_CERTIFICATE = b"-----BEGIN CERTIFICATE-----"


@dataclass(frozen=True)
class CloudChannel:
    """Where cloud-sync listens and the CA that vouches for it, read and checked once from the config, off the
    loop (`read` opens cloud.ca_file); `open` then makes a channel on the loop without touching the disk.

    TLS when cloud.ca_file is set; plaintext only to a loopback cloud-sync (development). With
    cloud.client_cert_file and client_key_file the channel offers that certificate to a cloud-sync that asks
    for one (tls.client_ca_file there); one that asks for none never sees it.
    """

    target: str
    root_certificates: bytes | None = None  # None: plaintext
    client_key: bytes | None = None
    client_chain: bytes | None = None

    @classmethod
    def read(cls, config: CloudSection) -> CloudChannel:
        """The channel `config` asks for; ConfigError naming the key when it cannot be used."""
        host, port = parse_tcp_address(config.grpc_target, "cloud.grpc_target")
        if port == 0:
            raise ConfigError(f"cloud.grpc_target {config.grpc_target!r} needs cloud-sync's port, not 0")
        if config.ca_file:
            key, chain = _read_client_certificate(config)
            warn_if_unusable(config.client_cert_file, "cloud-sync")
            return cls(config.grpc_target, _read_ca(config.ca_file), key, chain)
        if not is_loopback(host):
            raise ConfigError(
                f"cloud.grpc_target {config.grpc_target} is not loopback: set cloud.ca_file to upload over TLS"
            )
        return cls(config.grpc_target)

    def open(self) -> grpc.aio.Channel:
        """A grpc.aio channel to cloud-sync (call on the loop that will use it)."""
        options = [("grpc.max_send_message_length", -1), ("grpc.keepalive_time_ms", 30_000)]
        if self.root_certificates is None:
            return grpc.aio.insecure_channel(self.target, options=options)
        credentials = grpc.ssl_channel_credentials(self.root_certificates, self.client_key, self.client_chain)
        return grpc.aio.secure_channel(self.target, credentials, options=options)


def _read_client_certificate(config: CloudSection) -> tuple[bytes | None, bytes | None]:
    """cloud.client_key_file and client_cert_file (PEM), both or neither; ConfigError naming the key."""
    if bool(config.client_cert_file) != bool(config.client_key_file):
        raise ConfigError("set both cloud.client_cert_file and cloud.client_key_file, or neither")
    if not config.client_cert_file:
        return None, None
    files = {"cloud.client_key_file": config.client_key_file, "cloud.client_cert_file": config.client_cert_file}
    read = {}
    for key, path in files.items():
        try:
            read[key] = Path(path).read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read {key} {path}: {exc.strerror}") from exc
    if PEM_CERTIFICATE not in read["cloud.client_cert_file"]:
        raise ConfigError(f"cloud.client_cert_file {config.client_cert_file} holds no PEM certificate")
    if b"PRIVATE KEY-----" not in read["cloud.client_key_file"]:
        raise ConfigError(f"cloud.client_key_file {config.client_key_file} holds no PEM private key")
    return read["cloud.client_key_file"], read["cloud.client_cert_file"]


def _read_ca(path: str) -> bytes:
    try:
        ca = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read cloud.ca_file {path}: {exc.strerror}") from exc
    if PEM_CERTIFICATE not in ca:
        raise ConfigError(f"cloud.ca_file {path} holds no PEM certificate (-----BEGIN CERTIFICATE-----)")
    return ca


def compressible(batch: UploadBatch) -> bool:
    """Whether gzip pays for this batch, judged on a fast compression of its first bytes."""
    sample = batch.message.SerializeToString()[:SAMPLE_BYTES]
    return len(sample) > 4096 and len(zlib.compress(sample, 1)) < COMPRESS_BELOW * len(sample)


class Uploader:
    def __init__(
        self,
        outbox: Outbox,
        config: CloudSection,
        policy: UploadPolicy,
        token: str,
        *,
        channel: CloudChannel | None = None,
    ) -> None:
        """`channel`: what CloudChannel.read(config) gave, when the caller read it already.

        Raises ConfigError naming the key for a cloud.ca_file that cannot be read or plaintext to a remote
        cloud-sync: construct it off the loop, before anything starts (the agent does, in Agent.__init__),
        so a bad config fails the start rather than a task nobody awaits.
        """
        self._outbox = outbox
        self._channel = channel or CloudChannel.read(config)
        self.policy = policy
        self._metadata = (("authorization", f"Bearer {token}"),)
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="uplink-io")
        self._pacer = Pacer(policy.max_bytes_per_s)
        self._backoff = Backoff()
        self.status = UplinkStatus()
        self._wake = asyncio.Event()
        # The previous stream's ack (deleting on the I/O thread) and the next range, read meanwhile.
        self._pending_ack: asyncio.Future[int] | None = None
        self._prefetched: asyncio.Future[tuple[list[UploadBatch], bool]] | None = None

    def apply_policy(self, policy: UploadPolicy) -> None:
        self.policy = policy
        self._pacer.rate = policy.max_bytes_per_s

    def kick(self) -> None:
        """Look for records now rather than at the next interval (call on the loop)."""
        self._wake.set()

    async def run(self) -> None:
        """Upload until cancelled; errors are logged and retried, never raised."""
        channel = self._channel.open()
        stub = services_pb2_grpc.UplinkStub(channel)
        log.info(
            "uplink.started",
            target=self._channel.target,
            tls=self._channel.root_certificates is not None,
            client_certificate=self._channel.client_chain is not None,
        )
        try:
            while True:
                delay = await self._cycle(stub)
                if delay > 0:
                    self._wake.clear()
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), delay)
        finally:
            await channel.close()
            self._io.shutdown(wait=False)

    async def _cycle(self, stub: services_pb2_grpc.UplinkStub) -> float:
        """One upload stream; returns how long to wait before the next (0: go on at once)."""
        try:
            sent = await self._stream(stub)
        except grpc.aio.AioRpcError as exc:
            await self._discard_pipeline()
            return self._failed(exc.code(), exc.details() or "")
        except _CloudBehind as exc:
            await self._discard_pipeline()
            return self._failed(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except asyncio.CancelledError:
            await self._discard_pipeline()
            raise
        except Exception as exc:  # a bug or a local I/O failure: keep the uploader alive, say why
            log.exception("uplink.error", error=repr(exc))
            await self._discard_pipeline()
            return self._failed(grpc.StatusCode.UNKNOWN, repr(exc))
        if not sent:
            # Nothing to send: no call was made, so this says nothing about the link either way.
            return self.policy.interval_s
        self._backoff.reset()
        self.status.connected = True
        self.status.consecutive_failures = 0
        return 0.0

    async def _discard_pipeline(self) -> None:
        """After a failed stream: let the ack and the read in flight finish; the next stream starts from the
        outbox's acked_seq again (a prefetched range is re-read, never skipped)."""
        pending = [f for f in (self._pending_ack, self._prefetched) if f is not None]
        self._pending_ack = self._prefetched = None
        for outcome in await asyncio.gather(*pending, return_exceptions=True):
            if isinstance(outcome, BaseException) and not isinstance(outcome, asyncio.CancelledError):
                log.warning("uplink.pipeline_error", error=repr(outcome))

    def _failed(self, code: grpc.StatusCode, details: str) -> float:
        self.status.connected = False
        self.status.consecutive_failures += 1
        self.status.last_error = f"{code.name}: {details}"
        self.status.failures[code.name] = self.status.failures.get(code.name, 0) + 1
        if code in _PERMANENT:
            delay = self._backoff.cap_s
            log.error("uplink.refused", code=code.name, details=details, retry_in_s=delay)
        else:
            delay = self._backoff.next_delay()
            if self.status.consecutive_failures in (1, 10) or self.status.consecutive_failures % 100 == 0:
                hint = {}
                if self._channel.client_chain is not None and "Socket closed" in details:
                    hint = {"hint": REFUSED_CERTIFICATE_HINT}
                log.warning(
                    "uplink.unavailable",
                    code=code.name,
                    details=details,
                    failures=self.status.consecutive_failures,
                    retry_in_s=round(delay, 3),
                    **hint,
                )
        return delay

    async def _stream(self, stub: services_pb2_grpc.UplinkStub) -> bool:
        """One stream: send the next range, take the ack. While the cloud stores this range the I/O thread
        reads the next one and marks it in doubt, and after the ack deletes this one, so device and cloud work
        overlap (measured: the device's read + mark and the cloud's ingest each take ~7.5 us a record here;
        run one after the other they bounded the drain at ~66k records/s)."""
        loop = asyncio.get_running_loop()
        await self._settle_ack(wait=False)
        prefetched, self._prefetched = self._prefetched, None
        batches, gzip = await (prefetched or loop.run_in_executor(self._io, self._next_batches, None))
        if not batches:
            await self._settle_ack(wait=True)
            return False
        first_after, through = batches[0].after_seq, batches[-1].through_seq
        # The next range, read and marked in doubt meanwhile (the I/O thread runs jobs in order). Marking it
        # before it is sent only spares it from eviction a stream early; it is re-read if this stream fails.
        self._prefetched = loop.run_in_executor(self._io, self._next_batches, through)
        call = stub.Upload(
            metadata=self._metadata,
            timeout=CALL_TIMEOUT_S,
            compression=grpc.Compression.Gzip if gzip else grpc.Compression.NoCompression,
        )
        for batch in batches:
            await self._pace(batch)
            await call.write(batch.message)
        await call.done_writing()
        ack: results_pb2.UploadAck = await call
        if ack.acked_seq < first_after:
            # The cloud acknowledges less than it did before: it lost records (a restored database).
            log.error(
                "uplink.cloud_behind",
                cloud_acked_seq=ack.acked_seq,
                device_acked_seq=first_after,
                hint="cloud-sync's store lost data the device already deleted; check its backups",
            )
            raise _CloudBehind(f"cloud-sync acknowledged seq {ack.acked_seq}, below the {first_after} it had")
        if ack.rejected_seqs:
            log.warning(
                "uplink.rejected",
                rejected=ack.rejected,
                seqs=list(ack.rejected_seqs[:10]),
                hint="these records were quarantined (by cloud-sync, or here when damaged) and count as rejected",
            )
        await self._settle_ack(wait=True)  # the previous stream's, queued before this one's
        acked = loop.run_in_executor(self._io, self._ack, min(ack.acked_seq, through), frozenset(ack.rejected_seqs))
        if ack.acked_seq >= through:
            self._pending_ack = acked  # deleting while the next stream goes out
        else:
            # Not all of the range is accounted for (a gap the cloud waits on): the next stream starts at the
            # ack, so the range read after this one is not the next.
            self.status.acked_seq = await acked
            await self._drop_prefetched()
        self.status.uploaded_total += ack.stored
        self.status.last_success_ms = int(time.time() * 1000)
        return True

    async def _drop_prefetched(self) -> None:
        prefetched, self._prefetched = self._prefetched, None
        if prefetched is not None:
            await asyncio.gather(prefetched, return_exceptions=True)  # an error comes again when it is re-read

    async def _settle_ack(self, *, wait: bool) -> None:
        """Take the previous stream's ack once its delete finished (now, with `wait`); its error is raised."""
        pending = self._pending_ack
        if pending is not None and (wait or pending.done()):
            self._pending_ack = None
            self.status.acked_seq = await pending

    def _next_batches(self, after_seq: int | None) -> tuple[list[UploadBatch], bool]:
        """The next stream's batches, marked in doubt, and whether gzip pays for them (judged here, on the I/O
        thread, so the loop never serializes a batch only to sample it)."""
        batches = self._outbox.next_batches(
            BATCHES_PER_STREAM, self.policy.batch_max_records, MAX_BATCH_BYTES, after_seq=after_seq, timeout=30
        )
        return batches, bool(batches) and compressible(batches[0])

    def _ack(self, seq: int, rejected: frozenset[int]) -> int:
        return self._outbox.ack(seq, rejected).result(timeout=30)

    async def _pace(self, batch: UploadBatch) -> None:
        delay = self._pacer.delay_for(batch.message.ByteSize(), time.monotonic())
        if delay > 0:
            await asyncio.sleep(delay)
