"""The policy's `samples` section: every bad value refused naming the key (the cloud validates with the same
types), and a running agent applying it live."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_runtime.config import AgentConfig, config_from_dict
from edge_runtime.errors import ConfigError
from edge_runtime.kserve import KServeClient
from edge_runtime.policy import EffectivePolicy, PolicyChange, parse_policy
from edgefleet.policy import SamplesPolicy
from edgefleet.proto.edgefleet.v1 import results_pb2
from models.build import digits_holdout
from tests.edge_runtime.agent.conftest import RunningAgent, run_agent  # noqa: F401  (fixture)
from tests.processes import install
from tests.waiting import wait_for


def test_off_by_default() -> None:
    assert EffectivePolicy().samples == SamplesPolicy()
    assert SamplesPolicy().hard_bytes_per_window == 0


def test_a_policy_sets_the_section_and_only_it_changes() -> None:
    base = EffectivePolicy()
    policy = parse_policy(
        '{"samples": {"hard_bytes_per_window": 1048576, "hard_window_s": 600, "measure": "entropy",'
        ' "threshold": 0.6, "keep_disagreements": false}}',
        base,
    )
    assert policy.samples == SamplesPolicy(1048576, 600.0, "entropy", 0.6, False)
    assert PolicyChange.between(base, policy).sections == ["samples"]
    assert policy.as_dict()["samples"]["hard_window_s"] == 600.0


@pytest.mark.parametrize(
    ("section", "error"),
    [
        ({"hard_bytes_per_window": -1}, "samples.hard_bytes_per_window = -1 is out of range [0, 1099511627776]"),
        ({"hard_bytes_per_window": 1.5}, "samples.hard_bytes_per_window must be int, not float (1.5)"),
        ({"hard_bytes_per_window": True}, "samples.hard_bytes_per_window must be int, not bool (True)"),
        ({"hard_window_s": 0}, "samples.hard_window_s = 0.0 is out of range [1, 604800]"),
        ({"hard_window_s": "1h"}, "samples.hard_window_s must be float, not str ('1h')"),
        ({"measure": "gini"}, 'samples.measure must be one of margin, top1, entropy or "" (the model\'s own), '),
        ({"measure": 1}, "samples.measure must be str, not int (1)"),
        ({"threshold": 1.5, "measure": "margin"}, "samples.threshold = 1.5 is out of range [0, 1]"),
        ({"threshold": -0.5, "measure": "margin"}, "samples.threshold = -0.5 is out of range [0, 1]"),
        ({"threshold": 0.3}, "samples.threshold needs samples.measure"),
        ({"keep_disagreements": "yes"}, "samples.keep_disagreements must be bool, not str ('yes')"),
        ({"hard_bytes": 10}, "unknown key 'samples.hard_bytes'"),
    ],
)
def test_every_bad_value_is_refused_naming_the_key(section: dict[str, Any], error: str) -> None:
    import json

    with pytest.raises(ConfigError) as refused:
        parse_policy(json.dumps({"samples": section}), EffectivePolicy())
    assert str(refused.value).startswith(error)


def test_nan_is_refused_before_the_bounds() -> None:
    with pytest.raises(ConfigError, match="numbers must be finite"):
        parse_policy('{"samples": {"measure": "margin", "threshold": NaN}}', EffectivePolicy())


def test_the_config_file_takes_the_same_section() -> None:
    config = config_from_dict(AgentConfig, {"samples": {"hard_bytes_per_window": 4096, "measure": "top1"}})
    assert config.samples == SamplesPolicy(hard_bytes_per_window=4096, measure="top1")
    assert EffectivePolicy.from_config(config).samples == config.samples
    with pytest.raises(ConfigError, match=r"^samples\.measure must be one of"):
        config_from_dict(AgentConfig, {"samples": {"measure": "Margin"}})


def hard_records(agent: Any) -> list[results_pb2.SampledInference]:
    agent.outbox.flush().result(timeout=10)
    batch = agent.outbox.read_batch(10_000, 1 << 26)
    return [
        results_pb2.SampledInference.FromString(r.payload)
        for r in batch.records
        if r.kind == results_pb2.RECORD_KIND_SAMPLED_INPUT
    ]


def test_a_running_agent_applies_the_section_live(
    make_config: Callable[..., AgentConfig],
    config_data: dict[str, Any],
    model_packages: dict[str, Path],
    run_agent: Callable[..., RunningAgent],  # noqa: F811
) -> None:
    install(config_data, model_packages["digits:1"])
    running = run_agent(make_config(inference={"adaptive": False}))
    agent = running.agent
    x = digits_holdout()[0][:64]
    try:
        with KServeClient(agent.endpoints.inference[0], timeout_s=30) as client:
            client.infer("digits", {"pixels": x})
            assert hard_records(agent) == []  # off: the config file's default
            policy = parse_policy('{"samples": {"hard_bytes_per_window": 1048576}}', agent.base_policy)
            change = running.loop.run(agent.apply_policy(policy))
            assert change.sections == ["samples"] and agent.hard_examples.policy == policy.samples
            client.infer("digits", {"pixels": x})
            (kept,) = wait_for(lambda: hard_records(agent), 10, "the hard example")
            assert kept.reason == "uncertain" and kept.precision == "fp32"
            assert np.frombuffer(kept.request.raw_input_contents[0], np.float32).size % 64 == 0
    finally:
        blocked = running.stop()
    assert not blocked, f"the agent blocked its loop: {blocked}"
