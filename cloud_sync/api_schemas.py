"""The admin API's response bodies as Pydantic models, so the OpenAPI schema says what each route answers.

Times are integer ms since the epoch, counts integers, rates and durations numbers. Documents that come from
protobuf (a desired state, a report, telemetry) are objects in the protobuf JSON mapping, with 64-bit
integers as JSON numbers (`message_json`), not the mapping's strings. Not the request bodies: those stay
beside their routes.
"""

from __future__ import annotations

from typing import Any, Literal

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message
from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "DEVICE_ID_PATTERN",
    "LABELS_SCHEMA",
    "MODEL_NAME_PATTERN",
    "POLICY_NAME_PATTERN",
    "SELECTOR_SCHEMA",
    "SELECTOR_TEXT_PATTERN",
    "SHA256_PATTERN",
    "VERSION_REF_PATTERN",
    "Assignment",
    "AssignmentList",
    "Blob",
    "Comparison",
    "CreatedDevice",
    "Cursor",
    "Device",
    "DeviceDetail",
    "DeviceList",
    "DeviceState",
    "EffectivePolicy",
    "EnrollmentTokenList",
    "Health",
    "MintedToken",
    "ModelList",
    "ModelVersion",
    "PolicyList",
    "PolicyView",
    "QuarantinePage",
    "ResultPage",
    "Rollout",
    "RolloutEventPage",
    "RolloutList",
    "SigningKey",
    "Unassigned",
    "message_json",
]

Labels = dict[str, str]
Document = dict[str, Any]

# What store/devices.py's check_labels and selectors.py's check_selector take, for the request schemas (their
# messages, not pydantic's, answer a bad one: they say what is allowed).
_LABEL_KEY = {"pattern": "^[A-Za-z0-9][A-Za-z0-9._/-]{0,62}$"}
LABELS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "maxProperties": 64,
    "propertyNames": _LABEL_KEY,
    "additionalProperties": {"type": "string", "maxLength": 256, "pattern": "^[^\\x00]*$"},
}
# As store/assignments.py's check_model_name and the registry's check_model_ref take them.
MODEL_NAME_PATTERN = "^[a-z0-9][a-z0-9._-]{0,62}$"
# 1..2**31-1 in decimal, as the registry takes a version.
_VERSION = (
    "([1-9][0-9]{0,8}|1[0-9]{9}|20[0-9]{8}|21[0-3][0-9]{7}|214[0-6][0-9]{6}|2147[0-3][0-9]{5}|21474[0-7][0-9]{4}"
    "|214748[0-2][0-9]{3}|2147483[0-5][0-9]{2}|21474836[0-3][0-9]|214748364[0-7])"
)
# name:version, e.g. digits:2 (GET /v1/models/compare).
VERSION_REF_PATTERN = f"^[a-z0-9][a-z0-9._-]{{0,62}}:{_VERSION}$"
DEVICE_ID_PATTERN = "^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
# As policies.py's check_policy_name takes it.
POLICY_NAME_PATTERN = "^[a-z0-9][a-z0-9._-]{0,62}$"
SHA256_PATTERN = "^[0-9a-f]{64}$"
# A selector as text (GET /v1/models/compare): key=value,... or * or empty, as format_selector writes it.
_TERM = "[A-Za-z0-9][A-Za-z0-9._/-]{0,62}=[^,\\x00]{0,256}"
SELECTOR_TEXT_PATTERN = f"^(\\*|{_TERM}(,{_TERM}){{0,31}})?$"
SELECTOR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "maxProperties": 32,
    "propertyNames": _LABEL_KEY,
    "additionalProperties": {"type": "string", "maxLength": 256, "pattern": "^[^,\\x00]*$"},
}


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Health(_Body):
    status: Literal["ok"]


# -- devices -------------------------------------------------------------------------------------------------


class Device(_Body):
    device_id: str
    labels: Labels
    created_at_ms: int
    revoked: bool


class DeviceRow(Device):
    """A row of GET /v1/devices: the device, its presence and its desired/reported generations."""

    online: bool | None = Field(description="As the broker last told it; null before any status message.")
    last_seen_ms: int | None
    desired_generation: int | None = Field(description="null: no assignment or policy selects the device.")
    reported_generation: int | None
    converged: bool | None
    state_error: str


class DeviceList(_Body):
    devices: list[DeviceRow]


