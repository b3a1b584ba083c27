"""The user docs keep up with the code (as sqlite-utils' tests/test_docs.py does).

Every fleetctl command and every cloud-sync subcommand has --help and a section of its own in docs/ that
names each of its options; every cloud-sync config key is in docs/cloud-sync.md, every admin API route in
docs/admin-api.md.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer.main
from typer.testing import CliRunner

from cloud_sync import cli, fleetctl
from cloud_sync.config import CloudSyncConfig
from tests.cloud_sync.conftest import RunningCloudSync

DOCS = Path(__file__).resolve().parents[2] / "docs"
FLEETCTL_DOC = (DOCS / "fleetctl.md").read_text()
CLOUD_SYNC_DOC = (DOCS / "cloud-sync.md").read_text()
ADMIN_API_DOC = (DOCS / "admin-api.md").read_text()


def _fleetctl_commands(command: Any = None, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    command = command or typer.main.get_command(fleetctl.app)
    subcommands = getattr(command, "commands", None)
    if subcommands is None:
        yield path, command
        return
    for name, sub in subcommands.items():
        yield from _fleetctl_commands(sub, (*path, name))


FLEETCTL_COMMANDS = dict(_fleetctl_commands())


def _cloud_sync_commands() -> dict[str, argparse.ArgumentParser]:
    parser = cli._parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(subparsers.choices)


CLOUD_SYNC_COMMANDS = _cloud_sync_commands()


def section(doc: str, heading: str) -> str:
    """The text under the markdown heading `heading` up to the next heading of the same or a higher level."""
    match = re.search(rf"^(#+) {re.escape(heading)}\s*$", doc, re.MULTILINE)
    assert match, f"no section '{heading}'"
    level = len(match.group(1))
    rest = doc[match.end() :]
    end = re.search(rf"^#{{1,{level}}} ", rest, re.MULTILINE)
    return rest[: end.start()] if end else rest


def test_the_command_lists_are_not_empty() -> None:
    assert {("devices", "list"), ("results", "tail")} <= set(FLEETCTL_COMMANDS)
    assert {"run", "check-config"} <= set(CLOUD_SYNC_COMMANDS)


@pytest.mark.parametrize("path", FLEETCTL_COMMANDS, ids=" ".join)
def test_every_fleetctl_command_has_help_and_a_section(path: tuple[str, ...]) -> None:
    command = FLEETCTL_COMMANDS[path]
    result = CliRunner().invoke(fleetctl.app, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert (command.help or "").split("\n")[0].strip() in " ".join(result.output.split())

    text = section(FLEETCTL_DOC, f"fleetctl {' '.join(path)}")
    assert "--json" in result.output  # every command takes it after its name too (documented under Connecting)
    for param in command.params:
        if param.name == "json_after_command":
            continue
        assert getattr(param, "help", None), f"{param.name} of {path} has no help text"
        name = param.opts[0] if param.param_type_name == "option" else param.name.upper()
        assert name in text, f"{name} of fleetctl {' '.join(path)} is not in its section"
    assert "```" in text, f"fleetctl {' '.join(path)} has no example"


def test_fleetctl_global_options_and_exit_codes_are_documented() -> None:
    root = typer.main.get_command(fleetctl.app)
    for param in root.params:
        assert param.opts[0] in FLEETCTL_DOC
        assert getattr(param, "help", None), param.name
        for envvar in [param.envvar] if isinstance(param.envvar, str) else param.envvar or []:
            assert envvar in FLEETCTL_DOC
    assert "`fleetctl devices list --json` are the same" in section(FLEETCTL_DOC, "Connecting")
    codes = section(FLEETCTL_DOC, "Exit codes")
    for code in range(5):
        assert re.search(rf"^\| {code} \|", codes, re.MULTILINE), f"exit code {code} is not in the table"


@pytest.mark.parametrize("name", CLOUD_SYNC_COMMANDS)
def test_every_cloud_sync_command_has_help_and_a_section(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main([name, "--help"])
    assert exited.value.code == 0
    assert f"usage: cloud-sync {name}" in capsys.readouterr().out

    text = section(CLOUD_SYNC_DOC, f"cloud-sync {name}")
    for action in CLOUD_SYNC_COMMANDS[name]._actions:
        if "--help" in action.option_strings:
            continue
        assert action.help, f"{action.dest} of cloud-sync {name} has no help text"
        shown = action.option_strings[0] if action.option_strings else action.dest.upper()
        assert shown in text, f"{shown} of cloud-sync {name} is not in its section"


def _config_keys() -> list[str]:
    return [
        f"{section_name}.{key}"
        for section_name, field in CloudSyncConfig.model_fields.items()
        for key in field.annotation.model_fields  # type: ignore[union-attr]
    ]


@pytest.mark.parametrize("key", _config_keys())
def test_every_config_key_is_documented(key: str) -> None:
    assert f"`{key}`" in section(CLOUD_SYNC_DOC, "Configuration")


def test_every_admin_api_route_is_documented(cloud_sync: RunningCloudSync) -> None:
    # The running process's schema: routes added by other modules (registry, policies, enrollment, state)
    # through ApiContext.extra_routes are in it, as create_app alone would not have them.
    schema = cloud_sync.api.get("/openapi.json").json()
    endpoints = section(ADMIN_API_DOC, "Routes")
    routes = [(method.upper(), path) for path, item in schema["paths"].items() for method in item]
    assert ("PUT", "/v1/policies/{name}") in routes and ("POST", "/v1/models") in routes
    for method, path in routes:
        if method != "HEAD":
            assert f"`{method} {path}`" in endpoints, f"{method} {path} is not documented"


def test_every_error_status_the_schema_documents_is_in_the_error_table(cloud_sync: RunningCloudSync) -> None:
    schema = cloud_sync.api.get("/openapi.json").json()
    codes = {code for item in schema["paths"].values() for op in item.values() for code in op["responses"]}
    table = section(ADMIN_API_DOC, "Errors")
    for code in sorted(c for c in codes if int(c) >= 400):
        assert re.search(rf"^\| {code} \|", table, re.MULTILINE), f"status {code} is not in the error table"
