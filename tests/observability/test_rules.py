"""deploy/observability: the scrape config and the alert rules pass promtool, and the rules' own unit tests."""

from __future__ import annotations

from pathlib import Path

import yaml

from tests.observability.exposition import OBSERVABILITY, run_promtool

RULES = "rules/edgefleet.rules.yml"


def test_the_scrape_config_is_valid() -> None:
    checked = run_promtool("check", "config", "prometheus.yml")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "1 rule files found" in checked.stdout


def test_the_alert_rules_are_valid() -> None:
    checked = run_promtool("check", "rules", RULES)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_the_alert_rules_unit_tests_pass() -> None:
    tested = run_promtool("test", "rules", "rules/edgefleet.rules.test.yml")
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


def test_every_alert_the_issue_asks_for_is_there_with_a_severity_and_a_summary() -> None:
    rules = yaml.safe_load((OBSERVABILITY / RULES).read_text())
    alerts = {r["alert"]: r for group in rules["groups"] for r in group["rules"]}
    wanted = {
        "EdgeOutboxFilling",  # outbox filling vs its budget
        "EdgeUploadLagHigh",
        "EdgeInferenceErrorRate",
        "FleetDevicesWentOffline",
        "EdgeModelFailed",
        "RolloutAborted",
    }
    assert wanted <= set(alerts)
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name


def test_a_broken_rule_is_refused(tmp_path: Path) -> None:
    # The check would catch a typo in a rule: promtool parses every expression.
    bad = tmp_path / "bad.rules.yml"
    bad.write_text("groups:\n  - name: g\n    rules:\n      - alert: A\n        expr: rate(x[5m]\n")
    checked = run_promtool("check", "rules", bad)
    assert checked.returncode != 0
