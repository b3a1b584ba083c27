"""Policy documents from the cloud: parsed with the config's own types, laid over the config file's policy."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge_runtime.config import BufferPolicy, InferencePolicy, TelemetryPolicy, UploadPolicy
from edge_runtime.errors import ConfigError
from edge_runtime.policy import MAX_POLICY_BYTES, POLICY_SECTIONS, EffectivePolicy, PolicyChange, parse_policy

BASE = EffectivePolicy(
    InferencePolicy(max_batch_size=16, instances=2),
    UploadPolicy(sample_rate=0.5),
    BufferPolicy(max_bytes=1 << 20),
    TelemetryPolicy(interval_s=30.0),
)

# Values within each field's bounds (config.py), by field.
_VALID: dict[str, dict[str, st.SearchStrategy[Any]]] = {
    "inference": {
        "max_batch_size": st.integers(1, 4096),
        "max_queue_delay_ms": st.floats(0, 10_000),
        "instances": st.integers(1, 64),
        "max_queue_depth": st.integers(1, 1 << 20),
        "latency_slo_ms": st.floats(0, 600_000),
        "default_timeout_ms": st.floats(0, 3_600_000),
        "adaptive": st.booleans(),
    },
    "upload": {
        "sample_rate": st.floats(0, 1),
        "batch_max_records": st.integers(1, 100_000),
        "interval_s": st.floats(0.01, 3600),
        "max_bytes_per_s": st.integers(0, 2**40),
    },
    "buffer": {"max_bytes": st.integers(64 * 1024, 2**44), "max_age_s": st.floats(0, 10 * 365 * 86400)},
    "telemetry": {"interval_s": st.floats(0.1, 86_400)},
}

documents = st.fixed_dictionaries(
    {},
    optional={
        section: st.fixed_dictionaries({}, optional=fields)  # type: ignore[arg-type]
        for section, fields in _VALID.items()
    },
)


@given(documents)
def test_a_document_overlays_exactly_the_keys_it_names(document: dict[str, dict[str, Any]]) -> None:
    policy = parse_policy(json.dumps(document), BASE)
    for section in POLICY_SECTIONS:
        got, base = dataclasses.asdict(getattr(policy, section)), dataclasses.asdict(getattr(BASE, section))
        expected = {
            **base,
            **{k: (float(v) if isinstance(base[k], float) else v) for k, v in document.get(section, {}).items()},
        }
        assert got == expected


@given(documents)
def test_a_full_document_is_the_policy_itself_whatever_the_base(document: dict[str, dict[str, Any]]) -> None:
    policy = parse_policy(json.dumps(document), BASE)
    assert parse_policy(json.dumps(policy.as_dict()), EffectivePolicy()) == policy
    assert PolicyChange.between(BASE, policy).sections == [
        s for s in POLICY_SECTIONS if getattr(policy, s) != getattr(BASE, s)
    ]


@pytest.mark.parametrize("document", ["", "   ", b""])
def test_an_empty_document_is_the_config_file_s_policy(document: str | bytes) -> None:
    assert parse_policy(document, BASE) is BASE


BAD = {
    "unknown-section": ('{"engine": {"backend": "tensorrt"}}', "unknown key 'engine' in the policy document"),
    "unknown-key": ('{"inference": {"max_batch_sze": 8}}', "unknown key 'inference.max_batch_sze'"),
    "wrong-type": ('{"inference": {"max_batch_size": "8"}}', "inference.max_batch_size must be int"),
    "float-for-int": ('{"inference": {"max_batch_size": 8.0}}', "inference.max_batch_size must be int"),
    "bool-for-int": ('{"upload": {"max_bytes_per_s": true}}', "upload.max_bytes_per_s must be int"),
    "out-of-range": ('{"upload": {"sample_rate": 1.5}}', "upload.sample_rate = 1.5 is out of range"),
    "below-range": ('{"buffer": {"max_bytes": 1024}}', "buffer.max_bytes = 1024 is out of range"),
    "nan": ('{"telemetry": {"interval_s": NaN}}', "numbers must be finite"),
    "infinity": ('{"inference": {"latency_slo_ms": Infinity}}', "numbers must be finite"),
    "cross-field": ('{"inference": {"default_priority": 3}}', r"inference.default_priority \(3\) must be within"),
    "duplicate-key": ('{"upload": {"sample_rate": 0.1, "sample_rate": 0.9}}', "names key 'sample_rate' twice"),
    "not-an-object": ("[1, 2]", "must be a JSON object of sections, not an array"),
    "section-not-an-object": ('{"telemetry": 5}', "telemetry must be an object of keys, not a number"),
    "section-null": ('{"telemetry": null}', "telemetry must be an object of keys, not null"),
    "not-json": ('{"inference": {', "not valid JSON"),
    "too-deep": ("[" * 100_000 + "]" * 100_000, "past the"),
    "too-deep-but-small": ('{"upload": ' + "[" * 5000 + "]" * 5000 + "}", "nested too deeply|must be an object"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_a_bad_document_is_a_config_error_naming_the_key(name: str) -> None:
    document, says = BAD[name]
    with pytest.raises(ConfigError, match=says):
        parse_policy(document, BASE)


def test_a_document_past_the_size_limit_or_not_utf8_is_refused() -> None:
    big = json.dumps({"upload": {"sample_rate": 0.5}}) + " " * MAX_POLICY_BYTES
    with pytest.raises(ConfigError, match="byte limit"):
        parse_policy(big.encode(), BASE)
    with pytest.raises(ConfigError, match="past the"):
        parse_policy(big, BASE)
    with pytest.raises(ConfigError, match="not UTF-8"):
        parse_policy(b'{"upload": {"sample_rate": "\xff"}}', BASE)
