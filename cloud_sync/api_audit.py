"""The admin API's audit route: GET /v1/audit, the changes to the fleet newest first, filtered and paged.

Added to the app through ApiContext.extra_routes (process.py). The records are cloud_sync/store/audit.py's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Query
from pydantic import BaseModel, Field

from cloud_sync.api_auth import BearerAuth, errors
from cloud_sync.store.audit import MAX_AUDIT_PAGE, AuditDraft, AuditLog

__all__ = ["audit_routes", "recorder"]

MAX_ID = 2**63 - 1


class AuditRecord(BaseModel):
    id: int
    at_ms: int
    actor: str = Field(description='A token\'s name, "gate:<gate>", "controller" or "cloud-sync".')
    actor_kind: Literal["token", "gate", "controller", "system"]
    action: str = Field(description="rollout.create, policy.set, token.revoke...")
    target: str = Field(description="rollout/ro-0123456789, policy/lab, device/cam-1, token/ops-alice...")
    before: dict[str, Any] | None
    after: dict[str, Any] | None
    reason: str


class AuditPage(BaseModel):
    records: list[AuditRecord] = Field(description="Newest first; pass the last id as before_id for the next page.")


def recorder(audit: AuditLog | None) -> Callable[[AuditDraft], None]:
    """How a route records a change that has committed: into `audit`, or nowhere (routes tested alone)."""

    def record(draft: AuditDraft) -> None:
        if audit is not None:
            audit.record(draft)

    return record


def audit_routes(audit: AuditLog, auth: BearerAuth) -> Callable[[FastAPI], None]:
    viewer = auth.require("viewer")

    def add(app: FastAPI) -> None:
        @app.get("/v1/audit", tags=["audit"], dependencies=viewer, responses=errors(401, 403, 422, 503))
        def list_audit(
            since_ms: Annotated[int, Query(ge=0, le=MAX_ID, description="records at or after this time")] = 0,
            actor: Annotated[str | None, Query(min_length=1, max_length=128)] = None,
            action: Annotated[str | None, Query(min_length=1, max_length=64)] = None,
            target: Annotated[str | None, Query(min_length=1, max_length=256)] = None,
            limit: Annotated[int, Query(ge=1, le=MAX_AUDIT_PAGE)] = 100,
            before_id: Annotated[int | None, Query(ge=1, le=MAX_ID, description="records older than this id")] = None,
        ) -> AuditPage:
            """Every change to the fleet (by a token, a gate or the controller), newest first."""
            found = audit.query(since_ms, actor, action, target, limit, before_id)
            return AuditPage.model_validate({"records": [r.to_json() for r in found]})

    return add
