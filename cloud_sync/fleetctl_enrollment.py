"""fleetctl devices token create | list: one-time enrollment tokens, over the admin API.

    fleetctl devices token create --labels site=lab,cam=front --expires 24h   # prints the token (shown once)
    edge-agent enroll --url cloud.example:7000 --token efe_...               # on the device

Registered under `fleetctl devices` by cloud_sync/fleetctl.py; exit codes as there (2: bad input).
"""

from __future__ import annotations

import re
from datetime import datetime, timezone
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from cloud_sync.cli import parse_labels
from cloud_sync.errors import InvalidArgument
from cloud_sync.fleetctl_session import fail, out, session

__all__ = ["parse_duration", "token_app"]

token_app = typer.Typer(
    help="One-time enrollment tokens: `edge-agent enroll --token` redeems one.", no_args_is_help=True
)

_DURATION = re.compile(r"([0-9]{1,9})\s*([smhd]?)")
_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> int:
    """Seconds of a duration such as "90s", "15m", "24h", "30d" or "3600"; InvalidArgument otherwise."""
    found = _DURATION.fullmatch(text.strip().lower())
    if found is None:
        raise InvalidArgument(f"{text!r} is not a duration: give a number with s, m, h or d, e.g. 24h or 30d")
    return int(found.group(1)) * _UNIT_S[found.group(2)]


def _when(ms: int | None) -> str:
    if not ms:
        return "-"
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


@token_app.command("create")
def token_create(
    ctx: typer.Context,
    labels: Annotated[str, typer.Option(help="labels of the enrolled device: comma-separated key=value")] = "",
    expires: Annotated[str, typer.Option(help="how long the token may be redeemed: 60s .. 30d")] = "24h",
    device_id: Annotated[
        str | None, typer.Option("--device-id", help="the enrolled device's id (default: from its hostname)")
    ] = None,
) -> None:
    """Mint a one-time enrollment token and print it (shown once: give it to the device's installer)."""

    s = session(ctx)
    try:
        body = {"labels": parse_labels(labels), "expires_in_s": parse_duration(expires)}
    except InvalidArgument as exc:
        fail(2, exc.message)
    if device_id is not None:
        body["device_id"] = device_id
    created = s.call("POST", "/v1/enrollment-tokens", json=body)
    if s.as_json:
        out.print_json(data=created)
    else:
        print(created["token"])


@token_app.command("list")
def token_list(ctx: typer.Context) -> None:
    """List minted enrollment tokens (never the secret): state, labels, expiry, the device that used each."""

    s = session(ctx)
    tokens = s.call("GET", "/v1/enrollment-tokens")["tokens"]
    if s.as_json:
        out.print_json(data=tokens)
        return
    # No created column: the list is newest first. Used tokens name their device, unused ones their expiry.
    table = Table("token", "state", "device", "expires / used", "labels")
    for t in tokens:
        labels = ",".join(f"{k}={v}" for k, v in sorted(t["labels"].items()))
        when = _when(t["used_at_ms"] if t["used_at_ms"] else t["expires_at_ms"])
        table.add_row(t["token_id"], t["state"], Text(t["used_by"] or t["device_id"] or "-"), when, Text(labels))
    out.print(table)
