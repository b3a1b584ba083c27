"""The dashboard in a real browser: Debian's Chromium, headless, driven by Playwright, against cloud-sync with a
real fleet (Mosquitto, cloud-sync and hollow devices as processes: bench/bench_rollout.py's RolloutRig).

Never a browser download: without /usr/bin/chromium (`.ci/run` apt-installs `chromium`) or the playwright
package the browser tests are skipped, saying which is missing.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import httpx
import pytest

from tests.dashboard.browser import CHROMIUM, DEVICES, Fleet, browser_missing

if TYPE_CHECKING:
    from playwright.sync_api import Browser


@pytest.fixture(scope="module")
def fleet() -> Iterator[Fleet]:
    missing = browser_missing()
    if missing:
        pytest.skip(missing)
    from bench.bench_rollout import RolloutRig
    from bench.hollow import Behaviour

    with RolloutRig(DEVICES, behaviour=Behaviour(), telemetry_s=0.5, tick_s=0.2, versions=(1, 2)) as rig:
        client = rig._http  # the rig's admin-API client: its address and the admin token
        assert client is not None
        url = str(client.base_url).rstrip("/")
        token = client.headers["authorization"].removeprefix("Bearer ")
        with httpx.Client(base_url=url, timeout=30) as http:
            running = Fleet(rig, url, token, http)
            if http.get("/dashboard/").status_code == 404:
                pytest.skip("this cloud-sync does not serve /dashboard/ (cloud_sync/process.py: dashboard_routes)")
            rig.wait_on_version(1, 60)
            rig.wait_windows(1, 30)
            yield running


@pytest.fixture(scope="module")
def browser(fleet: Fleet) -> Iterator[Browser]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start.
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"])
        yield launched
        launched.close()
