"""Config loading: every bad file is refused with a message naming the key; the example covers all keys."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from edge_runtime._compat import tomllib
from edge_runtime.config import AgentConfig, InferencePolicy, config_from_dict, field_docs, load_config
from edge_runtime.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "deploy" / "jetson" / "edge-agent.toml"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path


def test_an_empty_file_gives_the_documented_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, ""))
    assert config == AgentConfig()
    assert config.inference.max_batch_size == 32
    assert config.data_dir == Path("/var/lib/edgefleet")


def test_values_are_read_and_ints_are_accepted_for_floats(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, '[inference]\nmax_queue_delay_ms = 2\n[engine]\nbackend = "onnxruntime"\n'))
    assert config.inference.max_queue_delay_ms == 2.0
    assert isinstance(config.inference.max_queue_delay_ms, float)
    assert config.engine.backend == "onnxruntime"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[inference]\nmax_batch_sze = 4\n", "unknown key 'inference.max_batch_sze'"),
        ("[infrence]\n", "unknown key 'infrence'"),
        ('[inference]\nmax_batch_size = "4"\n', "inference.max_batch_size must be int"),
        ("[inference]\nmax_batch_size = true\n", "inference.max_batch_size must be int"),
        ("[inference]\nmax_batch_size = 0\n", r"inference.max_batch_size = 0 is out of range"),
        ("[inference]\ninstances = 1000\n", r"inference.instances = 1000 is out of range"),
        ('[engine]\nbackend = "cuda"\n', "engine.backend must be one of 'auto', 'tensorrt', 'onnxruntime'"),
        ('[agent]\nlog_level = "loud"\n', "agent.log_level must be one of"),
        ("inference = 3\n", "inference must be a table"),
        ("[inference]\npriority_levels = 2\ndefault_priority = 3\n", "default_priority"),
        ("[inference\n", "not valid TOML"),
    ],
)
def test_bad_config_is_refused_naming_the_key(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=re.escape(message)) as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_a_missing_or_unreadable_file_says_which(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config .*missing.toml"):
        load_config(tmp_path / "missing.toml")
    path = write(tmp_path, "")
    path.write_bytes(b"\xff\xfe not utf-8")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(path)


def test_policy_sections_use_the_same_loader() -> None:
    policy = config_from_dict(InferencePolicy, {"max_batch_size": 4, "latency_slo_ms": 20}, "inference")
    assert policy.max_batch_size == 4 and policy.latency_slo_ms == 20.0
    with pytest.raises(ConfigError, match="unknown key 'inference.bogus'"):
        config_from_dict(InferencePolicy, {"bogus": 1}, "inference")


def test_every_field_is_documented() -> None:
    docs = field_docs()
    undocumented = [key for key, (_default, doc) in docs.items() if len(doc) < 10]
    assert not undocumented


def test_the_example_config_covers_every_field_with_its_default() -> None:
    data = tomllib.loads(EXAMPLE.read_text())
    flat = {f"{section}.{key}": value for section, table in data.items() for key, value in table.items()}
    docs = field_docs()
    assert set(flat) == set(docs), "deploy/jetson/edge-agent.toml and edge_runtime/config.py disagree"
    for key, (default, _doc) in docs.items():
        assert flat[key] == default, f"{key}: the example says {flat[key]!r}, the default is {default!r}"
    assert load_config(EXAMPLE) == AgentConfig()


def test_the_package_exports_what_it_names() -> None:
    import edge_runtime

    for name in edge_runtime.__all__:
        assert getattr(edge_runtime, name) is not None
