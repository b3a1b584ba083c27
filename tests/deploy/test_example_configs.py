"""The shipped example configs: each program's own `check-config` accepts them (run as the installed commands),
the cloud-sync example names every key (its TLS sections commented out), and the two broker configs agree."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from cloud_sync.config import CloudSyncConfig
from tests.deploy.units import CLOUD, JETSON, MOSQUITTO

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - the tests run on 3.11+; ruff and mypy target 3.10
    import tomli as tomllib

BIN = Path(sys.executable).parent
AGENT_EXAMPLE = JETSON / "edge-agent.toml"
CLOUD_EXAMPLE = CLOUD / "cloud-sync.toml"


def check_config(program: str, config: Path) -> dict[str, Any]:
    command = BIN / program
    if not command.exists():
        pytest.skip(f"{command} is not installed (pip install -e '.[dev]')")
    result = subprocess.run([str(command), "check-config", str(config)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    effective: dict[str, Any] = json.loads(result.stdout)
    return effective


def test_edge_agent_check_config_accepts_the_example_with_the_units_paths() -> None:
    effective = check_config("edge-agent", AGENT_EXAMPLE)
    assert effective["agent.data_dir"] == "/var/lib/edgefleet"  # the unit's StateDirectory=edgefleet
    assert effective["server.unix_socket"] == "/run/edgefleet/inference.sock"  # its RuntimeDirectory=edgefleet
    assert effective["agent.watchdog"] is True


def test_cloud_sync_check_config_accepts_the_example() -> None:
    effective = check_config("cloud-sync", CLOUD_EXAMPLE)
    assert effective["server"]["data_dir"] == "/var/lib/cloud-sync"  # the unit's StateDirectory=cloud-sync
    # Secrets are files only cloud-sync's user reads, never in the config.
    assert effective["mqtt"]["password_file"] == "/etc/edgefleet/cloud-sync/mqtt-password"
    assert effective["mqtt"]["manage_accounts"] == "mosquitto-dynsec"


def _commented_sections(text: str) -> dict[str, Any]:
    """The example's commented-out sections (`# [tls]` and the `# key = value` lines under it) as TOML."""
    lines: list[str] = []
    inside = False
    for line in text.splitlines():
        if re.fullmatch(r"# \[\w+\]", line):
            inside = True
        elif not line.startswith("# ") or line.startswith("# # "):
            inside = inside and line.startswith("# # ")
            continue
        if inside:
            lines.append(line[2:])
    return tomllib.loads("\n".join(lines))


def test_the_cloud_sync_example_names_every_key() -> None:
    text = CLOUD_EXAMPLE.read_text()
    active, commented = tomllib.loads(text), _commented_sections(text)
    assert set(commented) == {"tls", "fleet_ca"}, "commented-out sections changed: update this test and the docs"
    shown = {(section, key) for part in (active, commented) for section, keys in part.items() for key in keys}
    fields: set[tuple[str, str]] = set()
    for section, info in CloudSyncConfig.model_fields.items():
        model = info.annotation
        assert isinstance(model, type) and issubclass(model, BaseModel), section
        fields |= {(section, key) for key in model.model_fields}
    assert shown - fields == set(), "the example names keys cloud-sync does not know"
    assert fields - shown == set(), "keys missing from deploy/cloud/cloud-sync.toml"


def _settings(conf: Path) -> dict[str, str]:
    return dict(
        line.split(" ", 1)
        for line in conf.read_text().splitlines()
        if line and not line.startswith("#") and not line.startswith("listener")
    )


def test_both_broker_configs_keep_the_same_queues_persistence_and_limits() -> None:
    static, dynsec = _settings(MOSQUITTO / "edgefleet.conf"), _settings(MOSQUITTO / "edgefleet-dynsec.conf")
    shared = (
        "persistence",
        "persistence_location",
        "autosave_interval",
        "max_queued_messages",
        "max_queued_bytes",
        "max_packet_size",
        "persistent_client_expiration",
        "use_username_as_clientid",
    )
    for key in shared:
        assert static[key] == dynsec[key], key


def test_the_commented_tls_sections_are_accepted_once_their_files_exist(tmp_path: Path) -> None:
    """What an operator gets by uncommenting [tls] and [fleet_ca] with real files at the example's paths."""
    from cloud_sync.config import config_from_dict
    from tests.tls.pki import Pki

    pki = Pki(tmp_path)
    server_ca, fleet_ca = pki.ca("server-ca"), pki.ca("fleet-ca")
    cert, key = pki.server(server_ca, "cloud-sync")
    text = CLOUD_EXAMPLE.read_text()
    data = tomllib.loads(text)
    for section, keys in _commented_sections(text).items():
        data[section] = keys
    moved = {
        "/etc/edgefleet/tls/cloud-sync.pem": cert,
        "/etc/edgefleet/cloud-sync/tls.key": key,
        "/etc/edgefleet/tls/fleet-ca.pem": fleet_ca.cert_file,
        "/etc/edgefleet/cloud-sync/fleet-ca.key": fleet_ca.key_file,
    }
    for section in ("tls", "fleet_ca"):
        for name, value in data[section].items():
            if isinstance(value, str) and value:
                assert value in moved, f"{section}.{name} = {value!r}: a path this test does not know"
                data[section][name] = str(moved[value])
    config = config_from_dict(data, "uncommented example")
    assert config.tls.cert_file == str(cert) and config.fleet_ca.cert_file == str(fleet_ca.cert_file)
