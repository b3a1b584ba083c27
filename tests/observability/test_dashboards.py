"""The Grafana dashboards: valid JSON of a current schema, a datasource variable, and every query both
parseable PromQL (promtool parses them as rules) and made only of metrics the programs really expose."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.observability.conftest import Scrapes
from tests.observability.exposition import OBSERVABILITY, declared_names, run_promtool
from tests.observability.hooks import hook_expositions

DASHBOARDS = sorted((OBSERVABILITY / "grafana").glob("*.json"))
# Grafana's own variables, replaced by what they stand for when a query is checked outside Grafana.
_GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "1h"}
_NOT_METRICS = {
    # PromQL keywords, aggregation modifiers, and series Prometheus makes itself.
    "by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool", "and", "or", "unless",
    "inf", "nan", "up",
}  # fmt: skip


def dashboard(path: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(path.read_text())
    return loaded


def panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in board["panels"]:
        yield panel
        yield from panel.get("panels", [])  # a collapsed row keeps its panels inside


def exprs(board: dict[str, Any]) -> list[str]:
    found = [t["expr"] for p in panels(board) for t in p.get("targets", [])]
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
            # label_values(series selector, label) is Grafana's, not PromQL: its selector is.
            found.append(re.fullmatch(r"label_values\((.*),\s*\w+\)", query).group(1))  # type: ignore[union-attr]
    return found


def promql(expr: str) -> str:
    """The query as Prometheus would get it: Grafana's variables replaced (`=~"$model"` by a regex)."""
    for name, value in _GRAFANA_VARIABLES.items():
        expr = expr.replace(name, value)
    return re.sub(r"\$\{?\w+\}?", ".*", expr)


def metric_names(expr: str) -> set[str]:
    """The series names a query reads: identifiers outside label matchers, strings and ranges, that are not
    function calls, grouping labels or keywords."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', promql(expr))
    text = re.sub(r"\{[^}]*\}", "", text)
    text = re.sub(r"\[[^\]]*\]", "", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    names = set()
    for found in re.finditer(r"[a-zA-Z_:][\w:]*", text):
        before, after = text[: found.start()], text[found.end() :].lstrip()
        if re.search(r"[\w.]$", before) or after.startswith("("):  # part of a number, or a function call
            continue
        names.add(found.group())
    return {n for n in names if n.lower() not in _NOT_METRICS}


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_a_dashboard_is_current_json_with_a_datasource_variable(path: Path) -> None:
    board = dashboard(path)
    assert board["schemaVersion"] >= 39 and board["uid"] and board["title"].startswith("Edgefleet / ")
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for panel in panels(board):
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
    ids = [p["id"] for p in panels(board)]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_every_query_parses_as_promql(path: Path, tmp_path: Path) -> None:
    queries = exprs(dashboard(path))
    rules = {
        "groups": [
            {"name": path.stem, "rules": [{"record": f"q_{i}", "expr": promql(q)} for i, q in enumerate(queries)]}
        ]
    }
    (tmp_path / "queries.rules.yml").write_text(json.dumps(rules))  # JSON is YAML
    checked = run_promtool("check", "rules", tmp_path / "queries.rules.yml")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"{len(queries)} rules found" in checked.stdout


def test_the_name_finder_finds_metrics_and_nothing_else() -> None:
    expr = (
        'sum by (model, le) (rate(a_total{model=~"$model",x="by"}[$__rate_interval])) / on(instance) '
        "histogram_quantile(0.99, b_bucket) + max(c offset 5m) > bool 1e3"
    )
    assert metric_names(expr) == {"a_total", "b_bucket", "c"}


@pytest.mark.slow
@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_every_query_names_only_metrics_the_programs_expose(path: Path, scrapes: Scrapes) -> None:
    exposed = declared_names(scrapes.agent) | declared_names(scrapes.cloud)
    for text in hook_expositions():
        exposed |= declared_names(text)
    unknown = {q: sorted(metric_names(q) - exposed) for q in exprs(dashboard(path))}
    assert {q: names for q, names in unknown.items() if names} == {}


@pytest.mark.slow
def test_every_alert_names_only_metrics_the_programs_expose(scrapes: Scrapes) -> None:
    import yaml

    exposed = declared_names(scrapes.agent) | declared_names(scrapes.cloud)
    for text in hook_expositions():
        exposed |= declared_names(text)
    rules = yaml.safe_load((OBSERVABILITY / "rules" / "edgefleet.rules.yml").read_text())
    unknown = {
        r["alert"]: sorted(metric_names(r["expr"]) - exposed) for group in rules["groups"] for r in group["rules"]
    }
    assert {name: names for name, names in unknown.items() if names} == {}
