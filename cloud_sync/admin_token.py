"""The admin API's bootstrap token: made once in the data directory (mode 0600), read by `cloud-sync run` and by
`cloud-sync admin-token`, which thus needs nothing of the server to print it.
"""

from __future__ import annotations

import secrets
from pathlib import Path

from cloud_sync.config import ConfigProblem
from edgefleet.durable import create_once

__all__ = ["ADMIN_TOKEN_FILE", "MIN_ADMIN_TOKEN_CHARS", "admin_token"]

ADMIN_TOKEN_FILE = "admin-token"
# Shorter than any token admin_token makes (47 characters); a person may put their own, but not a guessable one.
MIN_ADMIN_TOKEN_CHARS = 32


def admin_token(data_dir: Path) -> str:
    """The admin API token in data_dir (made on first use, mode 0600).

    Raises ConfigProblem for a token file that holds no token: the API would take an empty bearer token.
    """
    path = data_dir / ADMIN_TOKEN_FILE
    try:
        return _checked_token(path, path.read_text().strip())
    except FileNotFoundError:
        pass
    data_dir.mkdir(parents=True, exist_ok=True)
    # Of several processes making it at once (`cloud-sync admin-token` beside a first `cloud-sync run`), the first
    # one's token stands and every one returns it.
    create_once(path, f"efa_{secrets.token_urlsafe(32)}\n".encode())
    return _checked_token(path, path.read_text().strip())


def _checked_token(path: Path, token: str) -> str:
    if len(token) < MIN_ADMIN_TOKEN_CHARS or not (token.isascii() and token.isprintable()):
        raise ConfigProblem(
            f"the admin token file {path} holds no valid token (at least {MIN_ADMIN_TOKEN_CHARS} printable ASCII "
            "characters): delete it and cloud-sync makes a new one"
        )
    return token
