"""`edge-agent status`: the running agent's own account of itself, over edgefleet.v1.AgentAdmin/Status.

The agent side (`collect`, `AgentAdminServicer`) reads only in-memory state on its loop; the command side
(`query`, `as_json`, `render`) asks the agent's local endpoint and prints. Not a second source of truth:
every figure is the one telemetry, the reported state or /metrics also carry.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import grpc
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from edge_runtime import __version__
from edge_runtime.agent.health import running_batch_s
from edge_runtime.config import AgentConfig
from edgefleet.proto.edgefleet.v1 import admin_pb2, admin_pb2_grpc, state_pb2

__all__ = ["AgentAdminServicer", "NotRunning", "as_json", "collect", "local_targets", "query", "render"]

NOT_RUNNING = "is the agent running? (systemctl status edge-agent)"


class NotRunning(Exception):
    """No agent answered at any of the local endpoints the config names."""

    def __init__(self, tried: Sequence[str], detail: str) -> None:
        super().__init__(f"no answer from {', '.join(tried) or 'nowhere'} ({detail}): {NOT_RUNNING}")
        self.tried = list(tried)


# -- the agent's side -----------------------------------------------------------------------------------------


def collect(agent: Any, now_ms: int | None = None) -> admin_pb2.AgentStatus:
    """The status of `agent` (edge_runtime.agent.process.Agent); on its loop, reading memory only."""
    now_ms = time.time_ns() // 1_000_000 if now_ms is None else now_ms
    now = time.monotonic()
    config: AgentConfig = agent.config
    repo = agent.repository
    loaded = {(s.name, s.version): s for s in repo.models()}
    serving = []
    for status in repo.status():
        served = loaded.get((status.name, status.version))
        serving.append(
            admin_pb2.ServingModel(
                name=status.name,
                version=status.version,
                state=status.state.value,
                active=status.active,
                reason=status.reason,
                backend=status.backend,
                queue_depth=served.batcher.pending() if served is not None else 0,
                running_batch_s=round(running_batch_s(served.batcher, now), 3) if served is not None else 0.0,
                precision=status.precision,
            )
        )
    precision = {(s.name, s.version): s.precision for s in repo.status()}
    converging = []
    for p in agent.converger.progress():
        progress = p.to_proto()
        progress.precision = precision.get((p.name, p.version), "")
        converging.append(progress)
    converger = agent.converger
    message = admin_pb2.AgentStatus(
        agent_version=__version__,
        device_id=config.cloud.device_id,
        uptime_s=round(now - agent.began, 3),
        ready=repo.ready(),
        unhealthy=agent.unhealthy,
        serving=serving,
        desired_generation=converger.generation,
        converging=converging,
        desired_error=converger.error,
        outbox=_outbox(agent.outbox.counters(), config.buffer.max_bytes, now_ms),
        uplink=_uplink(agent.uploader, config),
        control=_control(agent.control, config),
    )
    return message


def _outbox(counters: Any, max_bytes: int, now_ms: int) -> admin_pb2.OutboxStatus:
    oldest = counters.oldest_created_at_ms
    lag = max(0.0, (now_ms - oldest) / 1000) if counters.depth and oldest is not None else 0.0
    return admin_pb2.OutboxStatus(
        depth=counters.depth,
        bytes=counters.bytes,
        produced_total=counters.produced_total,
        evicted_total=counters.evicted_total,
        delivered_total=counters.delivered_total,
        rejected_total=counters.rejected_total,
        acked_seq=counters.acked_seq,
        last_seq=counters.last_seq,
        upload_lag_s=round(lag, 3),
        max_bytes=max_bytes,
    )


def _uplink(uploader: Any, config: AgentConfig) -> admin_pb2.LinkStatus:
    if uploader is None:
        return admin_pb2.LinkStatus(configured=False, kind="grpc", target=config.cloud.grpc_target)
    s = uploader.status
    return admin_pb2.LinkStatus(
        configured=True,
        kind="grpc",
        target=config.cloud.grpc_target,
        connected=s.connected,  # the last upload stream was acknowledged
        last_success_ms=s.last_success_ms,
        last_error=s.last_error,
        consecutive_failures=s.consecutive_failures,
    )


def _control(control: Any, config: AgentConfig) -> admin_pb2.LinkStatus:
    kind, target = ("mqtt", config.mqtt.url) if config.mqtt.url else ("grpc", config.cloud.grpc_target)
    if control is None:
        return admin_pb2.LinkStatus(configured=False, kind=kind if target else "", target=target)
    return admin_pb2.LinkStatus(configured=True, kind=kind, target=target, connected=bool(control.connected))


class AgentAdminServicer(admin_pb2_grpc.AgentAdminServicer):
    """edgefleet.v1.AgentAdmin on the agent's gRPC server (registered by InferenceServer.start)."""

    def __init__(self, agent: Any) -> None:
        self._agent = agent

    async def Status(self, request: admin_pb2.AgentStatusRequest, context: Any) -> admin_pb2.AgentStatus:
        return collect(self._agent)


# -- the command's side ---------------------------------------------------------------------------------------


