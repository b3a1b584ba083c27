"""The metric families fed through hooks (AgentMetrics.track_uplink / track_model_states / outbox limits,
RolloutMetrics, cloud-sync's metrics_registry), rendered over real objects: a real outbox, a real store.

Shared by test_collectors.py (their behaviour) and test_dashboards.py (the names the dashboards may use).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest

from cloud_sync.rollouts.metrics import RolloutMetrics
from cloud_sync.store.database import open_database
from cloud_sync.telemetry.metrics import metrics_registry
from edge_runtime.observability.metrics import AgentMetrics
from edge_runtime.outbox import Outbox
from edge_runtime.sync.uplink import UplinkStatus
from edgefleet.policy import BufferPolicy
from edgefleet.proto.edgefleet.v1 import state_pb2


@dataclass
class UplinkState:
    """What the uploader keeps (its UplinkStatus) and the failures by code the hook takes."""

    status: UplinkStatus = field(default_factory=UplinkStatus)
    failures: dict[str, int] = field(default_factory=dict)


def agent_metrics(outbox: Outbox, uplink: UplinkState, models: list[state_pb2.ModelStatus]) -> AgentMetrics:
    """AgentMetrics with every hook the agent process wires (docs/notes/metrics.md)."""
    metrics = AgentMetrics()
    limits = BufferPolicy()
    metrics.track_outbox(outbox.counters, lambda: limits)
    metrics.track_uplink(lambda: uplink.status, lambda: uplink.failures)
    metrics.track_model_states(lambda: models)
    return metrics


def hook_expositions() -> list[str]:
    """/metrics text of each hook-fed collector, before any event."""
    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        outbox = Outbox.open(root / "outbox.db", max_bytes=1 << 20, max_age_s=3600)
        try:
            model = state_pb2.ModelStatus(name="digits", version=1, state=state_pb2.MODEL_STATE_ACTIVE)
            agent = generate_latest(agent_metrics(outbox, UplinkState(), [model]).registry).decode()
        finally:
            outbox.close()
        db = open_database(f"sqlite:///{root / 'cloud.db'}")
        try:
            registry = CollectorRegistry()
            registry.register(RolloutMetrics(db))
            rollouts = generate_latest(registry).decode()
        finally:
            db.close()
    return [agent, rollouts, generate_latest(metrics_registry()).decode()]
