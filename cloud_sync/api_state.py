"""The admin API's desired-state routes: model assignments, and each device's desired vs reported state.

Added to the app through ApiContext.extra_routes (process.py); `DeviceStates` also gives GET /v1/devices its
generation columns. Every change calls `on_change` (the reconciler recomputes the devices' desired states
before the call answers). Not the computation (desired.py, reconciler.py) nor the store.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import FastAPI, Path, Query, Request
from google.protobuf.message import Message
from pydantic import BaseModel, ConfigDict, Field

from cloud_sync.api_audit import recorder
from cloud_sync.api_auth import BearerAuth, actor_of, as_auth, errors
from cloud_sync.api_schemas import (
    DEVICE_ID_PATTERN,
    MODEL_NAME_PATTERN,
    SELECTOR_SCHEMA,
    Assignment,
    AssignmentList,
    DeviceState,
    Unassigned,
    message_json,
)
from cloud_sync.errors import InvalidArgument
from cloud_sync.rollouts.plan import Variant, variant_assignment_refusal
from cloud_sync.selectors import check_selector, format_selector
from cloud_sync.store.assignments import AssignmentStore, check_model_name
from cloud_sync.store.audit import AuditDraft, AuditLog
from cloud_sync.store.control import ControlStore, StoredReport
from cloud_sync.store.devices import DeviceRegistry
from edgefleet.proto.edgefleet.v1.state_pb2 import DesiredState, ModelRole, ModelState, ModelStatus

__all__ = ["DeviceStates", "state_routes"]

# (name, version) -> the registry's sha256, or None when the registry holds no such version.
VersionLookup = Callable[[str, int], str | None]
# (name, version) -> the registered version's lineage when it is a compressed variant, else None.
VariantLookup = Callable[[str, int], Variant | None]


class AssignmentBody(BaseModel):
    """PUT /v1/assignments."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(
        min_length=1,
        max_length=63,
        description="Model name, e.g. digits.",
        json_schema_extra={"pattern": MODEL_NAME_PATTERN},
    )
    version: int = Field(ge=1, le=2**31 - 1, description="A version the registry holds.")
    selector: dict[str, str] = Field(
        default_factory=dict,
        description="Label key -> value; {} matches every device.",
        json_schema_extra=SELECTOR_SCHEMA,
    )
    priority: int = Field(
        0, ge=-1_000_000, le=1_000_000, description="Where assignments of a model overlap, the higher wins."
    )
    force: bool = Field(
        False,
        description="Assign a compressed variant (its manifest has a lineage) without proving it in a rollout's "
        "shadow stage first; the audit log records it.",
    )


