"""The admin API's OpenAPI schema tells the truth: schemathesis drives a live cloud-sync with what the schema
allows (and what it forbids), and every answer must conform to it (status code, content type, body schema,
no server error, auth enforced). A cloud-sync of its own: the run creates, revokes and deletes at random.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.config import SchemathesisConfig
from schemathesis.core.failures import FailureGroup
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.checks import positive_data_acceptance

from tests.cloud_sync.conftest import cloud_sync_config, run_cloud_sync_cli
from tests.processes import CloudSyncProcess

# Per operation and mode (positive: what the schema allows; negative: what it forbids). ~35 operations.
MAX_EXAMPLES = 15

# Operations whose inputs the API checks beyond what a JSON Schema can say, so a schema-valid request may be
# refused with 422: a policy document is checked with the agent's own config types and against every
# registered device's effective policy; a rollout's stages and gates are a small grammar (increasing
# percentages, ending active:100%) over a version that must be in the registry; an assignment's version
# must be in the registry; a selector names each key once. Every other check still runs on them, and the
# 422 must name what was wrong.
MODES = list(GenerationMode)  # positive, negative
SEMANTIC_422 = {
    ("PUT", "/v1/policies/{name}"),
    ("POST", "/v1/rollouts"),
    ("PUT", "/v1/assignments"),
    ("GET", "/v1/models/compare"),
    # since_s and step_s each in range, together past MAX_POINTS points (step_s left out adapts instead).
    ("GET", "/v1/models/series"),
    # An upload's sha256 that is not stored, int8 of a model with no calibration data.
    ("POST", "/v1/models/{name}/{version}/compress"),
}


@pytest.fixture(scope="module")
def live_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """(admin API URL, admin token) of a throwaway `cloud-sync run`."""
    workdir: Path = tmp_path_factory.mktemp("openapi")
    config_path = cloud_sync_config(workdir)
    proc = CloudSyncProcess(config_path)
    try:
        ready = proc.wait_ready(60)
        token = run_cloud_sync_cli("admin-token", "--config", config_path)
        assert token.returncode == 0, token.stderr
        yield ready["http"], token.stdout.strip()
    finally:
        if proc.proc.poll() is None:
            proc.signal()
        code = proc.finish(30)
    assert code == 0, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr


def _content_addressed(case: Any) -> Any:
    """PUT /v1/blobs/{sha256}: name the body by its own digest, as every real upload does."""
    body = case.body if isinstance(case.body, bytes) else str(case.body or "").encode()
    case.body = body
    case.path_parameters = {"sha256": hashlib.sha256(body).hexdigest()}
    return case


def _check_operation(operation: Any, mode: GenerationMode, url: str, statuses: list[int]) -> None:
    """Hypothesis over one operation's cases of `mode`; raises on the first (shrunk) failure."""
    key = (operation.method.upper(), operation.path)
    strategy = operation.as_strategy(generation_mode=mode)
    if key == ("PUT", "/v1/blobs/{sha256}") and mode is GenerationMode.POSITIVE:
        strategy = strategy.map(_content_addressed)
    semantic = key in SEMANTIC_422 and mode is GenerationMode.POSITIVE

    @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(case=strategy)
    def run(case: Any) -> None:
        excluded = [positive_data_acceptance] if semantic else []
        response = case.call_and_validate(base_url=url, excluded_checks=excluded)
        statuses.append(response.status_code)
        if semantic and response.status_code == 422:
            assert response.json()["detail"], response.text

    run()


@pytest.mark.slow
def test_the_api_answers_as_its_schema_says(live_api: tuple[str, str]) -> None:
    # schemathesis' own pytest loader (schemathesis.pytest.from_fixture) fails on pytest 9 (it reads the
    # removed Function._nodeid), so each operation runs through its hypothesis strategy here.
    url, token = live_api
    config = SchemathesisConfig.from_dict({"auth": {"openapi": {"bearerAuth": {"bearer": token}}}})
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json", config=config)
    operations = []
    for found in schema.get_all_operations():
        assert isinstance(found, Ok), found  # an operation schemathesis cannot read is a schema bug
        operations.append(found.ok())
    assert len(operations) > 30
    failures = []
    positive: list[int] = []
    for operation in operations:
        for mode in MODES:
            try:
                _check_operation(operation, mode, url, positive if mode is GenerationMode.POSITIVE else [])
            except Unsatisfiable:
                assert mode is GenerationMode.NEGATIVE  # nothing to get wrong: no parameters, no body
            except (Exception, FailureGroup) as exc:  # schemathesis raises a group of failures
                failures.append(f"{operation.label} ({mode.value}): {str(exc)[:1500]}")
    assert not failures, "\n\n".join(failures)
    # The token reached the API: schema-valid requests are never refused as unauthenticated (a 401 passes
    # schemathesis' checks, so a run without the token would pass them all).
    assert positive and 401 not in positive and sum(200 <= s < 300 for s in positive) > len(operations)


def test_the_schema_declares_bearer_auth_on_every_v1_operation(live_api: tuple[str, str]) -> None:
    url, _ = live_api
    openapi = httpx.get(f"{url}/openapi.json", trust_env=False).json()
    assert openapi["components"]["securitySchemes"]["bearerAuth"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "The admin token: `cloud-sync admin-token` prints it.",
    }
    for path, item in openapi["paths"].items():
        for method, operation in item.items():
            if path.startswith("/v1/"):
                assert operation.get("security") == [{"bearerAuth": []}], (method, path)
                if method != "head":
                    codes = set(operation["responses"])
                    assert {"401", "403"} <= codes, (method, path, codes)
                    for code in codes - {"200", "201"}:
                        ref = operation["responses"][code]["content"]["application/json"]["schema"]["$ref"]
                        assert ref == "#/components/schemas/ErrorBody", (method, path, code)
            else:
                assert "security" not in operation, (method, path)
