"""The admin API's policy routes: set, list, show and delete scaling policies, and a device's effective policy.

Added to the app through ApiContext.extra_routes (process.py). A policy is checked before it is stored: its
document with the agent's own types, and the effective policy of every registered device's labels with it
in place (a pair of policies can each be valid and clash once overlaid). The desired state is not built
here: `on_change` tells the reconciler to recompute it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from typing import Annotated, Any

import structlog
from fastapi import FastAPI, Path, Request
from pydantic import BaseModel, ConfigDict, Field

from cloud_sync.api_audit import recorder
from cloud_sync.api_auth import BearerAuth, actor_of, as_auth, errors
from cloud_sync.api_schemas import (
    DEVICE_ID_PATTERN,
    POLICY_NAME_PATTERN,
    SELECTOR_SCHEMA,
    EffectivePolicy,
    PolicyList,
    PolicyView,
)
from cloud_sync.errors import InvalidArgument
from cloud_sync.policies import (
    MAX_PRIORITY,
    Policy,
    PolicyInvalid,
    check_document,
    check_policy_name,
    check_priority,
    effective_policy,
    matching_policies,
    policy_hash,
)
from cloud_sync.selectors import check_selector
from cloud_sync.store import DeviceRegistry, PolicyStore
from cloud_sync.store.audit import AuditDraft, AuditLog
from cloud_sync.store.database import now_ms

__all__ = ["policy_routes"]

log = structlog.get_logger(__name__)


class PolicyBody(BaseModel):
    """PUT /v1/policies/{name}. The values are checked by cloud_sync/policies.py, whose errors name the field."""

    model_config = ConfigDict(extra="forbid")
    # Typed as Any so that policies.py's checks answer, naming the field; the schema says what they take.
    selector: Any = Field(
        default_factory=dict,
        description="Label key -> value; {} matches every device.",
        json_schema_extra=SELECTOR_SCHEMA,
    )
    priority: Any = Field(
        default=0,
        description="Where policies set the same key, the higher wins.",
        json_schema_extra={"type": "integer", "minimum": 0, "maximum": MAX_PRIORITY},
    )
    document: Any = Field(
        description='Policy sections, e.g. {"inference": {"max_batch_size": 8}}.',
        json_schema_extra={"type": "object", "additionalProperties": {"type": "object"}},
    )


# The pattern in the schema only: check_policy_name's message says what a name may hold.
NamePath = Annotated[
    str,
    Path(max_length=128, json_schema_extra={"pattern": POLICY_NAME_PATTERN}, description="e.g. lab-batching"),
]


def policy_json(policy: Policy) -> PolicyView:
    return PolicyView.model_validate(asdict(policy))


def _checked(name: str, body: PolicyBody) -> Policy:
    check_policy_name(name)
    try:
        selector = check_selector(body.selector)
    except PolicyInvalid:
        raise
    except InvalidArgument as exc:
        raise PolicyInvalid("selector", exc.message) from None
    for text in (*selector, *selector.values()):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # valid JSON, not storable text: stored, it broke every listing of devices
            raise PolicyInvalid("selector", f"{text!r} is not valid Unicode (a lone surrogate)") from None
    return Policy(name, 0, selector, check_priority(body.priority), check_document(body.document), now_ms())


def _check_fleet(policies: list[Policy], devices: DeviceRegistry) -> None:
    """Refuse a set of policies under which some registered device's effective policy is invalid."""
    seen: set[tuple[tuple[str, str], ...]] = set()
    for device in devices.list_devices():
        labels = tuple(sorted(device.labels.items()))
        if device.revoked or labels in seen:
            continue
        seen.add(labels)
        try:
            check_document(effective_policy(device.labels, policies), "effective policy")
        except PolicyInvalid as exc:
            sources = ", ".join(p.name for p in matching_policies(device.labels, policies))
            raise PolicyInvalid(
                "document",
                f"device {device.device_id!r} (and any with its labels) would get an invalid policy from "
                f"{sources}: {exc.message}",
            ) from None


def policy_routes(
    store: PolicyStore,
    devices: DeviceRegistry,
    admin_token: str | BearerAuth,
    on_change: Callable[[], None],
    audit: AuditLog | None = None,
) -> Callable[[FastAPI], None]:
    """The routes as an ApiContext.extra_routes entry; `on_change()` runs after every stored change, and each
    change is recorded in `audit`. Changing policies is the admin role's (they reach every device)."""
    auth = as_auth(admin_token)
    viewer, admin = auth.require("viewer"), auth.require("admin")
    record = recorder(audit)

    def changed(event: str, policy: Policy) -> None:
        log.info(event, policy=policy.name, version=policy.version)
        try:
            on_change()
        except Exception as exc:  # the change is stored; the reconciler's periodic pass delivers it
            log.error("policy.on_change_failed", policy=policy.name, error=repr(exc))

    def add(app: FastAPI) -> None:
        @app.put(
            "/v1/policies/{name}",
            tags=["policies"],
            dependencies=admin,
            responses=errors(401, 403, 413, 422, 503),
        )
        def set_policy(name: NamePath, body: PolicyBody, request: Request) -> PolicyView:
            """Create or replace a policy; 422 names the field of a bad input (nothing is stored then)."""
            candidate = _checked(name, body)
            current = store.list()
            others = [p for p in current if p.name != name]
            _check_fleet([*others, candidate], devices)
            before = next((policy_json(p).model_dump() for p in current if p.name == name), None)
            policy = store.set(name, candidate.selector, candidate.priority, candidate.document)
            shown = policy_json(policy)
            record(AuditDraft(actor_of(request), "policy.set", f"policy/{name}", before, shown.model_dump()))
            changed("policy.set", policy)
            return shown

        @app.get("/v1/policies", tags=["policies"], dependencies=viewer, responses=errors(401, 403, 503))
        def list_policies() -> PolicyList:
            """Every policy, by name."""
            return PolicyList(policies=[policy_json(p) for p in store.list()])

        @app.get(
            "/v1/policies/{name}", tags=["policies"], dependencies=viewer, responses=errors(401, 403, 404, 422, 503)
        )
        def show_policy(name: NamePath) -> PolicyView:
            """One policy: its selector, priority, version and document."""
            return policy_json(store.get(name))

        @app.delete(
            "/v1/policies/{name}", tags=["policies"], dependencies=admin, responses=errors(401, 403, 404, 422, 503)
        )
        def delete_policy(name: NamePath, request: Request) -> PolicyView:
            """Remove a policy; devices it matched go back to what the remaining policies give them."""
            store.get(name)
            _check_fleet([p for p in store.list() if p.name != name], devices)
            policy = store.delete(name)
            shown = policy_json(policy)
            record(AuditDraft(actor_of(request), "policy.delete", f"policy/{name}", shown.model_dump(), None))
            changed("policy.deleted", policy)
            return shown

        @app.get(
            "/v1/devices/{device_id}/effective-policy",
            tags=["policies"],
            dependencies=viewer,
            responses=errors(401, 403, 404, 422, 503),
        )
        def device_effective_policy(
            device_id: Annotated[str, Path(max_length=128, json_schema_extra={"pattern": DEVICE_ID_PATTERN})],
        ) -> EffectivePolicy:
            """The policy document the device's desired state carries, and the policies it comes from."""
            device = devices.get_device(device_id)
            policies = store.list()
            document = effective_policy(device.labels, policies)
            return EffectivePolicy(
                device_id=device.device_id,
                policy=document,
                policy_hash=policy_hash(document),
                sources=[p.name for p in matching_policies(device.labels, policies)],
            )

    return add
