"""Admin-API tokens and their roles in the cloud store: only each token's sha256 is kept.

`ApiTokens.create` shows a token once; `authenticate` maps a presented token to its (name, role); `revoke`
ends it. Each change writes its audit record in the same transaction. Not the bootstrap admin token (a file,
cloud_sync/admin_token.py) nor the rules of what each role may do (cloud_sync/api_auth.py).
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import asdict, dataclass
from typing import Any

import sqlalchemy as sa

from cloud_sync.errors import AlreadyExists, InvalidArgument, NotFound
from cloud_sync.store.audit import AuditDraft, insert_audit
from cloud_sync.store.database import Database, now_ms
from cloud_sync.store.schema import metadata

__all__ = ["BOOTSTRAP_TOKEN_NAME", "ROLE_NAMES", "ApiToken", "ApiTokens", "api_tokens", "check_token_name"]

ROLE_NAMES = ("viewer", "operator", "admin")
# The name the token file's token (`cloud-sync admin-token`) goes by: an admin that the API cannot revoke.
BOOTSTRAP_TOKEN_NAME = "admin-token"
_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
_RowId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

api_tokens = sa.Table(
    "api_tokens",
    metadata,
    sa.Column("id", _RowId, primary_key=True, autoincrement=True),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("role", sa.Text, nullable=False),
    # sha256 of the token; the token itself is shown once by create and never stored.
    sa.Column("token_sha256", sa.LargeBinary(32), nullable=False, unique=True),
    sa.Column("created_at_ms", sa.BigInteger, nullable=False),
    sa.Column("created_by", sa.Text, nullable=False),
    sa.Column("revoked_at_ms", sa.BigInteger, nullable=True),
    # A name is unique among live tokens (a revoked one's name may be given again): a partial unique index,
    # which both engines enforce, so two replicas creating the same name at once cannot both succeed.
    sa.Index(
        "uq_api_tokens_live_name",
        "name",
        unique=True,
        sqlite_where=sa.text("revoked_at_ms IS NULL"),
        postgresql_where=sa.text("revoked_at_ms IS NULL"),
    ),
)


@dataclass(frozen=True)
class ApiToken:
    """A token's record (never the token)."""

    name: str
    role: str
    created_at_ms: int
    created_by: str
    revoked_at_ms: int | None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def check_token_name(name: object) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        shown = repr(name)[:80]
        raise InvalidArgument(f"token name {shown}: 1 to 64 letters, digits and . _ - (e.g. ops-alice)")
    return name


def check_role(role: object) -> str:
    if role not in ROLE_NAMES:
        raise InvalidArgument(f"role {str(role)[:40]!r}: one of {', '.join(ROLE_NAMES)}")
    return str(role)


def token_digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def _token(row: Any) -> ApiToken:
    return ApiToken(
        name=row.name,
        role=row.role,
        created_at_ms=int(row.created_at_ms),
        created_by=row.created_by,
        revoked_at_ms=None if row.revoked_at_ms is None else int(row.revoked_at_ms),
    )


def _live(conn: sa.Connection, name: str) -> Any:
    c = api_tokens.c
    return conn.execute(sa.select(api_tokens).where(c.name == name, c.revoked_at_ms.is_(None))).one_or_none()


class ApiTokens:
    """The admin-API tokens of one cloud store. Thread-safe; synchronous (call it off the event loop)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def create(self, name: str, role: str, created_by: str) -> tuple[ApiToken, str]:
        """A new token named `name` with `role`: (its record, the token, shown only now).

        AlreadyExists when a live token has the name; InvalidArgument for a bad name or role."""
        check_token_name(name)
        check_role(role)
        if name == BOOTSTRAP_TOKEN_NAME:
            raise InvalidArgument(f"token name {name!r} is the bootstrap admin token's (the token file): pick another")
        token = f"efa_{secrets.token_urlsafe(32)}"
        stamp = now_ms()
        values = {
            "name": name,
            "role": role,
            "token_sha256": token_digest(token),
            "created_at_ms": stamp,
            "created_by": created_by,
            "revoked_at_ms": None,
        }
        record = ApiToken(name, role, stamp, created_by, None)

        def write(conn: sa.Connection) -> None:
            if _live(conn, name) is not None:
                raise AlreadyExists(f"a token named {name!r} exists: revoke it first or pick another name")
            try:
                with conn.begin_nested():
                    conn.execute(api_tokens.insert().values(**values))
            except sa.exc.IntegrityError:  # created by another replica since the check above
                raise AlreadyExists(f"a token named {name!r} exists: revoke it first or pick another name") from None
            after = {"name": name, "role": role}
            insert_audit(conn, AuditDraft(created_by, "token.create", f"token/{name}", None, after), stamp)

        self.db.write(write)
        return record, token

    def list(self) -> list[ApiToken]:
        """Every token ever made, live and revoked, oldest first."""
        query = sa.select(api_tokens).order_by(api_tokens.c.id)
        return [_token(row) for row in self.db.read(lambda conn: conn.execute(query).all())]

    def revoke(self, name: str, by: str) -> ApiToken:
        """End the live token named `name` (the newest revoked record if none is live: nothing changes then).

        NotFound when no token ever had the name."""
        check_token_name(name)
        if name == BOOTSTRAP_TOKEN_NAME:
            raise InvalidArgument(
                f"{name!r} is the bootstrap admin token (cloud-sync's token file): replace the file to change it"
            )
        stamp = now_ms()

        def write(conn: sa.Connection) -> Any:
            c = api_tokens.c
            row = _live(conn, name)
            if row is None:
                last = conn.execute(sa.select(api_tokens).where(c.name == name).order_by(c.id.desc()).limit(1))
                found = last.one_or_none()
                if found is None:
                    raise NotFound(f"no token named {name!r} (fleetctl tokens list)")
                return found
            updated = conn.execute(
                api_tokens.update().where(c.id == row.id, c.revoked_at_ms.is_(None)).values(revoked_at_ms=stamp)
            )
            if updated.rowcount:
                before, after = {"name": name, "role": row.role}, {"name": name, "role": row.role, "revoked": True}
                insert_audit(conn, AuditDraft(by, "token.revoke", f"token/{name}", before, after), stamp)
            return conn.execute(sa.select(api_tokens).where(c.id == row.id)).one()

        return _token(self.db.write(write))

    def authenticate(self, token: str) -> tuple[str, str] | None:
        """(name, role) of a live token, None for an unknown or revoked one."""
        c = api_tokens.c
        query = sa.select(c.name, c.role).where(c.token_sha256 == token_digest(token), c.revoked_at_ms.is_(None))
        row = self.db.read(lambda conn: conn.execute(query).one_or_none())
        return None if row is None else (row.name, row.role)
