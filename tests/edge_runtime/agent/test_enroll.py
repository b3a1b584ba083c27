"""`edge-agent enroll` as a real process against a real cloud-sync, and the identity it leaves behind.

The identity files are 0600 and complete; the agent's config takes every key it leaves empty from them (an
explicit value wins); a used token, an existing identity, a remote cloud in plaintext and damaged identity
files are refused with a reason and exit 2, changing nothing.
"""

from __future__ import annotations

import dataclasses
import json
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edge_runtime.agent.identity import DEVICE_FILE, KEY_FILE, TOKEN_FILE, Identity, apply_identity, identity_dir
from edge_runtime.config import AgentConfig, CloudSection, MqttSection, config_from_dict
from edge_runtime.errors import ConfigError
from edgefleet.signing import key_id
from tests.edge_runtime.agent.conftest import run_cli
from tests.mosquitto import free_port

pytest.importorskip("sqlalchemy", reason="the real cloud-sync needs the [cloud] extra (not in the device's venv)")

from tests.cloud_inprocess import InProcessCloud


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessCloud]:
    running = InProcessCloud(tmp_path_factory.mktemp("cloud")).start()
    yield running
    running.close()


def mint(cloud: InProcessCloud, **kwargs: Any) -> str:
    assert cloud.app is not None and cloud.app.enrollment_tokens is not None
    token, _expires = cloud.app.enrollment_tokens.mint(kwargs.pop("labels", {}), kwargs.pop("ttl_s", 600), **kwargs)
    return token


def enroll(cloud: InProcessCloud, data_dir: Path, token: str, *extra: str) -> Any:
    return run_cli(
        "enroll", "--url", cloud.target, "--token", token, "--data-dir", data_dir, "--config", "/nonexistent", *extra
    )


