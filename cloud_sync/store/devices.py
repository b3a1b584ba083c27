"""The device registry: register a device and mint its token, authenticate a token, revoke, list.

A token is shown once, by `add_device`; the store keeps only its sha256. Enrollment (one-time enrollment
tokens, cloud_sync/store/enrollment.py) builds on this: it inserts the device in its own transaction through
`insert_device`. Listeners (`on_added`, `on_revoked`) hear of changes after they commit: the broker's device
accounts follow them (cloud_sync/broker_accounts.py).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import sqlalchemy as sa
import structlog
from sqlalchemy import exc as sa_exc

from cloud_sync.errors import AlreadyExists, DeviceRevoked, InvalidArgument, NotFound
from cloud_sync.store.database import Database, now_ms
from cloud_sync.store.schema import device_uplink, devices

__all__ = [
    "RESERVED_PREFIXES",
    "TOKEN_PREFIX",
    "Device",
    "DeviceRegistry",
    "check_device_id",
    "check_labels",
    "check_new_device_id",
    "insert_device",
    "is_reserved",
    "new_device_token",
]

log = structlog.get_logger(__name__)

# Marks a string as an Edgefleet device token (secret scanners and people recognise it).
TOKEN_PREFIX = "efd_"
_TOKEN_BYTES = 32
# Device ids appear in MQTT topics and file names: no "/", "+", "#", spaces or control characters.
_DEVICE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_LABEL_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,62}")
_MAX_LABELS = 64
_MAX_LABEL_VALUE_CHARS = 256
# Ids the system itself uses: cloud-sync's broker user and client ids ("cloud-sync", "cloud-sync-<host>", see
# cloud_sync/config.py) and the project's own names. A device registered as "cloud-sync" shared cloud-sync's
# broker identity, whose ACL reads every device's topics, and made the fleet ACL impossible to write.
RESERVED_PREFIXES = ("cloud-sync", "edgefleet")
# Longer than any token add_device mints; a longer string is refused before it is hashed.
_MAX_TOKEN_CHARS = 128


@dataclass(frozen=True)
class Device:
    """A registered device, as operators see it (never its token)."""

    device_id: str
    labels: dict[str, str]
    created_at_ms: int
    revoked_at_ms: int | None

    @property
    def revoked(self) -> bool:
        return self.revoked_at_ms is not None


def check_device_id(device_id: str) -> str:
    """Return `device_id` if it is a valid device id, else raise InvalidArgument saying what is allowed."""
    if not isinstance(device_id, str) or not _DEVICE_ID.fullmatch(device_id):
        raise InvalidArgument(
            f"invalid device id {device_id!r}: 1-128 characters of A-Z a-z 0-9 . _ -, starting with a letter or digit"
        )
    return device_id


def is_reserved(name: str) -> bool:
    """Whether `name` is one the system uses (any case): never a device's id."""
    return name.lower().startswith(RESERVED_PREFIXES)


def check_new_device_id(device_id: str) -> str:
    """`device_id` if a device may be registered under it (valid and not reserved), else InvalidArgument."""
    check_device_id(device_id)
    if is_reserved(device_id):
        raise InvalidArgument(
            f"device id {device_id!r} is reserved: ids starting with {' or '.join(RESERVED_PREFIXES)} (any case) "
            "name cloud-sync's own broker identities; choose another id"
        )
    return device_id


def check_labels(labels: Mapping[str, str]) -> dict[str, str]:
    """A copy of `labels` if they are valid device labels, else InvalidArgument naming the problem."""
    return _check_labels(labels)


def new_device_token() -> str:
    """A fresh device token (shown once; store only its sha256)."""
    return TOKEN_PREFIX + secrets.token_urlsafe(_TOKEN_BYTES)


def insert_device(
    conn: sa.Connection, device_id: str, labels: Mapping[str, str], token: str, created_at_ms: int
) -> None:
    """Insert a device with `token` inside the caller's write transaction (checked values: see add_device).

    Raises AlreadyExists if the id is taken; the caller's transaction then keeps none of its changes.
    """
    try:
        conn.execute(
            devices.insert().values(
                device_id=device_id, token_sha256=_token_hash(token), labels=dict(labels), created_at_ms=created_at_ms
            )
        )
    except sa_exc.IntegrityError as exc:
        # The primary key (a 256-bit random token's hash does not collide).
        raise AlreadyExists(f"device {device_id!r} is registered already") from exc
    conn.execute(
        device_uplink.insert().values(
            device_id=device_id,
            acked_seq=0,
            max_stored_seq=0,
            stored_total=0,
            duplicates_total=0,
            evicted_total=0,
            device_produced_total=0,
            device_evicted_total=0,
        )
    )