class UnassignBody(BaseModel):
    """DELETE /v1/assignments."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1, max_length=63, json_schema_extra={"pattern": MODEL_NAME_PATTERN})
    selector: dict[str, str] = Field(default_factory=dict, json_schema_extra=SELECTOR_SCHEMA)


def _message_json(message: Message) -> dict[str, Any]:
    return message_json(message)


def _state_name(state: int) -> str:
    return ModelState.Name(state).removeprefix("MODEL_STATE_")  # type: ignore[arg-type]


def _status_json(name: str, desired_version: int | None, statuses: list[ModelStatus]) -> dict[str, Any]:
    """One model of a device: what it should run, what it runs, and how far the change is."""
    running = next((s for s in statuses if s.state == ModelState.MODEL_STATE_ACTIVE), None)
    wanted = next((s for s in statuses if s.version == desired_version), None)
    about = wanted or running
    return {
        "name": name,
        "desired_version": desired_version,
        "reported_version": running.version if running is not None else None,
        "state": _state_name(about.state) if about is not None else ("PENDING" if desired_version else "UNKNOWN"),
        "reason": about.reason if about is not None else "",
        "progress": about.progress if about is not None else 0.0,
        "attempts": about.attempts if about is not None else 0,
        "next_attempt_at_ms": about.next_attempt_at_ms if about is not None else 0,
    }


def device_state_json(
    device_id: str, desired: DesiredState | None, reported: StoredReport | None, problems: list[str]
) -> dict[str, Any]:
    """GET /v1/devices/{id}/state: desired and reported side by side, per model, and whether they agree."""
    statuses: dict[str, list[ModelStatus]] = {}
    if reported is not None:
        for status in reported.state.models:
            statuses.setdefault(status.name, []).append(status)
    # A model's desired version is its ACTIVE one; a rollout's SHADOW candidate beside it is in `desired`.
    shadow = ModelRole.MODEL_ROLE_SHADOW
    wanted = {m.name: m.version for m in desired.models if m.role != shadow} if desired is not None else {}
    names = sorted({*wanted, *statuses})
    in_sync = desired is not None and reported is not None and reported.state.generation == desired.generation
    return {
        "device_id": device_id,
        "desired": _message_json(desired) if desired is not None else None,
        "reported": {**_message_json(reported.state), "received_at_ms": reported.received_at_ms} if reported else None,
        "models": [_status_json(name, wanted.get(name), statuses.get(name, [])) for name in names],
        "in_sync": in_sync,
        "converged": in_sync and reported is not None and reported.state.converged,
        "problems": problems,
    }


class DeviceStates:
    """Desired vs reported state of devices, as the API shows them (blocking: from FastAPI's threadpool)."""

    def __init__(self, control: ControlStore, problems: Callable[[str], list[str]] | None = None) -> None:
        self._control = control
        self._problems = problems or (lambda _device_id: [])

    def summaries(self) -> dict[str, dict[str, Any]]:
        """Per device with a desired state: its generations and whether it converged (a few queries)."""
        generations = self._control.generations()
        reports = self._control.reported_many()
        shown: dict[str, dict[str, Any]] = {}
        for device_id, g in generations.items():
            report = reports.get(device_id)
            in_sync = report is not None and report.state.generation == g.desired_generation
            shown[device_id] = {
                "desired_generation": g.desired_generation,
                "reported_generation": g.reported_generation,
                "converged": in_sync and report is not None and report.state.converged,
                "state_error": report.state.error if report is not None else "",
            }
        return shown

    def state(self, device_id: str) -> dict[str, Any]:
        return device_state_json(
            device_id, self._control.desired(device_id), self._control.reported(device_id), self._problems(device_id)
        )


def _checked_version(versions: VersionLookup, model: str, version: int) -> None:
    check_model_name(model)
    if versions(model, version) is None:
        raise InvalidArgument(f"model {model}:{version} is not in the registry: push it first (fleetctl models push)")


def _assignment_of(assignments: AssignmentStore, model: str, selector: dict[str, str]) -> dict[str, Any] | None:
    """The assignment of (model, selector) as it is now, for the audit record's `before`."""
    key = format_selector(selector)
    found = [a for a in assignments.list(model) if format_selector(a.selector) == key]
    return found[0].to_json() if found else None


def state_routes(
    assignments: AssignmentStore,
    devices: DeviceRegistry,
    states: DeviceStates,
    admin_token: str | BearerAuth,
    versions: VersionLookup,
    on_change: Callable[[], None],
    audit: AuditLog | None = None,
    variants: VariantLookup | None = None,
) -> Callable[[FastAPI], None]:
    """The routes, for ApiContext.extra_routes; each change is recorded in `audit`. `variants` tells a compressed
    variant, which is assigned only with `force` (else a rollout through a shadow stage proves it first)."""
    auth = as_auth(admin_token)
    viewer, operator = auth.require("viewer"), auth.require("operator")
    record = recorder(audit)
    changes = errors(401, 403, 413, 422, 503)

    def add(app: FastAPI) -> None:
        @app.put("/v1/assignments", tags=["assignments"], dependencies=operator, responses=changes)
        def assign(body: AssignmentBody, request: Request) -> Assignment:
            """Assign a model version to the devices a selector matches (replaces that model+selector's one)."""
            selector = check_selector(body.selector)
            _checked_version(versions, body.model, body.version)
            variant = variants(body.model, body.version) if variants is not None else None
            if variant is not None and not body.force:
                raise InvalidArgument(variant_assignment_refusal(body.model, body.version, variant))
            before = _assignment_of(assignments, body.model, selector)
            assignment = assignments.assign(body.model, body.version, selector, body.priority)
            target = f"assignment/{body.model}/{format_selector(selector)}"
            after, why = assignment.to_json(), ""
            if variant is not None:
                after = {**after, "forced": True, "variant": variant.to_json()}
                why = "forced: a compressed variant assigned without a rollout's shadow stage"
            record(AuditDraft(actor_of(request), "assignment.set", target, before, after, why))
            on_change()
            return Assignment.model_validate(assignment.to_json())

        @app.delete(
            "/v1/assignments",
            tags=["assignments"],
            dependencies=operator,
            responses=errors(401, 403, 404, 413, 422, 503),
        )
        def unassign(body: UnassignBody, request: Request) -> Unassigned:
            """Remove a model's assignment to a selector; devices keep what they run unless another applies."""
            selector = check_selector(body.selector)
            before = _assignment_of(assignments, body.model, selector)
            assignments.unassign(body.model, selector)
            target = f"assignment/{body.model}/{format_selector(selector)}"
            record(AuditDraft(actor_of(request), "assignment.delete", target, before, None))
            on_change()
            return Unassigned(model=body.model, selector=body.selector, removed=True)

        @app.get("/v1/assignments", tags=["assignments"], dependencies=viewer, responses=errors(401, 403, 422, 503))
        def list_assignments(
            model: Annotated[str | None, Query(min_length=1, max_length=63, pattern=MODEL_NAME_PATTERN)] = None,
        ) -> AssignmentList:
            """Model assignments (of one model with `model`), by model then selector."""
            return AssignmentList.model_validate({"assignments": [a.to_json() for a in assignments.list(model)]})

        @app.get(
            "/v1/devices/{device_id}/state",
            tags=["devices"],
            dependencies=viewer,
            responses=errors(401, 403, 404, 422, 503),
        )
        def device_state(
            device_id: Annotated[str, Path(max_length=128, json_schema_extra={"pattern": DEVICE_ID_PATTERN})],
        ) -> DeviceState:
            """The device's desired state, its last report, per model desired vs reported, and whether in sync."""
            revoked = devices.get_device(device_id).revoked  # NotFound: 404
            state = states.state(device_id)
            state["converged"] = state["converged"] and not revoked  # a revoked device's report does not count
            return DeviceState.model_validate(state)

    return add
