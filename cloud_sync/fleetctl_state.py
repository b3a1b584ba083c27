"""fleetctl models assign | unassign | assignments, and the desired-vs-reported lines of `devices list/show`.

    fleetctl models assign digits 3 --selector site=lab --priority 10
    fleetctl models assign digits 6 --selector accel=none --force   # a compressed variant, unproven (audited)
    fleetctl devices show cam-17          # per model: desired and running version, engine, precision, state

Registered by cloud_sync/fleetctl.py (add_state_commands); exit codes as there (2: bad input, 4: not found).
"""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from cloud_sync.errors import InvalidArgument
from cloud_sync.fleetctl_session import fail, out, session
from cloud_sync.selectors import format_selector, parse_selector

__all__ = ["add_state_commands", "print_device_state", "state_cell"]

SelectorOption = Annotated[str, typer.Option(help="devices it applies to: key=value,...; '*' or '' for all")]


def models_assign(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="model name, e.g. digits")],
    version: Annotated[int, typer.Argument(min=1, max=2**31 - 1, help="a version the registry holds")],
    selector: SelectorOption = "",
    priority: Annotated[
        int, typer.Option(min=-1_000_000, max=1_000_000, help="where assignments of a model overlap, the higher wins")
    ] = 0,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="assign a compressed variant without proving it in a rollout's shadow stage first (audited)",
        ),
    ] = False,
) -> None:
    """Assign a model version to the devices a selector matches (replaces that model+selector's assignment).

    A compressed variant (its manifest has a lineage) is refused unless --force: roll it out through a shadow
    stage instead (fleetctl rollouts create)."""

    try:
        parsed = parse_selector(selector)
    except InvalidArgument as exc:
        fail(2, exc.message)
    s = session(ctx)
    body: dict[str, Any] = {"model": name, "version": version, "selector": parsed, "priority": priority}
    if force:
        body["force"] = True
    assignment = s.call("PUT", "/v1/assignments", json=body)
    if s.as_json:
        out.print_json(data=assignment)
    else:
        out.print(
            f"{name}:{version} assigned to {assignment['selector_text']} (priority {priority})"
            + (", forced" if force else ""),
            markup=False,
            highlight=False,
        )


def models_unassign(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="model name, e.g. digits")],
    selector: SelectorOption = "",
) -> None:
    """Remove a model's assignment to a selector (devices keep what they run unless another assignment applies)."""

    try:
        parsed = parse_selector(selector)
    except InvalidArgument as exc:
        fail(2, exc.message)
    s = session(ctx)
    removed = s.call("DELETE", "/v1/assignments", json={"model": name, "selector": parsed})
    if s.as_json:
        out.print_json(data=removed)
    else:
        out.print(f"{name} unassigned from {format_selector(parsed)}", markup=False, highlight=False)


def models_assignments(
    ctx: typer.Context,
    model: Annotated[str | None, typer.Option(help="only this model's assignments")] = None,
) -> None:
    """List model assignments, by model then selector."""

    s = session(ctx)
    found = s.call("GET", "/v1/assignments", params={"model": model} if model else None)["assignments"]
    if s.as_json:
        out.print_json(data=found)
        return
    table = Table("model", "version", "selector", "priority")
    for a in found:
        table.add_row(Text(a["model"]), str(a["version"]), Text(a["selector_text"]), str(a["priority"]))
    out.print(table)


def add_state_commands(models_app: typer.Typer) -> None:
    """Put assign, unassign and assignments on fleetctl's `models` sub-command."""
    models_app.command("assign")(models_assign)
    models_app.command("unassign")(models_unassign)
    models_app.command("assignments")(models_assignments)


def state_cell(device: dict[str, Any]) -> str:
    """The `devices list` cell: desired/reported generation and a word (ok, syncing, behind, error)."""
    desired, reported = device.get("desired_generation"), device.get("reported_generation")
    if desired is None:
        return "-"
    generations = f"{desired}/{reported if reported is not None else '-'}"
    if device.get("state_error"):
        return f"{generations} error"
    if device.get("converged"):
        return f"{generations} ok"
    return f"{generations} {'syncing' if reported == desired else 'behind'}"


def print_device_state(out: Console, state: dict[str, Any] | None) -> None:
    """The `devices show` lines: desired vs reported generation, then per model what runs and why not yet."""
    if not state or state.get("desired") is None:
        out.print("desired state: none (no assignment or policy selects this device)", markup=False, highlight=False)
        return
    desired = state["desired"]
    reported = state.get("reported") or {}
    verdict = "converged" if state["converged"] else ("in sync, converging" if state["in_sync"] else "behind")
    out.print(
        f"desired generation {desired['generation']}, reported {reported.get('generation', '-')}: {verdict}"
        + (f"; policy {desired['policy_hash']}" if desired.get("policy_hash") else ""),
        markup=False,
        highlight=False,
    )
    if reported.get("error"):
        out.print(Text(f"  device error: {reported['error']}"))
    engines = _engines(reported)
    for m in state["models"]:
        want = m["desired_version"] if m["desired_version"] is not None else "-"
        runs = m["reported_version"] if m["reported_version"] is not None else "-"
        line = f"  {m['name']}: desired {want}, running {runs}"
        if (engine := engines.get((m["name"], m["reported_version"]))) is not None:
            line += f" on {engine}"
        line += f", {m['state']}"
        if m["state"] == "DOWNLOADING":
            line += f" {m['progress']:.0%}"
        if m["reason"]:
            line += f" ({m['reason']}; attempt {m['attempts']})"
        out.print(Text(line))
    for problem in state.get("problems", []):
        out.print(Text(f"  problem: {problem}"))


def _engines(reported: dict[str, Any]) -> dict[tuple[str, Any], str]:
    """{(model, version): "backend, precision"} of the ACTIVE versions in a reported state (protobuf JSON);
    "precision ?" where the device does not say (an older agent)."""
    shown: dict[tuple[str, Any], str] = {}
    for status in reported.get("models") or []:
        if status.get("role") != "MODEL_ROLE_ACTIVE" or status.get("state") != "MODEL_STATE_ACTIVE":
            continue
        backend = status.get("backend") or "engine ?"
        shown[(status.get("name"), status.get("version"))] = f"{backend}, precision {status.get('precision') or '?'}"
    return shown
