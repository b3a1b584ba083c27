"""The admin API's rollout routes: create, list, show (with progress), events, pause, resume, abort, promote.

Added to the app through ApiContext.extra_routes (process.py). Inputs are checked here and by the rollout
plan's own parsers (cloud_sync/rollouts/plan.py), whose errors name the term; a 422 names the field. The
state machine, the stores and the controller are cloud_sync/rollouts/, not this module.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Path, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from cloud_sync.api_auth import BearerAuth, actor_of, as_auth, errors
from cloud_sync.api_schemas import MODEL_NAME_PATTERN, SELECTOR_SCHEMA, Rollout, RolloutEventPage, RolloutList
from cloud_sync.errors import InvalidArgument
from cloud_sync.rollouts.plan import MAX_REASON_CHARS, Gates, Stage, parse_gates, parse_stages
from cloud_sync.rollouts.service import RolloutService
from cloud_sync.selectors import check_selector
from cloud_sync.store.assignments import check_model_name

__all__ = ["check_rollout_id", "rollout_routes"]

# Rollout ids as the service makes them: "ro-" and 10 hex digits.
_ROLLOUT_ID = re.compile(r"ro-[0-9a-f]{10}")
MAX_EVENTS_PAGE = 1000
# Event ids are BIGINT.
MAX_EVENT_ID = 2**63 - 1
# Stages and gates given as text: the longest plan a person writes is far shorter.
MAX_PLAN_CHARS = 2000

State = Literal["running", "paused", "completed", "aborted"]
# The pattern in the schema only: check_rollout_id's message says where to find ids.
RolloutIdPath = Annotated[
    str, Path(max_length=80, json_schema_extra={"pattern": "^ro-[0-9a-f]{10}$"}, description="e.g. ro-0123456789")
]


class NewRollout(BaseModel):
    """POST /v1/rollouts. Stages and gates are checked by the plan's parsers (cloud_sync/rollouts/plan.py)."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(
        min_length=1,
        max_length=63,
        description="Model name, e.g. digits.",
        json_schema_extra={"pattern": MODEL_NAME_PATTERN},
    )
    to_version: int = Field(ge=1, le=2**31 - 1, description="The version to roll out (in the registry).")
    selector: dict[str, str] = Field(
        default_factory=dict,
        description="Label key -> value; {} matches every device.",
        json_schema_extra=SELECTOR_SCHEMA,
    )
    stages: str | list[Any] = Field(
        description="shadow:10%:60s,active:10%:60s,active:100%, or a list of such terms or {mode, percent, bake_s}"
    )
    gates: str | dict[str, Any] | None = Field(
        None, description="max_error_rate=0.01,max_p99_ratio=1.5,min_shadow_agreement=0.95,min_devices=1 or an object"
    )
    shadow_sample_rate: float = Field(0.1, gt=0, le=1, description="Share of requests mirrored in shadow stages.")


class Transition(BaseModel):
    """POST /v1/rollouts/{id}/pause|resume|abort|promote."""

    model_config = ConfigDict(extra="forbid")
    reason: str = Field("", max_length=MAX_REASON_CHARS, description="Why, for the rollout's event log.")


def check_rollout_id(rollout_id: str) -> str:
    if not _ROLLOUT_ID.fullmatch(rollout_id):
        raise InvalidArgument(f"rollout id {rollout_id[:80]!r} is not ro- and 10 hex digits (fleetctl rollouts list)")
    return rollout_id


def _stages(value: str | list[Any]) -> list[Stage]:
    if len(str(value)) > MAX_PLAN_CHARS:
        raise InvalidArgument(f"stages: longer than {MAX_PLAN_CHARS} characters")
    try:
        return parse_stages(value)
    except InvalidArgument as exc:
        raise InvalidArgument(f"stages: {exc.message}") from None


def _gates(value: str | dict[str, Any] | None) -> Gates:
    if len(str(value)) > MAX_PLAN_CHARS:
        raise InvalidArgument(f"gates: longer than {MAX_PLAN_CHARS} characters")
    try:
        return parse_gates(value)
    except InvalidArgument as exc:
        raise InvalidArgument(f"gates: {exc.message}") from None


