"""fleetctl tokens create | list | revoke, and fleetctl whoami: admin-API tokens with roles, over the admin API.

    fleetctl tokens create --name ops-alice --role operator   # prints the token (shown once)
    fleetctl whoami                                           # ops-alice operator

Registered by cloud_sync/fleetctl.py; exit codes as there (2: bad input, 3: not authorised, 4: not found).
"""

from __future__ import annotations

import enum
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from cloud_sync.fleetctl_session import out, segment, session, when

__all__ = ["tokens_app", "whoami"]

tokens_app = typer.Typer(
    help="Admin-API tokens and their roles: viewer (reads), operator (models, rollouts), admin (everything).",
    no_args_is_help=True,
)


class RoleChoice(str, enum.Enum):
    viewer = "viewer"
    operator = "operator"
    admin = "admin"


@tokens_app.command("create")
def tokens_create(
    ctx: typer.Context,
    name: Annotated[str, typer.Option("--name", help="unique among live tokens: letters, digits and . _ -")],
    role: Annotated[RoleChoice, typer.Option("--role", help="what the token may do")],
) -> None:
    """Make a token with a role and print it (shown once: only its sha256 is kept)."""
    s = session(ctx)
    created = s.call("POST", "/v1/tokens", json={"name": name, "role": role.value})
    if s.as_json:
        out.print_json(data=created)
    else:
        print(created["token"])


@tokens_app.command("list")
def tokens_list(ctx: typer.Context) -> None:
    """List every token made (never the token): name, role, who made it and when, revoked when."""
    s = session(ctx)
    tokens = s.call("GET", "/v1/tokens")["tokens"]
    if s.as_json:
        out.print_json(data=tokens)
        return
    table = Table("name", "role", "created", "created by", "revoked")
    for t in tokens:
        table.add_row(
            Text(t["name"]), t["role"], when(t["created_at_ms"]), Text(t["created_by"]), when(t["revoked_at_ms"])
        )
    out.print(table)


@tokens_app.command("revoke")
def tokens_revoke(ctx: typer.Context, name: Annotated[str, typer.Argument(help="the token's name")]) -> None:
    """Revoke a token: refused at once by this cloud-sync, within seconds by other replicas."""
    s = session(ctx)
    revoked = s.call("DELETE", f"/v1/tokens/{segment(name)}")
    if s.as_json:
        out.print_json(data=revoked)
    else:
        out.print(f"revoked token {revoked['name']} ({revoked['role']})", markup=False, highlight=False)


def whoami(ctx: typer.Context) -> None:
    """Print the name and role of the token fleetctl uses."""
    s = session(ctx)
    me = s.call("GET", "/v1/whoami")
    if s.as_json:
        out.print_json(data=me)
    else:
        out.print(f"{me['name']} {me['role']}", markup=False, highlight=False)
