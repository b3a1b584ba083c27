"""The policy schema the device and the cloud share (edgefleet/policy.py, edgefleet/settings.py).

The cloud imports it without the device runtime; the device's names are the same objects and still raise its
ConfigError; a document the cloud accepts is one the agent applies, with the same messages for bad ones.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

import edge_runtime.config as device_config
import edge_runtime.policy as device_policy
from cloud_sync.policies import PolicyInvalid, check_document
from edge_runtime.errors import ConfigError, EdgeRuntimeError
from edgefleet import policy as shared
from edgefleet.settings import SettingsError, config_from_dict, field_docs
from tests.processes import REPO_ROOT

_NO_DEVICE_RUNTIME = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("edge_runtime", "numpy", "onnxruntime"):
            raise ModuleNotFoundError(f"blocked: {name}", name=name)
        return None
sys.meta_path.insert(0, Block())
import edgefleet.policy, edgefleet.settings, cloud_sync.policies, cloud_sync.api_policies, cloud_sync.fleetctl_policies
print("ok")
"""


def test_the_shared_schema_and_the_cloud_side_import_without_the_device_runtime() -> None:
    done = subprocess.run(
        [sys.executable, "-c", _NO_DEVICE_RUNTIME], capture_output=True, text=True, cwd=REPO_ROOT, timeout=60
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_the_device_modules_re_export_the_shared_objects() -> None:
    for name in ("InferencePolicy", "UploadPolicy", "BufferPolicy", "TelemetryPolicy"):
        assert getattr(device_config, name) is getattr(shared, name)
    for name in ("MAX_POLICY_BYTES", "POLICY_SECTIONS", "EffectivePolicy", "PolicyChange"):
        assert getattr(device_policy, name) is getattr(shared, name)


def test_config_error_is_both_the_device_root_and_a_settings_error() -> None:
    assert issubclass(ConfigError, EdgeRuntimeError) and issubclass(ConfigError, SettingsError)
    assert issubclass(SettingsError, ValueError)


@pytest.mark.parametrize(
    ("document", "says"),
    [
        ('{"inference": {"max_batch_size": "8"}}', "inference.max_batch_size must be int"),
        ('{"inference": {"max_batch_size": 0}}', "inference.max_batch_size = 0 is out of range"),
        ('{"inference": {"default_priority": 3}}', "inference.default_priority (3) must be within"),
        ('{"engine": {}}', "unknown key 'engine'"),
        ('{"upload": {"sample_rte": 1}}', "unknown key 'upload.sample_rte'"),
    ],
)
def test_shared_and_device_parsers_refuse_alike_each_with_its_own_error(document: str, says: str) -> None:
    base = shared.EffectivePolicy()
    with pytest.raises(SettingsError, match=re.escape(says)) as shared_error:
        shared.parse_policy(document, base)
    assert not isinstance(shared_error.value, EdgeRuntimeError)
    with pytest.raises(ConfigError, match=re.escape(says)) as device_error:
        device_policy.parse_policy(document, base)
    assert str(device_error.value) == str(shared_error.value)


def test_a_cross_field_rule_keeps_its_message_through_the_loader() -> None:
    data = {"default_priority": 3, "priority_levels": 2}
    with pytest.raises(SettingsError) as info:
        config_from_dict(shared.InferencePolicy, data, "inference")
    assert str(info.value).startswith("inference.default_priority (3) must be within")
    with pytest.raises(ConfigError) as device_info:
        device_config.config_from_dict(shared.InferencePolicy, data, "inference")
    assert str(device_info.value) == str(info.value)


def test_what_the_cloud_accepts_the_device_applies_to_the_same_values() -> None:
    document = {"inference": {"max_batch_size": 8, "max_queue_delay_ms": 2}, "telemetry": {"interval_s": 5}}
    canonical = check_document(document)
    applied = device_policy.parse_policy(json.dumps(canonical), shared.EffectivePolicy())
    assert applied.inference.max_batch_size == 8 and applied.inference.max_queue_delay_ms == 2.0
    assert applied.telemetry.interval_s == 5.0
    assert canonical == {
        "inference": {"max_batch_size": 8, "max_queue_delay_ms": 2.0},
        "telemetry": {"interval_s": 5.0},
    }


def test_what_the_cloud_refuses_the_device_refuses_too() -> None:
    with pytest.raises(PolicyInvalid) as cloud:
        check_document({"buffer": {"max_bytes": 1}})
    assert cloud.value.field == "document.buffer.max_bytes"
    with pytest.raises(ConfigError, match="buffer.max_bytes = 1 is out of range"):
        device_policy.parse_policy('{"buffer": {"max_bytes": 1}}', shared.EffectivePolicy())


def test_field_docs_of_the_shared_loader_cover_the_policy_sections() -> None:
    docs = field_docs(shared.EffectivePolicy)
    assert docs["inference.max_batch_size"][0] == 32 and docs["inference.max_batch_size"][1]
    assert set(docs) <= set(device_config.field_docs())