class CreatedDevice(_Body):
    device_id: str
    labels: Labels
    token: str = Field(description="The device's token, shown only in this answer.")


class Uplink(_Body):
    """Upload counters: stored + evicted + rejected = produced."""

    stored: int
    evicted: int
    device_produced: int
    device_evicted: int
    acked_seq: int
    duplicates_total: int
    max_stored_seq: int
    last_upload_at_ms: int | None
    rejected: int
    device_rejected: int
    clock_skewed_total: int
    max_clock_skew_ms: int


class ModelProgress(_Body):
    """One model of a device: what it should run, what it runs, and how far the change is."""

    name: str
    desired_version: int | None
    reported_version: int | None
    state: str = Field(description="DOWNLOADING, VERIFYING, BUILDING, READY, ACTIVE, FAILED, PENDING or UNKNOWN.")
    reason: str
    progress: float
    attempts: int
    next_attempt_at_ms: int


class DeviceState(_Body):
    device_id: str
    desired: Document | None = Field(description="The DesiredState message; null when none was issued.")
    reported: Document | None = Field(description="The last ReportedState message, with received_at_ms.")
    models: list[ModelProgress]
    in_sync: bool
    converged: bool
    problems: list[str]


class ModelFigures(_Body):
    """A model version's telemetry over a window (sums over its devices)."""

    model: str
    version: int
    devices: int
    windows: int
    requests: int
    errors: int
    inferences: int
    p99_ms: float
    p99_weighted_ms: float
    p99_max_ms: float
    mean_batch_size: float
    requests_per_s: float
    cpu_seconds: float
    energy_joules: float
    shadow_compared: int
    shadow_agreed: int
    error_rate: float
    window_s: int


class DeviceDetail(Device):
    """GET /v1/devices/{device_id}; presence, telemetry and state only where cloud-sync tracks them."""

    uplink: Uplink
    state: DeviceState | None = None
    online: bool | None = None
    last_seen_ms: int | None = None
    telemetry: Document | None = Field(None, description="The newest Telemetry message, with clock_skew_ms.")
    recent_models: list[ModelFigures] = Field(default_factory=list)


class QuarantineEntry(_Body):
    device_id: str
    seq: int
    reason: str
    source: Literal["cloud", "device"]
    created_at_ms: int | None
    received_at_ms: int
    record: str | None = Field(description="base64 of the first bytes kept; null for a rejection the device declared.")
    record_size: int
    record_bytes: int


class QuarantinePage(_Body):
    quarantine: list[QuarantineEntry]
    next_after_seq: int


class Result(_Body):
    id: int
    device_id: str
    seq: int
    created_at_ms: int
    model: str
    version: int
    priority: int
    kind: int
    payload_type: str
    payload: str = Field(description="base64")
    payload_bytes: int
    request_id: str
    received_at_ms: int
    checksum: int | None


class ResultPage(_Body):
    results: list[Result]
    next_after_id: int


class Cursor(_Body):
    after_id: int


# -- models --------------------------------------------------------------------------------------------------


class Blob(_Body):
    sha256: str
    size: int


class FileInfo(_Body):
    sha256: str
    size: int


class ModelVersion(_Body):
    name: str
    version: int
    sha256: str
    size: int
    files: dict[str, FileInfo]
    manifest: Document
    serial: int
    key_id: str
    signed_at_ms: int
    expires_at_ms: int
    created_at_ms: int


class ModelList(_Body):
    models: list[ModelVersion]


class SigningKey(_Body):
    public_key: str = Field(description="hex of the raw 32-byte ed25519 key")
    key_id: str


class Figures(_Body):
    """One version's five figures in GET /v1/models/compare."""

    model: str
    version: int
    devices: int
    requests: int
    errors: int
    inferences: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    p99_worst_device_ms: float
    p99_max_ms: float
    requests_per_s: float
    mean_batch_size: float
    error_rate: float
    cpu_seconds: float
    cpu_seconds_per_inference: float
    energy_joules: float | None = Field(description="null where the devices report no energy.")
    joules_per_inference: float | None
    shadow_compared: int
    shadow_agreement: float | None


class Comparison(_Body):
    selector: Labels
    selector_text: str
    since_s: int
    devices_selected: int
    a: Figures
    b: Figures
    relative: dict[str, float | None] = Field(description="B / A per figure; null where nothing compares.")


# -- policies, enrollment, assignments -----------------------------------------------------------------------


