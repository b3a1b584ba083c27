"""The admin API's bearer auth and its one error body, as the OpenAPI schema declares them.

Auth goes through FastAPI's own `HTTPBearer` (scheme `bearerAuth`), so /docs has its Authorize button and
generated clients send the token. `BearerAuth.require(role)` is the dependency every /v1 route takes: the token
is the bootstrap admin token (its file) or one of the store's tokens (cloud_sync/store/tokens.py), each with a
role; below the role a route needs, 403 names both. Not the routes (api.py, api_*.py) nor the error mapping
(status.py).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Protocol

from fastapi import Depends, Request, Security
from fastapi.encoders import jsonable_encoder
from fastapi.responses import Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field

from cloud_sync.errors import PermissionDenied, Unauthenticated

__all__ = [
    "ERROR_MEANINGS",
    "ROLES",
    "BearerAuth",
    "ErrorBody",
    "FieldProblem",
    "Principal",
    "Role",
    "actor_of",
    "as_auth",
    "error_response",
    "errors",
    "validation_error_response",
]

Role = Literal["viewer", "operator", "admin"]
# Each role may do what the ones before it may.
ROLES: tuple[Role, ...] = ("viewer", "operator", "admin")

UNAUTHENTICATED_MESSAGE = (
    "send 'Authorization: Bearer <token>' with a live admin-API token "
    "(cloud-sync admin-token prints the bootstrap one; fleetctl tokens create makes others)"
)
# The name the token file's token goes by (the store's tokens cannot take it).
BOOTSTRAP_NAME = "admin-token"
# A token -> (name, role) lookup is a database read: cached this long. A revoke through this replica drops
# its entries at once (`forget`); another replica's revoke takes effect here within this.
AUTH_CACHE_S = 5.0

# auto_error off: a missing or non-bearer header reaches `require`, which answers 401 with the message above
# and `WWW-Authenticate: Bearer` (FastAPI's own answer says only "Not authenticated").
_bearer = HTTPBearer(
    scheme_name="bearerAuth",
    description="The admin token: `cloud-sync admin-token` prints it.",
    auto_error=False,
)


class FieldProblem(BaseModel):
    """One invalid input of a 422: where it is and what is wrong with it."""

    loc: list[str | int] = Field(description='Where: ["body", "device_id"], ["query", "limit"]...')
    msg: str = Field(description="What is wrong, for a person.")
    type: str = Field(description="Pydantic's error type, for a program (string_too_short, missing...).")


class ErrorBody(BaseModel):
    """Every error the API answers has this body: `detail` says what was wrong and what to do."""

    detail: str = Field(description="The reason, for a person; names the field of a bad input.")
    errors: list[FieldProblem] = Field(
        default_factory=list, description="Each invalid input of a 422 from request validation; else empty."
    )


# What each status means on this API, for the schema.
ERROR_MEANINGS = {
    400: "The body could not be read: not UTF-8 JSON, or an upload cut off; nothing was changed.",
    401: "No bearer token, or one that is unknown or revoked (`WWW-Authenticate: Bearer`).",
    403: "The token's role may not do this.",
    404: "No such object (the message names it).",
    409: "The object exists already, or its state forbids the call (the message says what holds it).",
    413: "The request body is past its limit (http.max_body_bytes; registry.max_blob_bytes for blobs).",
    422: "An input is invalid; `detail` names the field, `errors` lists each problem of request validation.",
    501: 'This cloud-sync was installed without what the call needs: pip install "edgefleet[cloud,compress]".',
    503: "The database cannot be reached or is busy; retry later.",
}


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The `responses=` of a route: each of `codes` with the error body and its meaning on this API.

    A route that reads a body (413) also answers 400 for one FastAPI cannot parse."""
    found = {*codes, 400} if 413 in codes else set(codes)
    return {code: {"model": ErrorBody, "description": ERROR_MEANINGS[code]} for code in sorted(found)}


def error_response(status: int, detail: str, headers: Mapping[str, str] | None = None) -> Response:
    return _json(status, ErrorBody(detail=detail), headers)


def validation_error_response(problems: Iterable[Mapping[str, Any]]) -> Response:
    """422 naming each invalid input as `field: problem`, the loc leaving out where it came from (body...)."""
    found = [
        FieldProblem(loc=list(p.get("loc", ())), msg=str(p.get("msg", "")), type=str(p.get("type", "")))
        for p in problems
    ]
    detail = "; ".join(f"{_field(p.loc)}: {p.msg}" for p in found)
    return _json(422, ErrorBody(detail=detail or "invalid request", errors=found))


