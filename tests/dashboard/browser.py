"""What the dashboard's browser tests share: where Chromium is, the running fleet, a signed-in tab with its
console watched, screenshots. The fixtures that start them are in conftest.py."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.processes import REPO_ROOT

CHROMIUM = Path(os.environ.get("EDGEFLEET_CHROMIUM", "/usr/bin/chromium"))
SCREENSHOTS = REPO_ROOT / "build" / "screenshots"
TOKEN_KEY = "edgefleet.dashboard.token"
DEVICES = 6
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 375, "height": 812}

try:
    from playwright.sync_api import Browser, BrowserContext, Page, sync_playwright
except ImportError:  # pragma: no cover - the dev extra installs it
    sync_playwright = None  # type: ignore[assignment]


def browser_missing() -> str | None:
    if sync_playwright is None:
        return "the playwright package is not installed (pip install -e '.[dev]')"
    if not CHROMIUM.exists():
        return f"no Chromium at {CHROMIUM} (apt-get install chromium; never a browser download)"
    return None


@dataclass
class Fleet:
    """The running rig as the browser tests use it: the dashboard's address, the admin token, the API."""

    rig: Any
    url: str
    token: str
    http: httpx.Client
    tokens: dict[str, str] = field(default_factory=dict)

    def api(self, method: str, path: str, body: Any = None, token: str | None = None) -> httpx.Response:
        headers = {"authorization": f"Bearer {token or self.token}"}
        return self.http.request(method, path, json=body, headers=headers)


@dataclass
class Console:
    """What the page said on its console and which uncaught errors it threw."""

    errors: list[str] = field(default_factory=list)

    def watch(self, page: Page) -> None:
        page.on("console", lambda m: self.errors.append(f"console.{m.type}: {m.text}") if m.type == "error" else None)
        page.on("pageerror", lambda exc: self.errors.append(f"uncaught: {exc}"))


def open_page(
    browser: Browser, fleet: Fleet, token: str | None = None, viewport: dict[str, int] | None = None
) -> tuple[BrowserContext, Page, Console]:
    """A fresh tab (its own sessionStorage), signed in with `token` (None: not signed in), console watched."""
    context = browser.new_context(viewport=viewport or DESKTOP)  # type: ignore[arg-type]
    if token is not None:
        context.add_init_script(f"sessionStorage.setItem({json.dumps(TOKEN_KEY)}, {json.dumps(token)})")
    context.on("dialog", lambda dialog: dialog.accept())  # the confirm() before abort and delete
    page = context.new_page()
    page.set_default_timeout(15_000)
    console = Console()
    console.watch(page)
    return context, page, console


def shot(page: Page, name: str) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path
