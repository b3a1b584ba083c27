"""fleetctl rollouts: create staged rollouts gated on how the model behaves, follow them, step in by hand.

    fleetctl rollouts create --model digits --to 2 --selector site=lab \\
        --stages shadow:10%:60s,active:10%:60s,active:50%:60s,active:100% \\
        --gates max_error_rate=0.01,max_p99_ratio=1.5,min_shadow_agreement=0.95,min_devices=1
    fleetctl rollouts watch ro-0123456789        # exits 0 once completed, 1 once aborted

The stages and gates travel as text: cloud-sync parses and checks them (a 422 naming the term is exit 2), so
fleetctl stays light. Registered by cloud_sync/fleetctl.py; exit codes as there.
"""

from __future__ import annotations

import json
import time
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from cloud_sync.errors import InvalidArgument
from cloud_sync.fleetctl_session import Session, fail, out, segment, session, when
from cloud_sync.selectors import parse_selector

__all__ = ["rollouts_app"]

rollouts_app = typer.Typer(
    help="Staged model rollouts gated on the devices' telemetry: create, follow, pause, resume, abort, promote.",
    no_args_is_help=True,
)

IdArgument = Annotated[str, typer.Argument(help="rollout id, e.g. ro-0123456789 (rollouts list)")]
ReasonOption = Annotated[str, typer.Option(help="why, for the rollout's event log")]
# The terminal states, and watch's exit code for each.
_ENDED = {"completed": 0, "aborted": 1}


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _stage_text(stage: dict[str, Any]) -> str:
    bake = stage.get("bake_s") or 0
    return f"{stage['mode']}:{stage['percent']:g}%" + (f":{bake:g}s" if bake else "")


def _current(rollout: dict[str, Any]) -> str:
    stages = rollout["stages"]
    index = rollout["stage_index"]
    if rollout["state"] == "completed":
        return "done"
    if 0 <= index < len(stages):
        return f"{index + 1}/{len(stages)} {_stage_text(stages[index])}"
    return f"{index + 1}/{len(stages)}"


def _gate_lines(evaluation: dict[str, Any] | None) -> list[str]:
    """Each gate's last value against its threshold, from the controller's last evaluation."""
    if not evaluation:
        return ["  gates: not evaluated yet"]
    head = f"  last evaluation: {evaluation.get('decision', '-')}"
    if evaluation.get("at_ms"):
        head += f" at {when(evaluation['at_ms'])}"
    if evaluation.get("failed_gate"):
        head += f", failed gate {evaluation['failed_gate']}"
    if evaluation.get("reason"):
        head += f" ({evaluation['reason']})"
    lines = [head]
    for gate, v in sorted((evaluation.get("values") or {}).items()):
        verdict = {True: "ok", False: "FAIL"}.get(v.get("ok"), "not measurable yet")
        lines.append(f"    {gate}: {_fmt(v.get('value'))} vs {_fmt(v.get('threshold'))} {verdict}")
    return lines


def _stage_lines(rollout: dict[str, Any]) -> list[str]:
    """Per stage its text, devices and status (show and watch: the API's progress; list has none)."""
    shown = []
    for stage in rollout.get("progress") or []:
        mark = ">" if stage["status"] == "current" else " "
        shown.append(
            f"  {mark} stage {stage['index'] + 1}: {stage['text']}, {stage['devices']} devices, {stage['status']}"
        )
    return shown


def _print_rollout(rollout: dict[str, Any]) -> None:
    out.print(
        Text(
            f"{rollout['id']}: {rollout['model']} {rollout['from_version']} -> {rollout['to_version']} on "
            f"{rollout['selector_text']} ({rollout.get('matched_devices', '?')} devices), {rollout['state']}, "
            f"stage {_current(rollout)}",
            style="bold",
        )
    )
    out.print(Text(f"  gates: {rollout.get('gates_text') or 'defaults'}"))
    if rollout.get("reason"):
        out.print(Text(f"  reason: {rollout['reason']}"))
    for line in _stage_lines(rollout):
        out.print(Text(line))
    for line in _gate_lines(rollout.get("last_evaluation")):
        out.print(Text(line))


def _selector(text: str) -> dict[str, str]:
    try:
        return parse_selector(text)
    except InvalidArgument as exc:
        fail(2, f"--selector: {exc.message}")


def _print_or_json(s: Session, rollout: dict[str, Any]) -> None:
    if s.as_json:
        out.print_json(data=rollout)
    else:
        _print_rollout(rollout)


@rollouts_app.command("create")
def rollouts_create(
    ctx: typer.Context,
    model: Annotated[str, typer.Option(help="model name, e.g. digits")],
    to: Annotated[int, typer.Option(min=1, max=2**31 - 1, help="the version to roll out")],
    stages: Annotated[str, typer.Option(help="e.g. shadow:10%:60s,active:10%:60s,active:50%:60s,active:100%")],
    selector: Annotated[str, typer.Option(help="devices it applies to: key=value,...; '*' or '' for all")] = "",
    gates: Annotated[str, typer.Option(help="e.g. max_error_rate=0.01,max_p99_ratio=1.5,min_devices=1")] = "",
    shadow_sample: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="share of requests mirrored to the candidate in shadow stages")
    ] = 0.1,
) -> None:
    """Start a staged rollout of a model version; each stage advances once its bake time passed and its gates hold.

    A compressed variant (its manifest has a lineage) must be proven first: a shadow stage first, judged by the
    min_shadow_agreement gate (refused with exit 2 otherwise)."""
    body = {
        "model": model,
        "to_version": to,
        "selector": _selector(selector),
        "stages": stages,
        "gates": gates,
        "shadow_sample_rate": shadow_sample,
    }
    s = session(ctx)
    _print_or_json(s, s.call("POST", "/v1/rollouts", json=body))


