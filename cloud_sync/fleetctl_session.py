"""What every fleetctl command shares: the session with cloud-sync's admin API, output, and failing with an exit code.

Exit codes: 0 success; 1 cloud-sync unreachable or failing; 2 bad input (arguments, or a request the API refused
as invalid: 4xx with its reason); 3 not authorised; 4 not found. The commands live in cloud_sync/fleetctl*.py;
the root callback that fills the context is cloud_sync/fleetctl.py's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, NoReturn
from urllib.parse import quote

import httpx
import typer
import typer.main
from rich.console import Console
from typer.core import TyperGroup

__all__ = [
    "Connection",
    "JsonAfterCommands",
    "Session",
    "detail",
    "duration",
    "err",
    "fail",
    "out",
    "segment",
    "session",
    "when",
]

# soft_wrap: a line is never folded at the terminal's width (scripts grep fleetctl's output and messages).
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


@dataclass
class Connection:
    """The root options (`fleetctl --url ... --token ... --json`), as the root callback read them."""

    url: str
    token: str | None
    token_file: Path | None
    as_json: bool


JSON_HELP = "machine-readable output (also accepted before the command: fleetctl --json ...)"


def _json_after_command(ctx: typer.Context, value: bool) -> None:
    # The root callback has run: a group is invoked before its subcommand's arguments are parsed.
    root = ctx.find_root().obj
    if value and isinstance(root, Connection):
        root.as_json = True


_JsonFlag = Annotated[bool, typer.Option("--json", help=JSON_HELP, callback=_json_after_command)]


def _json_option() -> Any:
    """The `--json` option every command takes after its name, built by typer as any other option."""
    probe = typer.Typer(add_completion=False)

    @probe.command()
    def json_flag(
        json_after_command: _JsonFlag = False,
    ) -> None: ...

    (option,) = typer.main.get_command(probe).params
    option.expose_value = False  # the command's function never sees it: the callback set the root's flag
    return option


class JsonAfterCommands(TyperGroup):
    """fleetctl's root group: every command under it also takes `--json` after its name.

    One option added to each leaf command, not a parameter in every command's signature; it sets the same
    flag as the root's `--json`, so `fleetctl devices list --json` = `fleetctl --json devices list`.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        option = _json_option()
        for command in self.commands.values():
            _add_option(command, option)


def _add_option(command: Any, option: Any) -> None:
    subcommands = getattr(command, "commands", None)
    if subcommands is not None:
        for sub in subcommands.values():
            _add_option(sub, option)
    elif all(param.name != option.name for param in command.params):
        command.params.append(option)


@dataclass
class Session:
    url: str
    token: str
    as_json: bool

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = httpx.request(
                method,
                f"{self.url}{path}",
                timeout=30,
                headers={"Authorization": f"Bearer {self.token}"},
                **kwargs,
            )
        except httpx.HTTPError as exc:
            fail(1, f"cannot reach cloud-sync at {self.url} ({exc}); is it running? (--url / FLEETCTL_URL)")
        if response.status_code >= 400:
            code = {401: 3, 403: 3, 404: 4}.get(response.status_code, 2 if response.status_code < 500 else 1)
            fail(code, f"cloud-sync refused ({response.status_code}): {detail(response)}")
        return response.json()


def detail(response: httpx.Response) -> str:
    """The reason an API error gives: its `detail` string (ErrorBody), or, from a cloud-sync before the one
    error body, FastAPI's list of validation errors as `field: problem`."""
    try:
        detail = response.json().get("detail", response.text)
    except (ValueError, AttributeError):
        return response.text
    if isinstance(detail, list) and all(isinstance(e, dict) and "loc" in e for e in detail):
        return "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e.get('msg', '')}" for e in detail)
    return detail if isinstance(detail, str) else json.dumps(detail)


def segment(value: str) -> str:
    """`value` as one URL path segment: a device id typed as "cam-1/revoke#" must not address cam-1."""
    return quote(value, safe="")


def fail(code: int, message: str) -> NoReturn:
    err.print(f"fleetctl: {message}", markup=False, highlight=False)
    raise typer.Exit(code)


def _token(token: str | None, token_file: Path | None) -> str:
    if not token and token_file is not None:
        try:
            token = token_file.read_text().strip()
        except (OSError, UnicodeDecodeError) as exc:
            fail(2, f"cannot read --token-file {token_file}: {getattr(exc, 'strerror', None) or exc}")
    if not token:
        fail(
            3, "no admin token: pass --token or --token-file, or set FLEETCTL_TOKEN (cloud-sync admin-token prints it)"
        )
    # An HTTP header holds printable ASCII only; any other token cannot be the admin token.
    if not (token.isascii() and token.isprintable()):
        fail(3, "the admin token is not valid (a token is printable ASCII; cloud-sync admin-token prints it)")
    return token


def _base_url(url: str) -> str:
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        fail(2, f"--url {url!r} is not a URL ({exc}): give http://host:port of cloud-sync's admin API")
    if parsed.scheme not in ("http", "https") or not parsed.host:
        fail(2, f"--url {url!r} is not an http:// or https:// URL with a host, e.g. http://127.0.0.1:8080")
    return url.rstrip("/")


def session(ctx: typer.Context) -> Session:
    root: Connection = ctx.find_root().obj
    return Session(_base_url(root.url), _token(root.token, root.token_file), root.as_json)


def when(ms: int | None) -> str:
    if not ms:
        return "-"
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def duration(ms: int) -> str:
    """A clock skew for a human: "8 d 0 h", "3 h 12 min", "4.2 s"."""
    seconds = ms // 1000
    if seconds >= 86400:
        return f"{seconds // 86400} d {seconds % 86400 // 3600} h"
    if seconds >= 3600:
        return f"{seconds // 3600} h {seconds % 3600 // 60} min"
    if seconds >= 60:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{ms / 1000:.1f} s"
