"""fleetctl audit: the changes made to the fleet, newest first (by a token, a gate or the controller).

    fleetctl audit --since 24h --actor ops-alice
    fleetctl audit --target rollout/ro-0123456789 --json

Registered by cloud_sync/fleetctl.py; exit codes as there (2: bad input).
"""

from __future__ import annotations

import json
import time
from typing import Annotated, Any

import typer

from cloud_sync.errors import InvalidArgument
from cloud_sync.fleetctl_enrollment import parse_duration
from cloud_sync.fleetctl_session import fail, out, session, when

__all__ = ["audit"]

MAX_LIMIT = 1000


def _change(record: dict[str, Any]) -> str:
    """before -> after, compactly (the whole objects are in --json)."""

    def short(value: object) -> str:
        return "-" if value is None else json.dumps(value, sort_keys=True, separators=(",", ":"))[:120]

    return f"{short(record['before'])} -> {short(record['after'])}"


_Since = Annotated[str | None, typer.Option(help="only this far back: 90s, 15m, 24h, 30d")]
_Actor = Annotated[str | None, typer.Option(help="only by this actor: a token's name, gate:<gate>, controller")]
_Action = Annotated[str | None, typer.Option(help="only this action: rollout.abort, policy.set, token.create...")]
_Target = Annotated[str | None, typer.Option(help="only on this target: rollout/ro-..., policy/lab, device/cam-1")]


def audit(
    ctx: typer.Context,
    since: Annotated[str | None, typer.Option(help="only this far back: 90s, 15m, 24h, 30d")] = None,
    actor: Annotated[
        str | None, typer.Option(help="only by this actor: a token's name, gate:<gate>, controller")
    ] = None,
    action: Annotated[
        str | None, typer.Option(help="only this action: rollout.abort, policy.set, token.create...")
    ] = None,
    target: Annotated[
        str | None, typer.Option(help="only on this target: rollout/ro-..., policy/lab, device/cam-1")
    ] = None,
    limit: Annotated[int, typer.Option(help=f"at most this many records (1-{MAX_LIMIT})")] = 100,
) -> None:
    """The audit log: who or which gate changed what, when, before and after, and why; newest first."""
    if not 1 <= limit <= MAX_LIMIT:
        fail(2, f"--limit {limit}: a number of records from 1 to {MAX_LIMIT}")
    params: dict[str, Any] = {"limit": limit}
    if since is not None:
        try:
            params["since_ms"] = max(0, int(time.time() * 1000) - parse_duration(since) * 1000)
        except InvalidArgument as exc:
            fail(2, f"--since: {exc.message}")
    for name, value in (("actor", actor), ("action", action), ("target", target)):
        if value is not None:
            if not value.strip():
                fail(2, f"--{name}: give a value, or leave the option out")
            params[name] = value
    s = session(ctx)
    records = s.call("GET", "/v1/audit", params=params)["records"]
    if s.as_json:
        out.print_json(data=records)
        return
    # One line a record (greppable, never folded): when, who, what, on what, before -> after, and why.
    for r in records:
        reason = f"  ({r['reason']})" if r["reason"] else ""
        line = f"{when(r['at_ms'])}  {r['actor']}  {r['action']}  {r['target']}  {_change(r)}{reason}"
        out.print(line, markup=False, highlight=False)
