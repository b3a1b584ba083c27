"""Both programs' /metrics, scraped over HTTP from real processes: promtool-clean, and carrying what operators
alert on (outbox, uplink, process figures; labelled counters at zero before their first event)."""

from __future__ import annotations

import re

import pytest

from cloud_sync.telemetry.validation import REASONS
from edge_runtime.observability.metrics import FAILURE_REASONS
from tests.observability.conftest import Scrapes
from tests.observability.exposition import family_names, run_promtool, samples

pytestmark = pytest.mark.slow

DIGITS = (("model", "digits"), ("version", "1"))


def failure(reason: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    return ("edgefleet_inference_request_failure_total", tuple(sorted((*DIGITS, ("reason", reason)))))


@pytest.mark.parametrize("page", ["agent_before_failures", "agent", "cloud"])
def test_promtool_check_metrics_is_clean(scrapes: Scrapes, page: str) -> None:
    checked = run_promtool("check", "metrics", stdin=getattr(scrapes, page))
    # promtool prints one line per problem (abbreviated units, a gauge named _count...) and exits non-zero.
    assert (checked.returncode, checked.stdout + checked.stderr) == (0, "")


def test_no_abbreviated_units_are_left(scrapes: Scrapes) -> None:
    for text in (scrapes.agent, scrapes.cloud):
        assert not [n for n in family_names(text) if re.search(r"_(us|ms|ns)(_|$)", n)]


def test_failure_reasons_are_zero_before_the_first_failure(scrapes: Scrapes) -> None:
    before = samples(scrapes.agent_before_failures)
    assert before[("edgefleet_inference_request_success_total", DIGITS)] == 5
    assert {reason: before[failure(reason)] for reason in FAILURE_REASONS} == dict.fromkeys(FAILURE_REASONS, 0)
    after = samples(scrapes.agent)
    assert after[failure("invalid_input")] == 1  # the bad request, and nothing else
    assert all(after[failure(reason)] == 0 for reason in FAILURE_REASONS if reason != "invalid_input")


def test_latency_figures_are_in_seconds(scrapes: Scrapes) -> None:
    page = samples(scrapes.agent)
    queued = page[("edgefleet_inference_queue_duration_seconds_total", DIGITS)]
    computed = page[("edgefleet_inference_compute_infer_duration_seconds_total", DIGITS)]
    # Five digits inferences take microseconds to milliseconds each: seconds, not microseconds.
    assert 0 <= queued < 5 and 0 < computed < 5
    assert page[("edgefleet_inference_pending_requests", DIGITS)] == 0


def test_the_agent_page_carries_the_outbox_and_the_process(scrapes: Scrapes) -> None:
    page = samples(scrapes.agent)
    outbox = {name: page[(f"edgefleet_outbox_{name}", ())] for name in _OUTBOX}
    assert outbox["delivered_total"] >= 1 and outbox["acked_seq"] >= 1
    assert outbox["produced_total"] == (
        outbox["depth"]
        + outbox["quarantined"]
        + outbox["delivered_total"]
        + outbox["evicted_total"]
        + outbox["rejected_total"]
    )
    assert outbox["evicted_total"] == outbox["refused_total"] == outbox["append_failures_total"] == 0
    assert outbox["upload_lag_seconds"] >= 0
    assert page[("process_resident_memory_bytes", ())] > 10_000_000
    assert page[("process_cpu_seconds_total", ())] > 0
    assert {"python_gc_objects_collected", "python_info"} <= family_names(scrapes.agent)


_OUTBOX = (
    "depth",
    "bytes",
    "produced_total",
    "delivered_total",
    "evicted_total",
    "rejected_total",
    "refused_total",
    "append_failures_total",
    "quarantined",
    "pending_appends",
    "last_seq",
    "acked_seq",
    "upload_lag_seconds",
)


def test_the_cloud_page_counts_the_upload_and_shows_zeros_before_events(scrapes: Scrapes) -> None:
    page = samples(scrapes.cloud)
    assert page[("cloud_sync_uplink_records_total", (("outcome", "stored"),))] >= 1
    for outcome in ("duplicate", "evicted", "rejected"):
        assert page[("cloud_sync_uplink_records_total", (("outcome", outcome),))] == 0
    for code in ("UNAUTHENTICATED", "PERMISSION_DENIED"):
        assert page[("cloud_sync_uplink_refused_total", (("code", code),))] == 0
        assert page[("cloud_sync_artifact_refused_total", (("code", code),))] == 0
        assert page[("cloud_sync_control_refused_total", (("code", code), ("method", "Report")))] == 0
    for reason in REASONS:
        assert ("cloud_sync_telemetry_rejected_total", (("reason", reason),)) in page
    assert page[("cloud_sync_telemetry_connected", ())] == 1


def test_process_wiring_the_lead_applies(scrapes: Scrapes) -> None:
    """Families fed through hooks the programs' process modules call (docs/notes/metrics.md, "Needs")."""
    agent, cloud = family_names(scrapes.agent), family_names(scrapes.cloud)
    assert {"edgefleet_model_state", "edgefleet_uplink_connected", "edgefleet_outbox_max_bytes"} <= agent
    assert {"process_cpu_seconds", "process_resident_memory_bytes", "cloud_sync_rollouts"} <= cloud
    page = samples(scrapes.agent)
    assert page[("edgefleet_model_state", tuple(sorted((*DIGITS, ("state", "ACTIVE")))))] == 1
    assert page[("edgefleet_model_state", tuple(sorted((*DIGITS, ("state", "FAILED")))))] == 0
    assert page[("edgefleet_uplink_connected", ())] == 1
