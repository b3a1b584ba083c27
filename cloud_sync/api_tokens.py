"""The admin API's token routes: who am I, and admin-API tokens with roles (create, shown once; list; revoke).

Added to the app through ApiContext.extra_routes (process.py). The tokens live in the store
(cloud_sync/store/tokens.py, sha256 only); the role checks are api_auth.py's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Literal

from fastapi import FastAPI, Path, Request
from pydantic import BaseModel, ConfigDict, Field

from cloud_sync.api_auth import BearerAuth, Principal, actor_of, errors
from cloud_sync.store.tokens import ApiTokens

__all__ = ["token_routes"]

TOKEN_NAME_PATTERN = "^[A-Za-z0-9._-]{1,64}$"
RoleName = Literal["viewer", "operator", "admin"]
TokenNamePath = Annotated[
    str, Path(max_length=64, json_schema_extra={"pattern": TOKEN_NAME_PATTERN}, description="e.g. ops-alice")
]


class WhoAmI(BaseModel):
    name: str = Field(description="The token's name (admin-token: the bootstrap token of cloud-sync's file).")
    role: RoleName


class NewToken(BaseModel):
    """POST /v1/tokens."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(
        min_length=1,
        max_length=64,
        pattern=TOKEN_NAME_PATTERN,
        description="Unique among live tokens: letters, digits and . _ - (e.g. ops-alice).",
    )
    role: RoleName = Field(description="viewer reads; operator also pushes models and runs rollouts; admin all.")


class TokenRecord(BaseModel):
    name: str
    role: RoleName
    created_at_ms: int
    created_by: str = Field(description="The name of the token that created it.")
    revoked_at_ms: int | None


class CreatedToken(BaseModel):
    name: str
    role: RoleName
    token: str = Field(description="The token (efa_...): shown in this answer only, only its sha256 is kept.")
    created_at_ms: int


class TokenList(BaseModel):
    tokens: list[TokenRecord]


def token_routes(tokens: ApiTokens, auth: BearerAuth) -> Callable[[FastAPI], None]:
    """The routes, for ApiContext.extra_routes; `auth` is the app's (a revoke drops its cache entries)."""
    viewer, admin = auth.require("viewer"), auth.require("admin")

    def add(app: FastAPI) -> None:
        @app.get("/v1/whoami", tags=["tokens"], dependencies=viewer, responses=errors(401, 403, 503))
        def whoami(request: Request) -> WhoAmI:
            """The name and role of the token this call carries."""
            who: Principal = request.state.principal
            return WhoAmI(name=who.name, role=who.role)

        @app.post(
            "/v1/tokens",
            tags=["tokens"],
            dependencies=admin,
            status_code=201,
            responses=errors(401, 403, 409, 413, 422, 503),
        )
        def create_token(body: NewToken, request: Request) -> CreatedToken:
            """A new admin-API token with a role; the token is in this answer only (409: the name is live)."""
            record, token = tokens.create(body.name, body.role, actor_of(request))
            auth.forget_unknown()
            return CreatedToken(name=record.name, role=body.role, token=token, created_at_ms=record.created_at_ms)

        @app.get("/v1/tokens", tags=["tokens"], dependencies=admin, responses=errors(401, 403, 503))
        def list_tokens() -> TokenList:
            """Every token made, live and revoked (never the token itself), oldest first."""
            return TokenList.model_validate({"tokens": [t.to_json() for t in tokens.list()]})

        @app.delete("/v1/tokens/{name}", tags=["tokens"], dependencies=admin, responses=errors(401, 403, 404, 422, 503))
        def revoke_token(name: TokenNamePath, request: Request) -> TokenRecord:
            """Revoke the live token `name`: refused at once on this replica, within seconds on others."""
            record = tokens.revoke(name, actor_of(request))
            auth.forget(name)
            return TokenRecord.model_validate(record.to_json())

    return add