def test_enroll_writes_the_identity_0600(cloud: InProcessCloud, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    done = enroll(cloud, data_dir, mint(cloud, labels={"site": "lab"}))
    assert done.returncode == 0, done.stderr
    identity = Identity.load(data_dir)
    assert identity is not None
    assert f"enrolled as {identity.device_id}" in done.stdout
    assert identity.labels == {"site": "lab"} and identity.grpc_target == cloud.target and identity.mqtt_url == ""
    for name in (DEVICE_FILE, TOKEN_FILE, KEY_FILE):
        assert stat.S_IMODE((identity_dir(data_dir) / name).stat().st_mode) == 0o600, name
    assert cloud.app is not None and cloud.app.model_registry is not None
    assert identity.signing_key_file.read_bytes() == cloud.app.model_registry.signer.public_key
    token = identity.token_file.read_text().strip()
    assert cloud.app.enrollment_tokens is not None
    # The credential is the device's own: the cloud knows it by it.
    from cloud_sync.store import DeviceRegistry

    assert DeviceRegistry(cloud._database()).authenticate(token) == identity.device_id


def test_the_config_takes_what_it_leaves_empty_from_the_identity(cloud: InProcessCloud, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    assert enroll(cloud, data_dir, mint(cloud)).returncode == 0
    identity = Identity.load(data_dir)
    assert identity is not None
    config = config_from_dict(AgentConfig, {"agent": {"data_dir": str(data_dir)}})
    applied = apply_identity(config)
    assert applied.cloud.device_id == identity.device_id
    assert applied.cloud.token_file == str(identity.token_file)
    assert applied.cloud.grpc_target == cloud.target
    assert applied.cloud.signing_key_file == str(identity.signing_key_file)
    assert applied.mqtt == MqttSection()  # the cloud named no broker
    explicit = dataclasses.replace(config, cloud=CloudSection(grpc_target="10.0.0.1:7000", token_file="/etc/t"))
    kept = apply_identity(explicit)
    assert kept.cloud.grpc_target == "10.0.0.1:7000" and kept.cloud.token_file == "/etc/t"
    assert kept.cloud.device_id == identity.device_id
    other = dataclasses.replace(config, cloud=CloudSection(device_id="someone-else"))
    with pytest.raises(ConfigError, match="enrolled as"):
        apply_identity(other)


def test_without_an_identity_the_config_is_unchanged(tmp_path: Path) -> None:
    config = config_from_dict(AgentConfig, {"agent": {"data_dir": str(tmp_path)}})
    assert apply_identity(config) is config


def test_a_used_token_exits_2_with_the_cloud_s_reason(cloud: InProcessCloud, tmp_path: Path) -> None:
    token = mint(cloud)
    assert enroll(cloud, tmp_path / "a", token).returncode == 0
    done = enroll(cloud, tmp_path / "b", token)
    assert done.returncode == 2, done.stderr
    assert "used already" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "b" / "identity").exists()


def test_an_existing_identity_is_kept_without_force_and_the_token_stays_unused(
    cloud: InProcessCloud, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    assert enroll(cloud, data_dir, mint(cloud)).returncode == 0
    first = Identity.load(data_dir)
    token = mint(cloud)
    done = enroll(cloud, data_dir, token)
    assert done.returncode == 2 and "--force" in done.stderr
    assert Identity.load(data_dir) == first
    forced = enroll(cloud, data_dir, token, "--force")
    assert forced.returncode == 0, forced.stderr
    second = Identity.load(data_dir)
    assert second is not None and first is not None and second.device_id != first.device_id


@pytest.mark.parametrize(
    ("url", "message"),
    [("cloud.example.com:7000", "not loopback"), ("no-port", "host:port"), ("127.0.0.1:0", "host:port")],
)
def test_bad_urls_exit_2(tmp_path: Path, url: str, message: str) -> None:
    done = run_cli("enroll", "--url", url, "--token", "efe_x", "--data-dir", tmp_path, "--config", "/nonexistent")
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
    assert not (tmp_path / "identity").exists()


def test_an_unreachable_cloud_exits_1(tmp_path: Path) -> None:
    url = f"grpc://127.0.0.1:{free_port()}"
    done = run_cli("enroll", "--url", url, "--token", "efe_x", "--data-dir", tmp_path, "--config", "/nonexistent")
    assert done.returncode == 1, done.stderr
    assert "cannot enroll" in done.stderr and "still unused" in done.stderr


def _identity(tmp_path: Path) -> Path:
    key = bytes(range(32))
    Identity.save(
        tmp_path,
        device_id="cam-1",
        device_token="efd_token",
        signing_key=key,
        grpc_target="127.0.0.1:7000",
        mqtt_url="mqtt://127.0.0.1:1883",
        topic_prefix="fleet/v2",
        labels={"site": "lab"},
        enrolled_at_ms=1,
    )
    assert Identity.load(tmp_path) is not None
    return identity_dir(tmp_path)


def test_the_broker_and_topic_prefix_come_from_the_identity(tmp_path: Path) -> None:
    _identity(tmp_path)
    applied = apply_identity(config_from_dict(AgentConfig, {"agent": {"data_dir": str(tmp_path)}}))
    assert applied.mqtt.url == "mqtt://127.0.0.1:1883" and applied.mqtt.topic_prefix == "fleet/v2"


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        (DEVICE_FILE, b"{not json", "not JSON"),
        (DEVICE_FILE, b"[]", "not a JSON object"),
        (DEVICE_FILE, json.dumps({"device_id": "a/b"}).encode(), "not a device id"),
        (KEY_FILE, b"short", "32 raw bytes"),
        (KEY_FILE, bytes(32), "is not the fleet key"),
        (TOKEN_FILE, b"\n", "holds no device token"),
    ],
)
def test_a_damaged_identity_is_a_config_error_naming_the_file(
    tmp_path: Path, name: str, content: bytes, message: str
) -> None:
    directory = _identity(tmp_path)
    (directory / name).write_bytes(content)
    with pytest.raises(ConfigError, match=message) as error:
        Identity.load(tmp_path)
    assert str(directory / name) in str(error.value) or message == "is not the fleet key"


def test_a_missing_token_file_is_a_config_error(tmp_path: Path) -> None:
    directory = _identity(tmp_path)
    (directory / TOKEN_FILE).unlink()
    with pytest.raises(ConfigError, match="token file is missing"):
        Identity.load(tmp_path)


def test_run_refuses_to_start_on_a_damaged_identity(tmp_path: Path) -> None:
    directory = _identity(tmp_path)
    (directory / DEVICE_FILE).write_text("{")
    config = tmp_path / "agent.toml"
    config.write_text(f'[agent]\ndata_dir = "{tmp_path}"\n')
    done = run_cli("models", "--config", config)
    assert done.returncode == 2 and str(directory / DEVICE_FILE) in done.stderr


def test_the_key_id_is_the_key_s(tmp_path: Path) -> None:
    _identity(tmp_path)
    identity = Identity.load(tmp_path)
    assert identity is not None and identity.key_id == key_id(bytes(range(32)))
