"""Admin-API tokens in the store, on SQLite and PostgreSQL: shown once, kept as sha256, revoked, audited."""

from __future__ import annotations

import hashlib

import pytest
import sqlalchemy as sa

from cloud_sync.errors import AlreadyExists, InvalidArgument, NotFound
from cloud_sync.store import ApiTokens, AuditLog, Database
from cloud_sync.store.tokens import api_tokens


@pytest.fixture
def tokens(db: Database) -> ApiTokens:
    return ApiTokens(db)


def test_a_token_is_shown_once_and_only_its_sha256_is_kept(tokens: ApiTokens, db: Database) -> None:
    record, token = tokens.create("ops-alice", "operator", "admin-token")
    assert token.startswith("efa_") and len(token) == 47
    assert (record.name, record.role, record.created_by, record.revoked_at_ms) == (
        "ops-alice",
        "operator",
        "admin-token",
        None,
    )
    rows = db.read(lambda conn: conn.execute(sa.select(api_tokens)).all())
    assert [bytes(r.token_sha256) for r in rows] == [hashlib.sha256(token.encode()).digest()]
    assert all(token not in str(tuple(r)) for r in rows)
    assert tokens.authenticate(token) == ("ops-alice", "operator")
    assert tokens.authenticate(token + "x") is None


def test_create_and_revoke_each_write_one_audit_record(tokens: ApiTokens, db: Database) -> None:
    _, token = tokens.create("dash", "viewer", "admin-token")
    revoked = tokens.revoke("dash", "ops-root")
    assert revoked.revoked_at_ms is not None
    assert tokens.authenticate(token) is None
    records = AuditLog(db).query()
    assert [(r.actor, r.action, r.target, r.actor_kind) for r in records] == [
        ("ops-root", "token.revoke", "token/dash", "token"),
        ("admin-token", "token.create", "token/dash", "token"),
    ]
    assert records[1].before is None and records[1].after == {"name": "dash", "role": "viewer"}
    assert records[0].after == {"name": "dash", "role": "viewer", "revoked": True}
    # Revoking again changes nothing and records nothing.
    assert tokens.revoke("dash", "ops-root").revoked_at_ms == revoked.revoked_at_ms
    assert len(AuditLog(db).query()) == 2


def test_a_live_name_is_unique_and_a_revoked_name_may_be_given_again(tokens: ApiTokens, db: Database) -> None:
    tokens.create("ci", "operator", "admin-token")
    with pytest.raises(AlreadyExists, match="revoke it first"):
        tokens.create("ci", "viewer", "admin-token")
    tokens.revoke("ci", "admin-token")
    _, second = tokens.create("ci", "viewer", "admin-token")
    assert tokens.authenticate(second) == ("ci", "viewer")
    assert [(t.name, t.role, t.revoked_at_ms is None) for t in tokens.list()] == [
        ("ci", "operator", False),
        ("ci", "viewer", True),
    ]
    assert [r.action for r in AuditLog(db).query()] == ["token.create", "token.revoke", "token.create"]


@pytest.mark.parametrize(
    ("name", "role", "message"),
    [
        ("", "viewer", "1 to 64 letters"),
        ("a" * 65, "viewer", "1 to 64 letters"),
        ("has space", "viewer", "1 to 64 letters"),
        ("ops/alice", "viewer", "1 to 64 letters"),
        ("ops-alice", "root", "one of viewer, operator, admin"),
        ("admin-token", "admin", "bootstrap admin token"),
    ],
)
def test_bad_input_is_refused_and_changes_nothing(
    tokens: ApiTokens, db: Database, name: str, role: str, message: str
) -> None:
    with pytest.raises(InvalidArgument, match=message):
        tokens.create(name, role, "admin-token")
    assert tokens.list() == [] and AuditLog(db).query() == []


def test_revoking_an_unknown_or_the_bootstrap_token_is_refused(tokens: ApiTokens, db: Database) -> None:
    with pytest.raises(NotFound, match="no token named 'nobody'"):
        tokens.revoke("nobody", "admin-token")
    with pytest.raises(InvalidArgument, match="bootstrap admin token"):
        tokens.revoke("admin-token", "admin-token")
    assert AuditLog(db).query() == []


def test_the_audit_log_filters_and_pages_newest_first(tokens: ApiTokens, db: Database) -> None:
    for number in range(5):
        tokens.create(f"t{number}", "viewer", "alice" if number % 2 else "bob")
    log = AuditLog(db)
    newest = log.query(limit=2)
    assert [r.target for r in newest] == ["token/t4", "token/t3"]
    older = log.query(limit=2, before_id=newest[-1].id)
    assert [r.target for r in older] == ["token/t2", "token/t1"]
    assert [r.target for r in log.query(actor="alice")] == ["token/t3", "token/t1"]
    assert [r.target for r in log.query(target="token/t0")] == ["token/t0"]
    assert log.query(action="token.revoke") == []
    assert log.query(since_ms=newest[0].at_ms + 60_000) == []
    with pytest.raises(InvalidArgument, match="limit"):
        log.query(limit=0)