def local_targets(config: AgentConfig) -> list[str]:
    """Where a running agent with this config answers: its Unix socket, then its loopback TCP address (not
    port 0: the port the agent was given is not in the config)."""
    targets = []
    if config.server.unix_socket:
        targets.append(f"unix:{config.server.unix_socket}")
    if config.server.tcp_address and not config.server.tcp_address.endswith(":0"):
        targets.append(config.server.tcp_address)
    return targets


def query(targets: Sequence[str], timeout_s: float = 5.0) -> admin_pb2.AgentStatus:
    """Ask the first target that answers; NotRunning naming every target tried when none does."""
    detail = "no local endpoint in the config"
    for target in targets:
        with grpc.insecure_channel(target) as channel:
            stub = admin_pb2_grpc.AgentAdminStub(channel)
            try:
                answer: admin_pb2.AgentStatus = stub.Status(admin_pb2.AgentStatusRequest(), timeout=timeout_s)
                return answer
            except grpc.RpcError as exc:
                detail = f"{exc.code().name}: {exc.details()}"
    raise NotRunning(targets, detail)


def as_json(message: Message) -> dict[str, Any]:
    """`message` as plain JSON data: every field present, integers as ints (protobuf's own JSON writes 64-bit
    integers as strings), enums by name, field names as in the .proto."""
    out: dict[str, Any] = {}
    for fd in message.DESCRIPTOR.fields:
        value = getattr(message, fd.name)
        if fd.is_repeated:
            out[fd.name] = [_json_value(fd, item) for item in value]
        else:
            out[fd.name] = _json_value(fd, value)
    return out


def _json_value(fd: Any, value: Any) -> Any:
    if fd.type == FieldDescriptor.TYPE_MESSAGE:
        return as_json(value)
    if fd.type == FieldDescriptor.TYPE_ENUM:
        return fd.enum_type.values_by_number[value].name if value in fd.enum_type.values_by_number else value
    if fd.type in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return float(value)
    return value


_MODEL_STATE_PREFIX = "MODEL_STATE_"
_ROLE_PREFIX = "MODEL_ROLE_"


def render(status: admin_pb2.AgentStatus) -> str:
    """A plain-text report for a terminal (and for a pipe: no colours, tab-free aligned columns)."""
    lines = [
        f"agent      edge-agent {status.agent_version}, up {_duration(status.uptime_s)}"
        + (f", device {status.device_id}" if status.device_id else ""),
        f"ready      {'yes' if status.ready else 'no'}",
        f"health     {'ok' if not status.unhealthy else 'UNHEALTHY: ' + status.unhealthy}",
    ]
    o = status.outbox
    lines.append(
        f"outbox     {o.depth} record(s), {o.bytes} of {o.max_bytes} bytes; upload lag {o.upload_lag_s:.1f} s; "
        f"produced {o.produced_total}, delivered {o.delivered_total}, evicted {o.evicted_total}, "
        f"rejected {o.rejected_total}"
    )
    lines.append(f"uplink     {_link(status.uplink, uplink=True)}")
    lines.append(f"control    {_link(status.control)}")
    desired = f"generation {status.desired_generation}" if status.desired_generation else "none accepted"
    lines.append(f"desired    {desired}" + (f"; refused: {status.desired_error}" if status.desired_error else ""))
    lines.append("")
    rows = [["MODEL", "VERSION", "STATE", "ACTIVE", "QUEUE", "BACKEND", "PRECISION", "REASON"]]
    for m in status.serving:
        row = [m.name, str(m.version), m.state, "yes" if m.active else "", str(m.queue_depth), m.backend, m.precision]
        rows.append([*row, m.reason])
    if len(rows) == 1:
        lines.append("no models loaded")
    else:
        lines.extend(_table(rows))
    if status.converging:
        lines.append("")
        rows = [["ASSIGNED", "VERSION", "ROLE", "STATE", "PROGRESS", "PRECISION", "REASON"]]
        for p in status.converging:
            state = state_pb2.ModelState.Name(p.state).removeprefix(_MODEL_STATE_PREFIX)
            role = state_pb2.ModelRole.Name(p.role).removeprefix(_ROLE_PREFIX)
            rows.append([p.name, str(p.version), role, state, f"{p.progress * 100:.0f}%", p.precision, p.reason])
        lines.extend(_table(rows))
    return "\n".join(lines)


def _link(link: admin_pb2.LinkStatus, uplink: bool = False) -> str:
    if not link.configured:
        return "not configured"
    if link.connected:
        state = "connected"
    elif uplink and not (link.last_error or link.last_success_ms):
        state = "nothing uploaded yet"
    else:
        state = "NOT connected"
    text = f"{link.kind} {link.target}: {state}"
    if link.last_error and not link.connected:
        text += f" ({link.consecutive_failures} failure(s); last: {link.last_error})"
    return text


def _duration(seconds: float) -> str:
    s = int(seconds)
    if s < 120:
        return f"{s} s"
    if s < 7200:
        return f"{s // 60} min"
    return f"{s // 3600} h {s % 3600 // 60} min"


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
