"""The samples routes answer as the OpenAPI schema says: schemathesis drives them on a real admin API (what the
schema allows and what it forbids), as tests/cloud_sync/test_openapi.py does for a whole cloud-sync, which
covers them too once process.py registers them."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import schemathesis
from schemathesis.config import SchemathesisConfig
from schemathesis.core.failures import FailureGroup
from schemathesis.core.result import Ok

from tests.cloud_sync.samples.conftest import ADMIN, SamplesApi, image, probabilities, sampled
from tests.cloud_sync.test_openapi import MODES, _check_operation


@pytest.fixture
def store_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'cloud.db'}"


@pytest.mark.slow
def test_the_samples_routes_answer_as_their_schema_says(samples_api: SamplesApi) -> None:
    samples_api.fleet.upload(
        "cam-1", [sampled({"x": image(i)}, {"probabilities": probabilities(i)}, reason="uncertain") for i in range(3)]
    )
    config = SchemathesisConfig.from_dict({"auth": {"openapi": {"bearerAuth": {"bearer": ADMIN}}}})
    schema = schemathesis.openapi.from_url(f"{samples_api.url}/openapi.json", config=config)
    operations = [found.ok() for found in schema.get_all_operations() if isinstance(found, Ok)]
    ours = [op for op in operations if op.path.startswith("/v1/samples")]
    assert {(op.method.upper(), op.path) for op in ours} == {("GET", "/v1/samples"), ("GET", "/v1/samples/export")}
    failures, positive = [], []
    for operation in ours:
        for mode in MODES:
            try:
                _check_operation(operation, mode, samples_api.url, positive)
            except (Exception, FailureGroup) as exc:  # schemathesis raises a group of failures
                failures.append(f"{operation.label} ({mode.value}): {str(exc)[:1500]}")
    assert not failures, "\n\n".join(failures)
    assert any(200 <= s < 300 for s in positive)
    declared = httpx.get(f"{samples_api.url}/openapi.json").json()["paths"]["/v1/samples/export"]["get"]
    assert set(declared["responses"]["200"]["content"]) == {"application/zip", "application/vnd.apache.parquet"}