@rollouts_app.command("list")
def rollouts_list(
    ctx: typer.Context,
    state: Annotated[
        str | None, typer.Option(help="only rollouts in this state: running, paused, completed, aborted")
    ] = None,
) -> None:
    """Rollouts, newest first, with their state and stage."""
    s = session(ctx)
    found = s.call("GET", "/v1/rollouts", params={"state": state} if state else None)["rollouts"]
    if s.as_json:
        out.print_json(data=found)
        return
    table = Table("model", "versions", "selector", "state", "stage")
    # The id whole (it is what the other commands take) even on a narrow terminal.
    table.add_column("id", no_wrap=True, min_width=13)
    for r in found:
        table.add_row(
            Text(r["model"]),
            f"{r['from_version']} -> {r['to_version']}",
            Text(r["selector_text"]),
            r["state"],
            _current(r),
            r["id"],
        )
    out.print(table)


@rollouts_app.command("show")
def rollouts_show(ctx: typer.Context, rollout_id: IdArgument) -> None:
    """A rollout: per stage its devices, and each gate's last value against its threshold."""
    s = session(ctx)
    _print_or_json(s, s.call("GET", f"/v1/rollouts/{segment(rollout_id)}"))


def _event_line(event: dict[str, Any]) -> str:
    line = f"{when(event['at_ms'])} {event['kind']} by {event['actor']}"
    if event.get("reason"):
        line += f": {event['reason']}"
    values = event.get("values") or {}
    # The controller's events carry {"stage", "gate", "gates": {gate: {value, threshold, ok}}}.
    values = values["gates"] if isinstance(values.get("gates"), dict) else values
    decided = [
        f"{gate} {_fmt(v.get('value'))} vs {_fmt(v.get('threshold'))}"
        for gate, v in sorted(values.items())
        if isinstance(v, dict) and "threshold" in v
    ]
    if decided:
        line += f" [{'; '.join(decided)}]"
    return line


@rollouts_app.command("events")
def rollouts_events(
    ctx: typer.Context,
    rollout_id: IdArgument,
    after_id: Annotated[int, typer.Option(min=0, help="only events after this event id")] = 0,
) -> None:
    """Every transition of a rollout, by a person or a gate, with its reason and the values that decided it."""
    s = session(ctx)
    events = s.call("GET", f"/v1/rollouts/{segment(rollout_id)}/events", params={"after_id": after_id})["events"]
    if s.as_json:
        out.print_json(data=events)
        return
    for event in events:
        out.print(Text(_event_line(event)))


@rollouts_app.command("watch")
def rollouts_watch(
    ctx: typer.Context,
    rollout_id: IdArgument,
    interval: Annotated[float, typer.Option(min=0.1, max=3600, help="seconds between looks")] = 1.0,
) -> None:
    """Follow a rollout live until it ends: exit 0 once completed, 1 once aborted."""
    s = session(ctx)
    path = f"/v1/rollouts/{segment(rollout_id)}"
    after_id = 0
    last: str | None = None
    while True:
        rollout = s.call("GET", path)
        events = s.call("GET", f"{path}/events", params={"after_id": after_id})["events"]
        after_id = events[-1]["id"] if events else after_id
        seen = json.dumps(rollout, sort_keys=True)
        if s.as_json:
            for event in events:
                out.print(json.dumps({"event": event}), markup=False, highlight=False, soft_wrap=True)
            if seen != last:
                out.print(json.dumps({"rollout": rollout}), markup=False, highlight=False, soft_wrap=True)
        else:
            for event in events:
                out.print(Text(_event_line(event)))
            if seen != last:
                _print_rollout(rollout)
        last = seen
        if rollout["state"] in _ENDED:
            raise typer.Exit(_ENDED[rollout["state"]])
        time.sleep(interval)


def _transition(ctx: typer.Context, rollout_id: str, action: str, reason: str) -> None:
    s = session(ctx)
    _print_or_json(s, s.call("POST", f"/v1/rollouts/{segment(rollout_id)}/{action}", json={"reason": reason}))


@rollouts_app.command("pause")
def rollouts_pause(ctx: typer.Context, rollout_id: IdArgument, reason: ReasonOption = "") -> None:
    """Hold a running rollout at its stage; devices keep what they run."""
    _transition(ctx, rollout_id, "pause", reason)


@rollouts_app.command("resume")
def rollouts_resume(ctx: typer.Context, rollout_id: IdArgument, reason: ReasonOption = "") -> None:
    """Let a paused rollout go on; its stage's bake time starts again."""
    _transition(ctx, rollout_id, "resume", reason)


@rollouts_app.command("abort")
def rollouts_abort(ctx: typer.Context, rollout_id: IdArgument, reason: ReasonOption = "") -> None:
    """Stop a rollout and put every device it touched back on the version it came from."""
    _transition(ctx, rollout_id, "abort", reason)


@rollouts_app.command("promote")
def rollouts_promote(ctx: typer.Context, rollout_id: IdArgument, reason: ReasonOption = "") -> None:
    """Advance a rollout one stage now, skipping its gates (after the last stage: complete it)."""
    _transition(ctx, rollout_id, "promote", reason)