def _field(loc: list[str | int]) -> str:
    """`["body", "labels", "site"]` -> "labels.site"; the body itself -> "body"."""
    return ".".join(str(part) for part in loc[1:]) or (str(loc[0]) if loc else "body")


def _json(status: int, body: ErrorBody, headers: Mapping[str, str] | None = None) -> Response:
    # ASCII JSON: a message may quote the input, and an input holding a lone surrogate (valid JSON, not valid
    # UTF-8) made rendering the answer fail with a 500.
    text = json.dumps(jsonable_encoder(body))
    return Response(text, status_code=status, media_type="application/json", headers=dict(headers or {}))


@dataclass(frozen=True)
class Principal:
    """Who a request comes from: a token's name and its role."""

    name: str
    role: Role


class TokenLookup(Protocol):
    """What BearerAuth needs of the store's tokens (cloud_sync/store/tokens.py ApiTokens)."""

    def authenticate(self, token: str) -> tuple[str, str] | None: ...


class BearerAuth:
    """Bearer tokens and the role each holds; `require(role)` is a route's dependency.

    The given tokens (the bootstrap admin token, or a mapping for tests) are compared in constant time, all of
    them every time; the store's are looked up by their sha256 (a hash lookup reveals nothing of the token),
    cached for AUTH_CACHE_S. An empty token never matches.
    """

    def __init__(self, tokens: str | Mapping[str, Role], store: TokenLookup | None = None) -> None:
        given: dict[str, Role] = {tokens: "admin"} if isinstance(tokens, str) else dict(tokens)
        self._tokens = [(token.encode(), role) for token, role in given.items() if token]
        single = isinstance(tokens, str)
        self._names = {token: BOOTSTRAP_NAME if single else f"token-{i}" for i, token in enumerate(given)}
        self._store = store
        self._cache: dict[bytes, tuple[Principal | None, float]] = {}
        self._lock = threading.Lock()

    def role_of(self, token: str) -> Role | None:
        found = self.principal_of(token)
        return found.role if found is not None else None

    def principal_of(self, token: str) -> Principal | None:
        """Who `token` is (None: nobody): a given token, else a live token of the store."""
        found: Principal | None = None
        presented = token.encode()
        for known, role in self._tokens:
            if hmac.compare_digest(presented, known):
                found = Principal(self._names[known.decode()], role)
        if found is not None or self._store is None:
            return found
        key = hashlib.sha256(presented).digest()
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(key)
        if hit is not None and now - hit[1] < AUTH_CACHE_S:
            return hit[0]
        stored = self._store.authenticate(token)
        found = Principal(stored[0], _role(stored[1])) if stored is not None else None
        with self._lock:
            if len(self._cache) > 10_000:
                self._cache.clear()
            self._cache[key] = (found, now)
        return found

    def forget(self, name: str) -> None:
        """Drop the cached entries of token `name` (revoked here: its next call is refused at once). Thread-safe."""
        with self._lock:
            for key in [k for k, (who, _) in self._cache.items() if who is not None and who.name == name]:
                del self._cache[key]

    def forget_unknown(self) -> None:
        """Drop cached misses (a token created here works at once, even if it was presented before)."""
        with self._lock:
            for key in [k for k, (who, _) in self._cache.items() if who is None]:
                del self._cache[key]

    def require(self, role: Role) -> list[Any]:
        """The `dependencies=` of a route that needs `role` (or a higher one); the caller is then in
        `request.state.principal` (`actor_of(request)`)."""
        needed = ROLES.index(role)

        def check(
            request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)]
        ) -> None:
            token = credentials.credentials.strip() if credentials is not None else ""
            who = self.principal_of(token) if token else None
            if who is None:
                raise Unauthenticated(UNAUTHENTICATED_MESSAGE)
            if ROLES.index(who.role) < needed:
                raise PermissionDenied(f"this call needs the {role} role; the token is {who.role}")
            request.state.principal = who

        return [Depends(check)]


def _role(text: str) -> Role:
    for role in ROLES:
        if text == role:
            return role
    return "viewer"  # a role this release does not know: the least


def actor_of(request: Request) -> str:
    """The name of the token that made `request` (its route's `require` put it there)."""
    who = getattr(request.state, "principal", None)
    return who.name if isinstance(who, Principal) else "unknown"


def as_auth(tokens: str | BearerAuth) -> BearerAuth:
    """What the route factories take: the admin token (cloud-sync's process passes it), or a BearerAuth."""
    return tokens if isinstance(tokens, BearerAuth) else BearerAuth(tokens)