def rollout_routes(service: RolloutService, admin_token: str | BearerAuth) -> Callable[[FastAPI], None]:
    """The routes, for ApiContext.extra_routes. Blocking calls: FastAPI runs them in its threadpool."""
    auth = as_auth(admin_token)
    viewer, operator = auth.require("viewer"), auth.require("operator")
    # A transition: no such rollout (404), a malformed id (422), not in a state that allows it (409).
    transition = errors(401, 403, 404, 409, 413, 422, 503)

    def shown(rollout_id: str) -> Rollout:
        """The rollout with its progress: per stage its devices and status, the current stage's device ids."""
        return Rollout.model_validate(service.progress(rollout_id))  # NotFound: 404

    def add(app: FastAPI) -> None:
        @app.post(
            "/v1/rollouts",
            tags=["rollouts"],
            dependencies=operator,
            status_code=201,
            responses=errors(401, 403, 409, 413, 422, 503),
        )
        def create_rollout(body: NewRollout, request: Request) -> Rollout:
            """Start a staged rollout of `to_version` to the devices `selector` matches (422 names a bad field)."""
            check_model_name(body.model)
            try:
                selector = check_selector(body.selector)
            except InvalidArgument as exc:
                raise InvalidArgument(f"selector: {exc.message}") from None
            stages, gates = _stages(body.stages), _gates(body.gates)
            rollout = service.create(
                body.model, body.to_version, selector, stages, gates, body.shadow_sample_rate, by=actor_of(request)
            )
            return shown(rollout.id)

        @app.get("/v1/rollouts", tags=["rollouts"], dependencies=viewer, responses=errors(401, 403, 422, 503))
        def list_rollouts(
            state: Annotated[State | None, Query(description="only rollouts in this state")] = None,
        ) -> RolloutList:
            """Rollouts, newest first."""
            return RolloutList.model_validate({"rollouts": [r.to_json() for r in service.list(state)]})

        @app.get(
            "/v1/rollouts/{rollout_id}",
            tags=["rollouts"],
            dependencies=viewer,
            responses=errors(401, 403, 404, 422, 503),
        )
        def show_rollout(rollout_id: RolloutIdPath) -> Rollout:
            """A rollout, with per stage its devices and each gate's last value against its threshold."""
            return shown(check_rollout_id(rollout_id))

        @app.get(
            "/v1/rollouts/{rollout_id}/events",
            tags=["rollouts"],
            dependencies=viewer,
            responses=errors(401, 403, 404, 422, 503),
        )
        def rollout_events(
            rollout_id: RolloutIdPath, after_id: Annotated[int, Query(ge=0, le=MAX_EVENT_ID)] = 0
        ) -> RolloutEventPage:
            """Every transition past `after_id`, by a person or a gate, with its reason and deciding values."""
            events = service.events(check_rollout_id(rollout_id), after_id)
            return RolloutEventPage.model_validate(
                {"events": [e.to_json() for e in events], "next_after_id": events[-1].id if events else after_id}
            )

        @app.post("/v1/rollouts/{rollout_id}/pause", tags=["rollouts"], dependencies=operator, responses=transition)
        def pause_rollout(rollout_id: RolloutIdPath, request: Request, body: Transition | None = None) -> Rollout:
            """Hold a running rollout at its stage (devices keep what they run); 409 unless it is running."""
            service.pause(check_rollout_id(rollout_id), "operator", _reason(body), by=actor_of(request))
            return shown(rollout_id)

        @app.post("/v1/rollouts/{rollout_id}/resume", tags=["rollouts"], dependencies=operator, responses=transition)
        def resume_rollout(rollout_id: RolloutIdPath, request: Request, body: Transition | None = None) -> Rollout:
            """Let a paused rollout go on (its stage's bake time starts again); 409 unless it is paused."""
            service.resume(check_rollout_id(rollout_id), "operator", _reason(body), by=actor_of(request))
            return shown(rollout_id)

        @app.post("/v1/rollouts/{rollout_id}/abort", tags=["rollouts"], dependencies=operator, responses=transition)
        def abort_rollout(rollout_id: RolloutIdPath, request: Request, body: Transition | None = None) -> Rollout:
            """Stop the rollout and put every device back on the version it came from; 409 once it has ended."""
            service.abort(check_rollout_id(rollout_id), "operator", _reason(body), by=actor_of(request))
            return shown(rollout_id)

        @app.post("/v1/rollouts/{rollout_id}/promote", tags=["rollouts"], dependencies=operator, responses=transition)
        def promote_rollout(rollout_id: RolloutIdPath, request: Request, body: Transition | None = None) -> Rollout:
            """Advance one stage now, skipping the gates (after the last: complete); 409 once it has ended."""
            service.promote(check_rollout_id(rollout_id), "operator", _reason(body), by=actor_of(request))
            return shown(rollout_id)

    return add


def _reason(body: Transition | None) -> str:
    return body.reason.strip() if body is not None else ""