def _check_labels(labels: Mapping[str, str]) -> dict[str, str]:
    if len(labels) > _MAX_LABELS:
        raise InvalidArgument(f"{len(labels)} labels: at most {_MAX_LABELS}")
    for key, value in labels.items():
        if not isinstance(key, str) or not _LABEL_KEY.fullmatch(key):
            raise InvalidArgument(
                f"invalid label key {key!r}: 1-63 characters of A-Z a-z 0-9 . _ / -, starting with a letter or digit"
            )
        if not isinstance(value, str) or len(value) > _MAX_LABEL_VALUE_CHARS or "\0" in value or not _utf8(value):
            raise InvalidArgument(
                f"label {key!r}: the value must be a UTF-8 string of at most {_MAX_LABEL_VALUE_CHARS} characters"
            )
    return dict(labels)


def _utf8(text: str) -> bool:
    """False for strings JSON can hold but UTF-8 cannot (lone surrogates): stored, they broke every listing."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _token_hash(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class DeviceRegistry:
    """The registered devices and their token hashes. Thread-safe."""

    def __init__(self, db: Database) -> None:
        self._db = db
        # Called after the commit, on the caller's thread; a listener that raises is logged, never undoes it.
        self.on_added: list[Callable[[str, str], None]] = []  # (device_id, token)
        self.on_revoked: list[Callable[[str], None]] = []  # (device_id)

    @property
    def db(self) -> Database:
        return self._db

    def add_device(self, device_id: str, labels: Mapping[str, str] | None = None) -> str:
        """Register a device and return its new token: shown only now, only its sha256 is stored.

        Raises InvalidArgument for a malformed or reserved id or labels, AlreadyExists if the id is taken (revoked
        ids too).
        """
        check_new_device_id(device_id)
        checked = _check_labels(labels or {})
        token = new_device_token()
        created = now_ms()
        self._db.write(lambda conn: insert_device(conn, device_id, checked, token, created))
        self.notify_added(device_id, token)
        return token

    def notify_added(self, device_id: str, token: str) -> None:
        """Tell the `on_added` listeners of a device committed with `token` (enrollment calls it too)."""
        for listener in self.on_added:
            _call_listener(listener, "added", device_id, token)

    def authenticate(self, token: str) -> str | None:
        """The device id `token` belongs to, or None for an unknown token.

        Raises DeviceRevoked for the token of a revoked device. The lookup is by the token's sha256 (an index
        search over hashes of random tokens reveals nothing useful by its timing), then the hashes are compared
        in constant time.
        """
        if not token or len(token) > _MAX_TOKEN_CHARS:
            return None
        digest = _token_hash(token)
        query = sa.select(devices.c.device_id, devices.c.token_sha256, devices.c.revoked_at_ms).where(
            devices.c.token_sha256 == digest
        )
        row = self._db.read(lambda conn: conn.execute(query).one_or_none())
        if row is None or not hmac.compare_digest(bytes(row.token_sha256), digest):
            return None
        if row.revoked_at_ms is not None:
            raise DeviceRevoked(f"device {row.device_id!r} was revoked")
        device_id: str = row.device_id
        return device_id

    def revoke(self, device_id: str) -> None:
        """Revoke a device: its token stops authenticating and its uploads are refused. Idempotent.

        Its stored results and counters stay. Raises NotFound for an unknown device.
        """

        def revoke(conn: sa.Connection) -> None:
            found = conn.execute(
                devices.update()
                .where(devices.c.device_id == device_id, devices.c.revoked_at_ms.is_(None))
                .values(revoked_at_ms=now_ms())
            ).rowcount
            exists = sa.select(devices.c.device_id).where(devices.c.device_id == device_id)
            if not found and conn.execute(exists).first() is None:
                raise NotFound(f"no device {device_id!r} is registered")

        self._db.write(revoke)
        for listener in self.on_revoked:
            _call_listener(listener, "revoked", device_id)

    def get_device(self, device_id: str) -> Device:
        """One device; raises NotFound."""
        query = sa.select(devices).where(devices.c.device_id == device_id)
        row = self._db.read(lambda conn: conn.execute(query).one_or_none())
        if row is None:
            raise NotFound(f"no device {device_id!r} is registered")
        return _device(row)

    def list_devices(self) -> list[Device]:
        """Every registered device (revoked ones included), ordered by id."""
        query = sa.select(devices).order_by(devices.c.device_id)
        return [_device(row) for row in self._db.read(lambda conn: conn.execute(query).all())]


def _call_listener(listener: Callable[..., None], change: str, device_id: str, *args: str) -> None:
    try:
        listener(device_id, *args)
    except Exception as exc:  # the change is committed: a listener's failure is its own to report and repair
        log.error("devices.listener_failed", change=change, device=device_id, error=f"{type(exc).__name__}: {exc}")


def _device(row: sa.Row[tuple[object, ...]]) -> Device:
    return Device(
        device_id=row.device_id,
        labels=dict(row.labels),
        created_at_ms=row.created_at_ms,
        revoked_at_ms=row.revoked_at_ms,
    )
