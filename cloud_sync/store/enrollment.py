"""One-time enrollment tokens: an operator mints one with labels; a device redeems it once for its identity.

    tokens = EnrollmentTokens(db, DeviceRegistry(db))
    token, expires_at_ms = tokens.mint({"site": "lab"}, ttl_s=86400)          # shown once: only its sha256 is kept
    device_id, device_token, labels = tokens.redeem(token, hostname="jetson-7")

Redeeming marks the token used and registers the device in one transaction: a token enrols one device,
even when two devices present it at once. Not the gRPC service (cloud_sync/enrollment.py) nor the broker's
accounts (cloud_sync/broker_accounts.py).
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass

import sqlalchemy as sa

from cloud_sync.errors import AlreadyExists, InvalidArgument, Unauthenticated
from cloud_sync.store.database import Database, now_ms
from cloud_sync.store.devices import (
    DeviceRegistry,
    check_labels,
    check_new_device_id,
    insert_device,
    is_reserved,
    new_device_token,
)
from cloud_sync.store.schema import devices, metadata

__all__ = [
    "ENROLLMENT_TOKEN_PREFIX",
    "MAX_TTL_S",
    "MIN_TTL_S",
    "EnrollmentRefused",
    "EnrollmentToken",
    "EnrollmentTokens",
    "Redemption",
    "device_id_for_host",
    "enrollment_tokens",
]

# Marks a string as an Edgefleet enrollment token (a device token starts with efd_).
ENROLLMENT_TOKEN_PREFIX = "efe_"
_TOKEN_BYTES = 32
MIN_TTL_S = 60
MAX_TTL_S = 30 * 86400
# Longer than any token mint makes; a longer string is refused before it is hashed.
MAX_ENROLLMENT_TOKEN_CHARS = 128
# "-" and 6 hex digits after the host's name; a device id is at most 128 characters.
_SUFFIX_HEX = 6
_MAX_HOST_PART = 128 - 1 - _SUFFIX_HEX
_NOT_ID_CHARS = re.compile(r"[^A-Za-z0-9._-]+")
_MINT_ADVICE = "mint a new one with `fleetctl devices token create`"

enrollment_tokens = sa.Table(
    "enrollment_tokens",
    metadata,
    # sha256 of the token; the token itself is shown once by mint and never stored.
    sa.Column("token_sha256", sa.LargeBinary(32), primary_key=True),
    sa.Column("labels", sa.JSON, nullable=False),
    # The device id the operator chose; NULL: derived from the device's hostname at enrollment.
    sa.Column("device_id", sa.Text, nullable=True),
    sa.Column("created_at_ms", sa.BigInteger, nullable=False),
    sa.Column("expires_at_ms", sa.BigInteger, nullable=False),
    sa.Column("used_at_ms", sa.BigInteger, nullable=True),
    sa.Column("used_by", sa.Text, nullable=True),
)


class EnrollmentRefused(Unauthenticated):
    """A token that enrols nothing; `reason` is one word (unknown, used, expired), the message says what to do."""

    def __init__(self, message: str, reason: str = "refused") -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class EnrollmentToken:
    """A minted token as operators see it: never the secret, only the first hex digits of its sha256."""

    token_id: str
    labels: dict[str, str]
    device_id: str | None
    created_at_ms: int
    expires_at_ms: int
    used_at_ms: int | None
    used_by: str | None

    def state(self, now: int) -> str:
        if self.used_at_ms is not None:
            return "used"
        return "expired" if self.expires_at_ms <= now else "unused"


@dataclass(frozen=True)
class Redemption:
    """What a redeemed token gives the device: shown once (the device token is stored only as its sha256)."""

    device_id: str
    device_token: str
    labels: dict[str, str]


def _token_hash(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def device_id_for_host(hostname: str, suffix: str) -> str:
    """A device id from a hostname: characters outside the id alphabet become "-", then "-" and `suffix`.

    A reserved or empty host part becomes "device" (a host called cloud-sync must not take its identity).
    """
    part = _NOT_ID_CHARS.sub("-", hostname).strip("-._")[:_MAX_HOST_PART].rstrip("-._")
    if not part or is_reserved(part):
        part = "device"
    return check_new_device_id(f"{part}-{suffix}")


def _check_ttl(ttl_s: int) -> int:
    if isinstance(ttl_s, bool) or not isinstance(ttl_s, int) or not MIN_TTL_S <= ttl_s <= MAX_TTL_S:
        raise InvalidArgument(
            f"an enrollment token lives {MIN_TTL_S} s to {MAX_TTL_S // 86400} days, not {ttl_s!r} s: "
            "choose an expiry in that range"
        )
    return ttl_s


class EnrollmentTokens:
    """The minted enrollment tokens and their redemption. Thread-safe."""

    def __init__(self, db: Database, devices: DeviceRegistry) -> None:
        self._db = db
        self._devices = devices

    def mint(
        self, labels: Mapping[str, str], ttl_s: int, device_id: str | None = None, *, now: int | None = None
    ) -> tuple[str, int]:
        """A new one-time token (shown only now) and when it expires (ms since the epoch).

        The device that redeems it gets `labels` and `device_id` (None: one made from its hostname). Raises
        InvalidArgument for bad labels, a ttl outside MIN_TTL_S..MAX_TTL_S, a malformed or reserved id;
        AlreadyExists for an id registered already (as adding the device would).
        """
        checked = check_labels(labels)
        _check_ttl(ttl_s)
        if device_id is not None:
            check_new_device_id(device_id)
            if self._registered(device_id):
                raise AlreadyExists(
                    f"device {device_id!r} is registered already: choose another id, or revoke it and enroll it "
                    "under a new one"
                )
        token = ENROLLMENT_TOKEN_PREFIX + secrets.token_urlsafe(_TOKEN_BYTES)
        created = now_ms() if now is None else now
        expires = created + ttl_s * 1000
        row = {
            "token_sha256": _token_hash(token),
            "labels": checked,
            "device_id": device_id,
            "created_at_ms": created,
            "expires_at_ms": expires,
        }
        self._db.write(lambda conn: conn.execute(enrollment_tokens.insert().values(**row)))
        return token, expires

    def reserve(self, token: str, hostname: str, *, now: int | None = None) -> Redemption:
        """What redeeming `token` would give, changing nothing: the device id (free now) and a new device token.

        For a caller that must prepare something before the commit (the broker account); `commit` then
        checks everything again. Raises EnrollmentRefused (unknown, used, expired token).
        """
        at = now_ms() if now is None else now
        row = self._db.read(lambda conn: self._usable(conn, token, at))
        device_id = row.device_id
        if device_id is None:
            # 24 random bits: a clash is rare, and looked for (and a second choice made) before it could happen.
            for _ in range(8):
                device_id = device_id_for_host(hostname, secrets.token_hex(_SUFFIX_HEX // 2))
                if not self._registered(device_id):
                    break
        return Redemption(device_id, new_device_token(), dict(row.labels))

    def commit(self, token: str, redemption: Redemption, *, now: int | None = None) -> Redemption:
        """Mark `token` used by `redemption.device_id` and register the device, in one transaction.

        Raises EnrollmentRefused if the token became unusable meanwhile (another device redeemed it),
        AlreadyExists if the device id was taken meanwhile; then nothing changed.
        """
        at = now_ms() if now is None else now

        def redeem(conn: sa.Connection) -> None:
            self._usable(conn, token, at, lock=True)
            marked = conn.execute(
                enrollment_tokens.update()
                .where(enrollment_tokens.c.token_sha256 == _token_hash(token), enrollment_tokens.c.used_at_ms.is_(None))
                .values(used_at_ms=at, used_by=redemption.device_id)
            ).rowcount
            if marked != 1:  # another transaction marked it between our read and this update
                raise _used()
            insert_device(conn, redemption.device_id, redemption.labels, redemption.device_token, at)

        self._db.write(redeem)
        self._devices.notify_added(redemption.device_id, redemption.device_token)
        return redemption

    def redeem(self, token: str, hostname: str, *, now: int | None = None) -> tuple[str, str, dict[str, str]]:
        """Enroll a device with `token`: (device_id, device_token, labels). See reserve and commit."""
        redemption = self.commit(token, self.reserve(token, hostname, now=now), now=now)
        return redemption.device_id, redemption.device_token, redemption.labels

    def list(self) -> list[EnrollmentToken]:
        """Every minted token (used and expired ones included), newest first."""
        query = sa.select(enrollment_tokens).order_by(
            enrollment_tokens.c.created_at_ms.desc(), enrollment_tokens.c.token_sha256
        )
        return [
            EnrollmentToken(
                token_id=bytes(row.token_sha256).hex()[:12],
                labels=dict(row.labels),
                device_id=row.device_id,
                created_at_ms=row.created_at_ms,
                expires_at_ms=row.expires_at_ms,
                used_at_ms=row.used_at_ms,
                used_by=row.used_by,
            )
            for row in self._db.read(lambda conn: conn.execute(query).all())
        ]

    def _registered(self, device_id: str) -> bool:
        query = sa.select(devices.c.device_id).where(devices.c.device_id == device_id)
        return self._db.read(lambda conn: conn.execute(query).first()) is not None

    def _usable(self, conn: sa.Connection, token: str, at: int, *, lock: bool = False) -> sa.Row[tuple[object, ...]]:
        if (
            not isinstance(token, str)
            or not token.startswith(ENROLLMENT_TOKEN_PREFIX)
            or len(token) > MAX_ENROLLMENT_TOKEN_CHARS
        ):
            raise _unknown()
        query = sa.select(enrollment_tokens).where(enrollment_tokens.c.token_sha256 == _token_hash(token))
        if lock and self._db.backend == "postgresql":
            query = query.with_for_update()
        row = conn.execute(query).one_or_none()
        if row is None:
            raise _unknown()
        if row.used_at_ms is not None:
            raise _used()
        if row.expires_at_ms <= at:
            raise EnrollmentRefused(f"the enrollment token expired: {_MINT_ADVICE}", "expired")
        return row


def _unknown() -> EnrollmentRefused:
    return EnrollmentRefused(
        f"the enrollment token is not one cloud-sync minted: check it, or {_MINT_ADVICE}", "unknown"
    )


def _used() -> EnrollmentRefused:
    return EnrollmentRefused(
        f"the enrollment token was used already (a token enrols one device): {_MINT_ADVICE}", "used"
    )
