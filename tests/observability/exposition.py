"""Reading Prometheus expositions in tests: promtool, parsed samples, and the metric names a page declares.

Not a fixture module (conftest.py starts the programs); these are plain functions over exposition text.
"""

from __future__ import annotations

import shutil
import subprocess
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.processes import REPO_ROOT

OBSERVABILITY = REPO_ROOT / "deploy" / "observability"
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

# The sample names each metric type exposes, beside the family's own name (OpenMetrics' suffixes).
_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("_sum", "_count", "_created"),
    "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
    "info": ("_info",),
}


def promtool() -> str:
    """promtool's path, or skip: Debian's `prometheus` package ships it (.ci/run installs it)."""
    found = shutil.which("promtool")
    if found is None:
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    return found


def run_promtool(*args: str | Path, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool(), *map(str, args)], input=stdin, capture_output=True, text=True, timeout=60, cwd=OBSERVABILITY
    )


def scrape_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as reply:
        assert reply.status == 200
        return str(reply.read().decode())


def samples(text: str) -> Samples:
    """Every sample of an exposition, keyed by (sample name, sorted labels)."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def declared_names(text: str) -> set[str]:
    """Every series name the page declares, whether or not it has samples yet (a per-model family before
    its first model): the family names and the names of their samples by type."""
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        names.update(family.name + suffix for suffix in _SUFFIXES.get(family.type, ()))
        names.update(s.name for s in family.samples)
    return names


def family_names(text: str) -> set[str]:
    return {family.name for family in text_string_to_metric_families(text)}
