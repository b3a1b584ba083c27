"""The dashboard in headless Chromium against cloud-sync with a hollow fleet: signing in, creating a rollout in
the UI, watching its stage change, aborting it and seeing the devices go back; a viewer offered no action (and
refused by the API too); bad input in every form; every page at 1280x800 and 375x812 with no console error (a
screenshot of each under build/screenshots/); Tab reaching every action of the rollout page."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest

from bench.bench_rollout import LABELS, MODEL
from tests.dashboard.browser import DESKTOP, PHONE, Fleet, open_page, shot
from tests.waiting import wait_for

pytestmark = pytest.mark.slow

SELECTOR = ",".join(f"{k}={v}" for k, v in LABELS.items())
GATES = "max_error_rate=0.05,min_requests=5"
# Stage 1 passes its gates after a second; stage 2 bakes long enough to be watched, then is aborted.
STAGES = "active:50%:1s,active:100%:300s"

if TYPE_CHECKING:  # playwright may be missing: then conftest skips these tests
    from playwright.sync_api import Browser, Page


def _expect_text(page: Page, selector: str, pattern: str, timeout_s: float = 20) -> None:
    locator = page.locator(selector)
    wait_for(
        lambda: re.search(pattern, locator.inner_text() if locator.count() else ""),
        timeout_s,
        f"{selector} ~ {pattern}",
        0.1,
    )


def _wait_changed(page: Page, selector: str, what: str) -> None:
    locator = page.locator(selector)
    first = locator.inner_text()
    wait_for(lambda: locator.inner_text() != first, 15, what, 0.2)


def _start_rollout(fleet: Fleet, stages: str = STAGES) -> dict[str, Any]:
    body = {"model": MODEL, "to_version": 2, "selector": LABELS, "stages": stages, "gates": GATES}
    made = fleet.api("POST", "/v1/rollouts", body)
    assert made.status_code == 201, made.text
    return dict(made.json())


def _end(fleet: Fleet, rollout_id: str) -> None:
    """Abort it if it still runs, and wait for the fleet to be back on v1 (the next test starts from there)."""
    fleet.api("POST", f"/v1/rollouts/{rollout_id}/abort", {"reason": "test cleanup"})
    fleet.rig.wait_on_version(1, 60)


def _rollout_ids(fleet: Fleet) -> set[str]:
    return {r["id"] for r in fleet.api("GET", "/v1/rollouts").json()["rollouts"]}


@pytest.fixture
def viewer_token(fleet: Fleet) -> str:
    if "viewer" not in fleet.tokens:
        made = fleet.api("POST", "/v1/tokens", {"name": "dash-viewer", "role": "viewer"})
        if made.status_code == 404:
            pytest.skip("this cloud-sync has no /v1/tokens (roles come with the backend's change)")
        assert made.status_code == 201, made.text
        fleet.tokens["viewer"] = made.json()["token"]
    return fleet.tokens["viewer"]


@pytest.fixture
def running(fleet: Fleet) -> Iterator[dict[str, Any]]:
    """A rollout of v2 running in its first stage for the whole test (a long bake), aborted after."""
    made = _start_rollout(fleet, "active:50%:300s,active:100%")
    yield made
    _end(fleet, made["id"])


def test_sign_in_says_what_is_wrong_and_then_shows_the_fleet(browser: Browser, fleet: Fleet) -> None:
    context, page, console = open_page(browser, fleet)
    try:
        page.goto(f"{fleet.url}/")  # redirects to /dashboard/
        assert page.url.endswith("/dashboard/")
        page.get_by_role("button", name="Sign in").click()
        _expect_text(page, "#signin-error", "Enter an admin-API token")
        page.get_by_label("Token").fill("efa_not-a-token")
        page.get_by_role("button", name="Sign in").click()
        _expect_text(page, "#signin-error", "cloud-sync admin-token")  # the API's 401 message
        assert not page.locator("#nav").is_visible()
        shot(page, "signin-1280")
        page.get_by_label("Token").fill(fleet.token)
        page.get_by_role("button", name="Sign in").click()
        page.locator("#nav").wait_for(state="visible")
        _expect_text(page, "#who-name", "admin")
        _expect_text(page, "main .cards", rf"{fleet.rig.n}\s*devices")
        # The token stays in this tab only; signing out forgets it.
        assert page.evaluate("Object.keys(sessionStorage)") == ["edgefleet.dashboard.token"]
        assert page.evaluate("Object.keys(localStorage)") == []
        page.get_by_role("button", name="Sign out").click()
        page.get_by_label("Token").wait_for()
        assert page.evaluate("Object.keys(sessionStorage)") == []
        # Only the expected 401 of the wrong token reached the console.
        assert all("401" in e for e in console.errors), console.errors
    finally:
        context.close()


def test_a_rollout_created_in_the_ui_progresses_is_aborted_and_the_devices_go_back(
    browser: Browser, fleet: Fleet
) -> None:
    context, page, console = open_page(browser, fleet, fleet.token)
    try:
        page.goto(f"{fleet.url}/dashboard/#/rollouts")
        page.get_by_label("To version").fill("2")
        page.get_by_label("Devices").fill(SELECTOR)
        page.get_by_label("Stages").fill(STAGES)
        page.get_by_label("Gates").fill(GATES)
        page.get_by_role("button", name="Start rollout").click()
        page.wait_for_url(re.compile(r"#/rollout/ro-[0-9a-f]{10}$"))
        rollout_id = page.url.rsplit("/", 1)[1]
        _expect_text(page, "#rollout-state-badge", "running")
        _expect_text(page, "#rollout-stage", "stage 1/2")
        # Watch it progress: stage 1's gates pass after its bake, and the page shows stage 2 on its own.
        _expect_text(page, "#rollout-stage", "stage 2/2", 60)
        _expect_text(page, ".timeline", "advanced by (gate|controller)")
        _expect_text(page, "ol.stages", r"1\. active:50%:1s\s*\d+ devices · done")
        fleet.rig.wait_on_version(2, 60)
        shot(page, "rollout-running-1280")

        page.get_by_label("Reason").fill("seen enough in the browser test")
        page.get_by_role("button", name="Abort").click()
        _expect_text(page, "#rollout-state-badge", "aborted")
        _expect_text(page, ".timeline", "aborted by .*\n.*seen enough in the browser test")
        assert fleet.api("GET", f"/v1/rollouts/{rollout_id}").json()["state"] == "aborted"
        # The devices go back to v1, and the devices page shows it.
        fleet.rig.wait_on_version(1, 60)
        page.goto(f"{fleet.url}/dashboard/#/devices")
        rows = page.locator("main tbody tr")
        wait_for(
            lambda: (
                rows.count() == fleet.rig.n
                and all(
                    re.search(r"digits v1\s*active", rows.nth(i).inner_text()) and "v2" not in rows.nth(i).inner_text()
                    for i in range(rows.count())
                )
            ),
            30,
            "every device row showing digits v1 active alone",
            0.2,
        )
        # The abort from the page is in the audit log, by the token that signed in, with its reason.
        if fleet.api("GET", "/v1/audit").status_code != 404:
            page.goto(f"{fleet.url}/dashboard/#/audit")
            page.get_by_label("Action").fill("rollout.abort")
            page.get_by_role("button", name="Filter").click()
            _expect_text(
                page, "main tbody", rf"admin-token \(token\)\s+rollout.abort\s+rollout/{rollout_id}\s+seen enough"
            )
        assert console.errors == [], console.errors
    finally:
        context.close()


def test_a_viewer_is_offered_no_action_and_the_api_refuses_one(
    browser: Browser, fleet: Fleet, viewer_token: str, running: dict[str, Any]
) -> None:
    context, page, console = open_page(browser, fleet, viewer_token)
    try:
        page.goto(f"{fleet.url}/dashboard/#/rollout/{running['id']}")
        _expect_text(page, "#who-name", "viewer")
        _expect_text(page, "#rollout-state-badge", "running")
        shot(page, "rollout-viewer-1280")
        for name in (
            "#/rollout/" + running["id"],
            "#/rollouts",
            "#/policies",
            "#/models",
            f"#/device/{fleet.rig.ids[0]}",
        ):
            page.goto(f"{fleet.url}/dashboard/{name}")
            page.locator(f"main[data-page={name[2:].split('/')[0]}][aria-busy=false] h1").wait_for()
            buttons = [b.inner_text() for b in page.locator("main button").all()]
            # A viewer may filter and look things up; nothing that changes anything is offered.
            assert set(buttons) <= {"Compare", "Show effective policy", "Filter"}, (name, buttons)
            assert page.locator("main form#create, main form#policy-set").count() == 0
        refused = fleet.api("POST", f"/v1/rollouts/{running['id']}/abort", {"reason": "a viewer tries"}, viewer_token)
        assert refused.status_code == 403 and "operator" in refused.json()["detail"], refused.text
        assert fleet.api("GET", f"/v1/rollouts/{running['id']}").json()["state"] == "running"
        assert console.errors == [], console.errors
    finally:
        context.close()


def test_bad_input_in_every_form_gets_a_clear_message_and_changes_nothing(browser: Browser, fleet: Fleet) -> None:
    context, page, _ = open_page(browser, fleet, fleet.token)
    try:
        before = _rollout_ids(fleet)
        page.goto(f"{fleet.url}/dashboard/#/rollouts")
        form = page.locator("form#create")
        form.get_by_label("Devices").fill(SELECTOR)
        for fill, message in (
            ({"To version": ""}, "to_version: a version number"),
            ({"To version": "2", "Devices": "bench"}, 'selector: "bench" is not key=value'),
            ({"Devices": SELECTOR, "Shadow sample rate": "2"}, "shadow_sample_rate: a number from 0 to 1"),
            ({"Shadow sample rate": "0.1", "To version": "99"}, "digits:99 is not in the registry"),  # the API's 422
            ({"To version": "2", "Stages": "warp:10%"}, "stages"),  # the API's 422 names the field
            ({"Stages": STAGES, "Gates": "max_bogus=1"}, "gates"),
        ):
            for label, value in fill.items():
                form.get_by_label(label).fill(value)
            form.get_by_role("button", name="Start rollout").click()
            _expect_text(page, "#create-error", message)
        assert _rollout_ids(fleet) == before

        policies = fleet.api("GET", "/v1/policies").json()
        page.goto(f"{fleet.url}/dashboard/#/policies")
        policy = page.locator("form#policy-set")
        for fill, message in (
            ({"Name": ""}, "name: a policy name"),
            ({"Name": "dash-test", "Document (JSON)": "{not json"}, "document: not JSON"),
            ({"Document (JSON)": "[1]"}, "document: a JSON object"),
            ({"Document (JSON)": '{"inference": {"max_batch_size": 0}}'}, "max_batch_size"),  # the API's 422
            ({"Name": "Bad Name!", "Document (JSON)": "{}"}, "name"),
        ):
            for label, value in fill.items():
                policy.get_by_label(label).fill(value)
            policy.get_by_role("button", name="Save policy").click()
            _expect_text(page, "#policy-error", message)
        assert fleet.api("GET", "/v1/policies").json() == policies
        effective = page.locator("form#effective")
        effective.get_by_role("button", name="Show effective policy").click()
        _expect_text(page, "#effective-error", "device_id: enter a device id")
        effective.get_by_label("Device").fill("no-such-device")
        effective.get_by_role("button", name="Show effective policy").click()
        _expect_text(page, "#effective-error", "no-such-device")  # the API's 404 names it

        page.goto(f"{fleet.url}/dashboard/#/models")
        compare = page.locator("form#compare")
        compare.get_by_label("Window (s)").fill("0")
        compare.get_by_role("button", name="Compare").click()
        _expect_text(page, "#compare-error", "since_s")
        compare.get_by_label("Window (s)").fill("3600")
        compare.get_by_label("Devices").fill("site = lab")
        compare.get_by_role("button", name="Compare").click()
        _expect_text(page, "#compare-error", "selector")
        compare.get_by_label("Devices").fill(SELECTOR)  # now a good one: the figures side by side
        compare.get_by_label("Version A").select_option("digits:1")
        compare.get_by_label("Version B").select_option("digits:1")  # the one every device runs throughout
        compare.get_by_role("button", name="Compare").click()
        _expect_text(page, "form#compare ~ div table", r"p99 ms\s+4\s+4\s+1\u00d7")
        assert page.locator("#compare-error").inner_text() == ""
        shot(page, "models-compare-1280")

        page.goto(f"{fleet.url}/dashboard/#/devices")
        page.get_by_label("Labels").fill("bench")
        _expect_text(page, "main [role=alert]", 'selector: "bench" is not key=value')
    finally:
        context.close()


def test_tab_reaches_every_action_of_the_rollout_page_with_a_visible_focus(
    browser: Browser, fleet: Fleet, running: dict[str, Any]
) -> None:
    context, page, console = open_page(browser, fleet, fleet.token)
    try:
        page.goto(f"{fleet.url}/dashboard/#/rollout/{running['id']}")
        _expect_text(page, "#rollout-state-badge", "running")
        wanted = {"action-reason", "rollout-pause", "rollout-promote", "rollout-abort"}  # resume: only when paused
        assert page.locator("#rollout-resume").is_disabled()
        reached: set[str] = set()
        outlines: dict[str, str] = {}
        for _ in range(40):
            page.keyboard.press("Tab")
            focused = page.evaluate(
                "(() => { const e = document.activeElement; return [e.id, getComputedStyle(e).outlineStyle]; })()"
            )
            if focused[0]:
                reached.add(focused[0])
                outlines[focused[0]] = focused[1]
            if wanted <= reached:
                break
        assert wanted <= reached, f"Tab reached {sorted(reached)}"
        assert all(outlines[i] != "none" for i in wanted), outlines  # the focus ring shows
        # Enter on the focused button acts: pause from the keyboard.
        page.focus("#rollout-pause")
        page.keyboard.press("Enter")
        _expect_text(page, "#rollout-state-badge", "paused")
        assert console.errors == [], console.errors
    finally:
        context.close()


PAGES = ("overview", "devices", "device", "models", "rollouts", "rollout", "policies", "audit")


@pytest.mark.parametrize("viewport", [DESKTOP, PHONE], ids=["1280", "375"])
def test_every_page_loads_with_no_console_error(
    browser: Browser, fleet: Fleet, viewport: dict[str, int], running: dict[str, Any]
) -> None:
    fleet.api(
        "PUT",
        "/v1/policies/dash-demo",
        {"selector": LABELS, "priority": 5, "document": {"telemetry": {"interval_s": 0.5}}},
    )
    context, page, console = open_page(browser, fleet, fleet.token, viewport)
    try:
        for name in PAGES:
            arg = {"device": f"/{fleet.rig.ids[0]}", "rollout": f"/{running['id']}", "policies": f"/{fleet.rig.ids[0]}"}
            page.goto(f"{fleet.url}/dashboard/#/{name}{arg.get(name, '')}")
            page.locator(f"main[data-page={name}][aria-busy=false] h1").wait_for()
            if name == "overview":
                page.locator(".chart canvas").first.wait_for()
                _expect_text(page, "main", r"digits:1")
                if viewport == DESKTOP:  # the charts update on their own (a poll every 5 s)
                    _wait_changed(page, ".charts + p", "the charts to update")
            assert page.locator("#page-error").count() == 0, page.locator("#page-error").inner_text()
            shot(page, f"{name}-{viewport['width']}")
            # Nothing wider than the screen: wide tables scroll in their own box.
            width = page.evaluate("document.documentElement.scrollWidth")
            assert width <= viewport["width"], f"{name} is {width} px wide at {viewport['width']}"
        assert console.errors == [], console.errors
    finally:
        context.close()
