"""What the converger reports and decides without doing anything: one assignment's progress, the checked
assignments of a desired state, step deadlines, retry backoff, and how a failure is told and classified.

Pure (no I/O, no loop): edge_runtime/control/converge.py sequences the steps around these.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from edge_runtime.errors import ConfigError, DownloadFailed, EdgeRuntimeError, StepTimeout
from edge_runtime.models.repository import ModelStatus
from edge_runtime.models.served import ModelState
from edgefleet.proto.edgefleet.v1 import state_pb2

__all__ = [
    "BACKOFF_CAP_S",
    "BACKOFF_FIRST_S",
    "SLOWEST_ATTEMPT",
    "Deadlines",
    "ModelProgress",
    "assignments",
    "backoff_delay",
    "failure_reason",
    "package_fault",
    "repository_status",
    "same_version",
]

BACKOFF_FIRST_S = 1.0
BACKOFF_CAP_S = 300.0
SLOWEST_ATTEMPT = 30  # an attempt number whose backoff is the cap

_ACTIVE = state_pb2.MODEL_ROLE_ACTIVE
_SHADOW = state_pb2.MODEL_ROLE_SHADOW


@dataclass(frozen=True)
class Deadlines:
    """How long each step may take (seconds). Download: without progress; warm-up is part of the build."""

    download_stall_s: float = 60.0
    verify_s: float = 120.0
    build_s: float = 30 * 60.0
    activate_s: float = 120.0


def backoff_delay(failures: int, rng: random.Random | None = None) -> float:
    """Seconds before attempt `failures + 1`: 1 s doubling to 5 min, jittered in [half, whole] so a fleet that
    failed together does not retry together, and never near zero."""
    ceiling = min(BACKOFF_CAP_S, BACKOFF_FIRST_S * 2 ** min(max(failures - 1, 0), 30))
    return (rng or random).uniform(ceiling / 2, ceiling)


@dataclass
class ModelProgress:
    """Where one assignment of the accepted desired state is, as reported."""

    name: str
    version: int
    role: int
    sha256: str
    state: int = state_pb2.MODEL_STATE_DOWNLOADING
    reason: str = ""
    progress: float = 0.0
    attempts: int = 0
    next_attempt_at_ms: int = 0
    backend: str = ""
    # SHADOW role: the share of the active version's requests mirrored to this one (0..1).
    shadow_sample_rate: float = 0.0
    # The last failure was the package's own (package_fault()), not the link's.
    package_fault: bool = False

    @property
    def done(self) -> bool:
        """Nothing left to do: ACTIVE in the ACTIVE role, READY in the SHADOW role."""
        goal = state_pb2.MODEL_STATE_READY if self.role == _SHADOW else state_pb2.MODEL_STATE_ACTIVE
        return self.state == goal

    def to_proto(self) -> state_pb2.ModelStatus:
        return state_pb2.ModelStatus(
            name=self.name,
            version=self.version,
            role=self.role,  # type: ignore[arg-type]  # the proto enum's int
            state=self.state,  # type: ignore[arg-type]
            reason=self.reason,
            backend=self.backend,
            progress=self.progress,
            sha256=self.sha256,
            attempts=self.attempts,
            next_attempt_at_ms=self.next_attempt_at_ms,
            package_fault=self.state == state_pb2.MODEL_STATE_FAILED and self.package_fault,
        )


def repository_status(status: ModelStatus) -> state_pb2.ModelStatus:
    """A loaded version's state as the control plane reports it (LOADING covers verifying and building)."""
    if status.state is ModelState.FAILED:
        state = state_pb2.MODEL_STATE_FAILED
    elif status.state is ModelState.LOADING:
        state = state_pb2.MODEL_STATE_BUILDING
    else:
        state = state_pb2.MODEL_STATE_ACTIVE if status.active else state_pb2.MODEL_STATE_READY
    role = state_pb2.MODEL_ROLE_ACTIVE if status.active else state_pb2.MODEL_ROLE_UNSPECIFIED
    return state_pb2.ModelStatus(
        name=status.name,
        version=status.version,
        role=role,
        state=state,
        reason=status.reason,
        backend=status.backend,
        precision=status.precision,
    )


def assignments(state: state_pb2.DesiredState) -> list[ModelProgress]:
    """The state's model assignments, checked: per model name one ACTIVE and at most one SHADOW of another
    version, a version, a known role, a shadow sample rate within 0..1. ConfigError else."""
    from edge_runtime.models.package import check_ref

    seen: set[tuple[str, int]] = set()
    versions: dict[str, int] = {}
    out: list[ModelProgress] = []
    for m in state.models:
        try:
            check_ref(m.name, m.version)
        except EdgeRuntimeError as exc:
            raise ConfigError(f"models: {exc}") from None
        if m.role not in (_ACTIVE, _SHADOW):
            raise ConfigError(f"models: {m.name}:{m.version} has no role (ACTIVE or SHADOW)")
        if (m.name, m.role) in seen:
            raise ConfigError(
                f"models: {m.name!r} is assigned twice; one version per model (and at most one SHADOW version)"
            )
        if versions.get(m.name) == m.version:
            raise ConfigError(
                f"models: {m.name}:{m.version} is assigned both ACTIVE and SHADOW; a version cannot shadow itself"
            )
        if not 0.0 <= m.shadow_sample_rate <= 1.0:  # NaN fails too
            raise ConfigError(f"models: {m.name}:{m.version} shadow_sample_rate must be within 0..1")
        if m.sha256 and not (len(m.sha256) == 64 and all(c in "0123456789abcdef" for c in m.sha256)):
            raise ConfigError(f"models: {m.name}:{m.version} sha256 must be 64 lower-case hex digits")
        seen.add((m.name, m.role))
        versions[m.name] = m.version
        rate = m.shadow_sample_rate if m.role == _SHADOW else 0.0
        out.append(ModelProgress(m.name, m.version, m.role, m.sha256, shadow_sample_rate=rate))
    return out


def same_version(running: tuple[int, str], version: int, sha256: str) -> bool:
    return running[0] == version and (not sha256 or running[1] == sha256)


def package_fault(exc: BaseException) -> bool:
    """Whether a failure is the package's own - it does not verify, build, load, warm up or switch - rather than
    the link's: a download cut or stalled, the cloud away or refusing the credential, a full disk. A rollout's
    apply-failure gate counts only the package's: a cloud-sync restart mid-rollout is no fault of the candidate."""
    if isinstance(exc, (DownloadFailed, OSError)):
        return False
    if isinstance(exc, StepTimeout):
        return exc.step not in ("download", "verification")
    return True


def failure_reason(exc: BaseException) -> str:
    """A FAILED reason: the reason word of a verification failure leads, so operators can search for it."""
    text = str(exc) or type(exc).__name__
    reason = getattr(exc, "reason", None)
    if isinstance(reason, str) and reason and not text.startswith(reason):
        text = f"{reason}: {text}"
    return text[:1000]
