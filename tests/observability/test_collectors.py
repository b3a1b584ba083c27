"""The collectors fed through hooks, served over real HTTP (prometheus_client's server, as the agent serves
them) and checked with promtool: uplink, model states, outbox bounds, rollouts, cloud-sync's process figures."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest, start_http_server

from cloud_sync.rollouts.metrics import RolloutMetrics, rollout_counts
from cloud_sync.rollouts.service import RolloutService
from cloud_sync.store import Database, DeviceRegistry
from cloud_sync.store.assignments import AssignmentStore
from cloud_sync.telemetry.metrics import metrics_registry
from edge_runtime.observability.dataplane import UPLINK_FAILURE_CODES
from edge_runtime.observability.metrics import AgentMetrics
from edge_runtime.observability.states import MODEL_STATES
from edge_runtime.outbox import Outbox
from edgefleet.proto.edgefleet.v1 import state_pb2
from tests.cloud_sync.conftest import assignments, control, db, devices, store_url  # noqa: F401  (fixtures)
from tests.cloud_sync.rollouts.conftest import catalog, reconciler, service  # noqa: F401  (fixtures)
from tests.cloud_sync.rollouts.conftest import fleet as lab_fleet
from tests.observability.exposition import family_names, run_promtool, samples, scrape_text
from tests.observability.hooks import UplinkState, agent_metrics


@pytest.fixture
def outbox(tmp_path: Path) -> Iterator[Outbox]:
    opened = Outbox.open(tmp_path / "outbox.db", max_bytes=1 << 20, max_age_s=3600)
    yield opened
    opened.close()


def served(metrics: AgentMetrics) -> Iterator[str]:
    server, thread = start_http_server(0, addr="127.0.0.1", registry=metrics.registry)
    try:
        yield f"http://127.0.0.1:{server.server_port}/metrics"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_uplink_failures_are_zero_by_code_until_counted(outbox: Outbox) -> None:
    uplink = UplinkState()
    metrics = agent_metrics(outbox, uplink, [])
    for url in served(metrics):
        before = samples(scrape_text(url))
        assert {c: before[("edgefleet_uplink_failures_total", (("code", c),))] for c in UPLINK_FAILURE_CODES} == (
            dict.fromkeys(UPLINK_FAILURE_CODES, 0)
        )
        assert before[("edgefleet_uplink_connected", ())] == 0
        assert before[("edgefleet_uplink_last_success_timestamp_seconds", ())] == 0
        uplink.failures["UNAUTHENTICATED"] = 3
        uplink.failures["ABORTED"] = 1  # a code outside the usual ones still shows
        uplink.status.consecutive_failures = 4
        uplink.status.connected, uplink.status.uploaded_total, uplink.status.last_success_ms = (
            True,
            12,
            1_700_000_000_500,
        )
        after = samples(scrape_text(url))
        assert after[("edgefleet_uplink_failures_total", (("code", "UNAUTHENTICATED"),))] == 3
        assert after[("edgefleet_uplink_failures_total", (("code", "ABORTED"),))] == 1
        assert after[("edgefleet_uplink_failures_total", (("code", "UNAVAILABLE"),))] == 0
        assert after[("edgefleet_uplink_consecutive_failures", ())] == 4
        assert after[("edgefleet_uplink_stored_records_total", ())] == 12
        assert after[("edgefleet_uplink_last_success_timestamp_seconds", ())] == 1_700_000_000.5
        checked = run_promtool("check", "metrics", stdin=scrape_text(url))
        assert (checked.returncode, checked.stdout + checked.stderr) == (0, "")


def test_model_states_are_an_enum_gauge_one_series_per_state(outbox: Outbox) -> None:
    models = [
        state_pb2.ModelStatus(name="digits", version=2, state=state_pb2.MODEL_STATE_FAILED, reason="sha256 mismatch"),
        state_pb2.ModelStatus(name="digits", version=1, state=state_pb2.MODEL_STATE_ACTIVE),
        state_pb2.ModelStatus(name="digits", version=1, state=state_pb2.MODEL_STATE_READY),  # a duplicate: ignored
        state_pb2.ModelStatus(name="other", version=1),  # UNSPECIFIED: no series
    ]
    for url in served(agent_metrics(outbox, UplinkState(), models)):
        page = samples(scrape_text(url))
    states = {
        (dict(labels)["model"], dict(labels)["version"], dict(labels)["state"]): value
        for (name, labels), value in page.items()
        if name == "edgefleet_model_state"
    }
    assert len(states) == 2 * len(MODEL_STATES)  # digits:1 and digits:2, every state each
    assert {k for k, v in states.items() if v == 1} == {("digits", "2", "FAILED"), ("digits", "1", "ACTIVE")}


def test_outbox_bounds_sit_beside_its_bytes(outbox: Outbox) -> None:
    text = generate_latest(agent_metrics(outbox, UplinkState(), []).registry).decode()
    page = samples(text)
    assert page[("edgefleet_outbox_max_bytes", ())] == 256 * 1024 * 1024  # BufferPolicy's default
    assert page[("edgefleet_outbox_max_age_seconds", ())] == 7 * 24 * 3600
    assert page[("edgefleet_outbox_bytes", ())] == 0


def test_without_hooks_the_agent_registry_still_has_process_figures_and_no_hook_families() -> None:
    names = family_names(generate_latest(AgentMetrics().registry).decode())
    assert {"process_cpu_seconds", "process_resident_memory_bytes", "python_info"} <= names
    assert not {"edgefleet_uplink_connected", "edgefleet_model_state", "edgefleet_outbox_depth"} & names
    assert "process_cpu_seconds" not in family_names(
        generate_latest(AgentMetrics(process_metrics=False).registry).decode()
    )


def test_cloud_sync_registry_carries_process_figures() -> None:
    text = generate_latest(metrics_registry()).decode()
    assert {"process_cpu_seconds", "process_resident_memory_bytes", "python_gc_objects_collected"} <= family_names(text)
    checked = run_promtool("check", "metrics", stdin=text)
    assert (checked.returncode, checked.stdout + checked.stderr) == (0, "")


def test_rollouts_by_state_and_events_by_kind(
    db: Database,  # noqa: F811
    service: RolloutService,  # noqa: F811
    devices: DeviceRegistry,  # noqa: F811
    assignments: AssignmentStore,  # noqa: F811
) -> None:
    registry = CollectorRegistry()
    registry.register(RolloutMetrics(db, cache_s=0))
    empty = samples(generate_latest(registry).decode())
    assert empty[("cloud_sync_rollouts", (("state", "aborted"),))] == 0  # zero before the first rollout
    assert empty[("cloud_sync_rollout_events_total", (("kind", "aborted"),))] == 0
    lab_fleet(devices, assignments, 4)
    first = service.create("digits", 2, {}, "active:50%,active:100%")
    service.abort(first.id, reason="gate failed")
    service.create("digits", 3, {}, "active:100%")
    text = generate_latest(registry).decode()
    page = samples(text)
    assert {
        s: page[("cloud_sync_rollouts", (("state", s),))] for s in ("running", "paused", "completed", "aborted")
    } == {
        "running": 1,
        "paused": 0,
        "completed": 0,
        "aborted": 1,
    }
    assert page[("cloud_sync_rollout_events_total", (("kind", "aborted"),))] == 1
    assert page[("cloud_sync_rollout_events_total", (("kind", "created"),))] == 2
    assert rollout_counts(db).states["aborted"] == 1
    checked = run_promtool("check", "metrics", stdin=text)
    assert (checked.returncode, checked.stdout + checked.stderr) == (0, "")


def test_rollout_figures_are_cached_between_scrapes(db: Database) -> None:  # noqa: F811
    metrics = RolloutMetrics(db, cache_s=3600)
    registry = CollectorRegistry()
    registry.register(metrics)
    first = generate_latest(registry)
    db.close()  # a closed database would fail a query: the second scrape must not make one
    assert generate_latest(registry) == first