class PolicyView(_Body):
    name: str
    version: int
    selector: Labels
    priority: int
    document: dict[str, Document]
    updated_at_ms: int


class PolicyList(_Body):
    policies: list[PolicyView]


class EffectivePolicy(_Body):
    device_id: str
    policy: dict[str, Document]
    policy_hash: str
    sources: list[str]


class MintedToken(_Body):
    token: str = Field(description="The one-time token, shown only in this answer.")
    expires_at_ms: int
    labels: Labels
    device_id: str | None


class EnrollmentToken(_Body):
    token_id: str
    labels: Labels
    device_id: str | None
    created_at_ms: int
    expires_at_ms: int
    used_at_ms: int | None
    used_by: str | None
    state: Literal["unused", "used", "expired"]


class EnrollmentTokenList(_Body):
    tokens: list[EnrollmentToken]


class Assignment(_Body):
    model: str
    version: int
    selector: Labels
    selector_text: str
    priority: int
    created_at_ms: int
    updated_at_ms: int


class AssignmentList(_Body):
    assignments: list[Assignment]


class Unassigned(_Body):
    model: str
    selector: Labels
    removed: bool


# -- rollouts ------------------------------------------------------------------------------------------------


class Stage(_Body):
    mode: Literal["shadow", "active"]
    percent: float
    bake_s: float


class Gates(_Body):
    max_error_rate: float | None
    max_p99_ratio: float | None
    min_shadow_agreement: float | None
    min_devices: int
    max_apply_failures: int
    max_fallback_rate: float | None
    min_requests: int


class StageProgress(Stage):
    index: int
    text: str
    devices: int
    status: Literal["done", "current", "pending", "aborted"]


class RolloutSummary(_Body):
    id: str
    model: str
    from_version: int
    to_version: int
    selector: Labels
    selector_text: str
    stages: list[Stage]
    stages_text: str
    gates: Gates
    gates_text: str
    shadow_sample_rate: float
    state: Literal["running", "paused", "completed", "aborted"]
    stage_index: int
    stage_started_at_ms: int
    created_at_ms: int
    updated_at_ms: int
    reason: str
    last_evaluation: Document | None = Field(description="The controller's last gate evaluation.")


class Rollout(RolloutSummary):
    """A rollout with its progress: per stage its devices and status, the current stage's device ids."""

    matched_devices: int
    stage_devices: list[str]
    progress: list[StageProgress]


class RolloutList(_Body):
    rollouts: list[RolloutSummary]


class RolloutEvent(_Body):
    id: int
    rollout_id: str
    at_ms: int
    kind: str
    actor: str
    reason: str
    values: Document
    stage_index: int


class RolloutEventPage(_Body):
    events: list[RolloutEvent]
    next_after_id: int


# -- protobuf as JSON ----------------------------------------------------------------------------------------

_INT64 = {
    FieldDescriptor.TYPE_INT64,
    FieldDescriptor.TYPE_UINT64,
    FieldDescriptor.TYPE_SINT64,
    FieldDescriptor.TYPE_FIXED64,
    FieldDescriptor.TYPE_SFIXED64,
}


def message_json(message: Message) -> dict[str, Any]:
    """`message` in the protobuf JSON mapping (field names as in the .proto, defaults shown), 64-bit integers
    as numbers: the mapping writes them as strings, and a client then read `"timestamp_ms": "17..."`."""
    data = MessageToDict(message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    _int64_as_numbers(message, data)
    return data


def _int64_as_numbers(message: Message, data: dict[str, Any]) -> None:
    for field in message.DESCRIPTOR.fields:
        if field.name not in data:
            continue
        value = data[field.name]
        if field.type in _INT64:
            data[field.name] = [int(v) for v in value] if isinstance(value, list) else int(value)
        elif field.type == FieldDescriptor.TYPE_MESSAGE and not _is_map(field):
            nested = getattr(message, field.name)
            if isinstance(value, list):
                for sub_message, sub_data in zip(nested, value, strict=True):
                    if isinstance(sub_data, dict):
                        _int64_as_numbers(sub_message, sub_data)
            elif isinstance(value, dict):
                _int64_as_numbers(nested, value)


def _is_map(field: Any) -> bool:
    # No map in these messages holds a 64-bit integer; a map is left as the mapping writes it.
    return field.message_type is not None and bool(field.message_type.GetOptions().map_entry)
