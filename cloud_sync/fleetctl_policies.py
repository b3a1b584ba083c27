"""fleetctl policies set | list | show | delete | effective: fleet-wide scaling policies, over the admin API.

    fleetctl policies set lab-batching --selector site=lab --priority 10 --set inference.max_batch_size=8
    fleetctl policies effective cam-17        # what the device runs, and which policies it comes from

Registered by cloud_sync/fleetctl.py; exit codes as there (2: bad input, 4: no such policy or device).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from cloud_sync.errors import InvalidArgument
from cloud_sync.fleetctl_session import fail, out, segment, session
from cloud_sync.policies import check_policy_name
from cloud_sync.selectors import format_selector, parse_selector

__all__ = ["parse_assignment", "policies_app"]

policies_app = typer.Typer(
    help="Scaling policies: documents of live settings for the devices a label selector matches.",
    no_args_is_help=True,
)

NameArgument = Annotated[str, typer.Argument(help="the policy's name, e.g. lab-batching")]


def parse_assignment(text: str) -> tuple[str, str, Any]:
    """`inference.max_batch_size=8` -> ("inference", "max_batch_size", 8); the value is read as JSON where it
    is JSON (8, 2.5, true), else kept as text (the API then says which type the key takes)."""
    key, sep, raw = text.partition("=")
    section, dot, name = key.strip().partition(".")
    if not sep or not dot or not section or not name or "." in name:
        raise InvalidArgument(f"--set {text!r} is not SECTION.KEY=VALUE (e.g. inference.max_batch_size=8)")
    try:
        value = json.loads(raw, parse_constant=_no_constant)
    except ValueError:
        value = raw.strip()
    return section, name, value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number")


def _document(file: Path | None, assignments: list[str]) -> dict[str, Any]:
    """The document --file gives, with each --set over it."""
    document: dict[str, Any] = {}
    if file is not None:
        try:
            document = json.loads(file.read_text(encoding="utf-8"))
        except OSError as exc:
            raise InvalidArgument(f"cannot read --file {file}: {exc.strerror}") from None
        except (UnicodeDecodeError, ValueError) as exc:
            raise InvalidArgument(f"--file {file} is not a JSON document: {exc}") from None
        if not isinstance(document, dict):
            raise InvalidArgument(f'--file {file} must hold a JSON object of sections, e.g. {{"inference": {{...}}}}')
    for text in assignments:
        section, name, value = parse_assignment(text)
        keys = document.setdefault(section, {})
        if not isinstance(keys, dict):
            raise InvalidArgument(f"--set {text!r}: {section} in --file is not an object of keys")
        keys[name] = value
    return document


def _checked_name(name: str) -> str:
    """The name, checked here: one holding '/' would otherwise address another route (a 404, not a 2)."""

    try:
        return segment(check_policy_name(name))
    except InvalidArgument as exc:
        fail(2, exc.message)


def _print_policy(policy: dict[str, Any]) -> None:

    out.print(
        f"{policy['name']} v{policy['version']}  selector {format_selector(policy['selector'])}  "
        f"priority {policy['priority']}",
        markup=False,
        highlight=False,
    )
    for line in _document_lines(policy["document"]):
        out.print(f"  {line}", markup=False, highlight=False)


def _document_lines(document: dict[str, Any]) -> list[str]:
    return [
        f"{section}.{key} = {json.dumps(value)}" for section in document for key, value in document[section].items()
    ]


@policies_app.command("set")
def policies_set(
    ctx: typer.Context,
    name: NameArgument,
    selector: Annotated[str, typer.Option(help="devices it applies to: key=value,...; '*' or '' for all")] = "",
    priority: Annotated[int, typer.Option(help="where policies set the same key, the higher priority wins")] = 0,
    file: Annotated[Path | None, typer.Option("--file", help="JSON document of policy sections")] = None,
    assignments: Annotated[
        list[str] | None, typer.Option("--set", help="SECTION.KEY=VALUE, repeatable; over --file's document")
    ] = None,
) -> None:
    """Create or replace a policy (its version grows by one on every change)."""

    path = _checked_name(name)
    if file is None and not assignments:
        fail(2, "give the policy's settings: --file doc.json and/or --set SECTION.KEY=VALUE ...")
    try:
        body = {
            "selector": parse_selector(selector),
            "priority": priority,
            "document": _document(file, assignments or []),
        }
    except InvalidArgument as exc:
        fail(2, exc.message)
    s = session(ctx)
    policy = s.call("PUT", f"/v1/policies/{path}", json=body)
    if s.as_json:
        out.print_json(data=policy)
    else:
        _print_policy(policy)


@policies_app.command("list")
def policies_list(ctx: typer.Context) -> None:
    """List policies, by name."""

    s = session(ctx)
    policies = s.call("GET", "/v1/policies")["policies"]
    if s.as_json:
        out.print_json(data=policies)
        return
    table = Table("policy", "version", "selector", "priority", "settings")
    for p in policies:
        table.add_row(
            Text(p["name"]),
            str(p["version"]),
            Text(format_selector(p["selector"])),
            str(p["priority"]),
            Text(", ".join(_document_lines(p["document"])) or "-"),
        )
    out.print(table)


@policies_app.command("show")
def policies_show(ctx: typer.Context, name: NameArgument) -> None:
    """Show one policy: its selector, priority, version and settings."""

    s = session(ctx)
    policy = s.call("GET", f"/v1/policies/{_checked_name(name)}")
    if s.as_json:
        out.print_json(data=policy)
    else:
        _print_policy(policy)


@policies_app.command("delete")
def policies_delete(ctx: typer.Context, name: NameArgument) -> None:
    """Delete a policy; the devices it matched go back to what the other policies give them."""

    s = session(ctx)
    policy = s.call("DELETE", f"/v1/policies/{_checked_name(name)}")
    if s.as_json:
        out.print_json(data=policy)
    else:
        out.print(f"deleted policy {policy['name']} (was v{policy['version']})", markup=False, highlight=False)


@policies_app.command("effective")
def policies_effective(
    ctx: typer.Context, device_id: Annotated[str, typer.Argument(help="the device's id, e.g. cam-17")]
) -> None:
    """Show the policy a device gets: every key the matching policies set, and which policies, in order."""

    s = session(ctx)
    effective = s.call("GET", f"/v1/devices/{segment(device_id)}/effective-policy")
    if s.as_json:
        out.print_json(data=effective)
        return
    sources = ", ".join(effective["sources"]) or "none (the device's own config file)"
    out.print(
        f"{effective['device_id']}: policy {effective['policy_hash']} from {sources}", markup=False, highlight=False
    )
    for line in _document_lines(effective["policy"]):
        out.print(f"  {line}", markup=False, highlight=False)
