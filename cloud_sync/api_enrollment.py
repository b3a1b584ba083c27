"""Admin API routes for enrollment tokens: mint one (shown once) and list them (never the secret).

Added to the admin app through `ApiContext.extra_routes`; the device side of enrollment is the gRPC
Enrollment service (cloud_sync/enrollment.py).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import asdict

from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field, field_validator

from cloud_sync.api_audit import recorder
from cloud_sync.api_auth import BearerAuth, actor_of, as_auth, errors
from cloud_sync.api_schemas import DEVICE_ID_PATTERN, LABELS_SCHEMA, EnrollmentTokenList, MintedToken
from cloud_sync.store.audit import AuditDraft, AuditLog
from cloud_sync.store.database import now_ms
from cloud_sync.store.enrollment import MAX_TTL_S, MIN_TTL_S, EnrollmentTokens

__all__ = ["NewEnrollmentToken", "enrollment_routes"]

DEFAULT_TTL_S = 86400


class NewEnrollmentToken(BaseModel):
    model_config = ConfigDict(extra="forbid")
    labels: dict[str, str] = Field(
        default_factory=dict, description="Labels the enrolled device gets.", json_schema_extra=LABELS_SCHEMA
    )
    expires_in_s: int = Field(
        DEFAULT_TTL_S, ge=MIN_TTL_S, le=MAX_TTL_S, description="How long the token may be redeemed."
    )
    device_id: str | None = Field(
        None,
        min_length=1,
        max_length=128,
        description="The enrolled device's id; empty: made from its hostname.",
        # In the schema only: check_new_device_id's message says what an id may hold.
        json_schema_extra={"pattern": DEVICE_ID_PATTERN},
    )

    @field_validator("expires_in_s", mode="before")
    @classmethod
    def _a_number(cls, value: object) -> object:
        # A JSON number (3600, or 3600.0: JSON Schema's integer), never "3600" or true, which pydantic would take.
        if isinstance(value, (str, bool)):
            raise ValueError("must be a JSON number of seconds")
        return value

    @field_validator("labels")
    @classmethod
    def _encodable(cls, labels: dict[str, str]) -> dict[str, str]:
        for text in (*labels, *labels.values()):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError(f"{text!r} is not valid Unicode (a lone surrogate)") from None
        return labels


def enrollment_routes(
    tokens: EnrollmentTokens, admin_token: str | BearerAuth, audit: AuditLog | None = None
) -> Callable[[FastAPI], None]:
    auth = as_auth(admin_token)
    admin = auth.require("admin")
    record = recorder(audit)
    read = errors(401, 403, 503)

    def add(app: FastAPI) -> None:
        @app.post(
            "/v1/enrollment-tokens",
            tags=["enrollment"],
            dependencies=admin,
            status_code=201,
            responses=errors(401, 403, 409, 413, 422, 503),
        )
        def mint_token(body: NewEnrollmentToken, request: Request) -> MintedToken:
            """A one-time enrollment token: shown only in this answer; `edge-agent enroll --token` redeems it."""
            token, expires_at_ms = tokens.mint(body.labels, body.expires_in_s, body.device_id)
            # The token's id as `GET /v1/enrollment-tokens` lists it (a sha256 prefix), never the token.
            token_id = hashlib.sha256(token.encode()).hexdigest()[:12]
            after = {"id": token_id, "labels": body.labels, "device_id": body.device_id, "expires_at_ms": expires_at_ms}
            target = f"enrollment_token/{token_id}"
            record(AuditDraft(actor_of(request), "enrollment_token.create", target, None, after))
            return MintedToken(token=token, expires_at_ms=expires_at_ms, labels=body.labels, device_id=body.device_id)

        @app.get("/v1/enrollment-tokens", tags=["enrollment"], dependencies=admin, responses=read)
        def list_tokens() -> EnrollmentTokenList:
            """Every minted token, newest first: its id (sha256 prefix), labels, state and who used it."""
            now = now_ms()
            return EnrollmentTokenList.model_validate(
                {"tokens": [{**asdict(t), "state": t.state(now)} for t in tokens.list()]}
            )

    return add
