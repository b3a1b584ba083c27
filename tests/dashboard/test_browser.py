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
from tests.dashboard.browser import DESKTOP, PHONE, Console, Fleet, open_page, shot
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


# Every form that changes something: none of them is shown to a viewer.
CHANGING_FORMS = ", ".join(
    f"form#{f}" for f in ("create", "policy-set", "token-new", "enroll", "device-add", "assign-set", "sign-again")
)


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
        assert not page.locator("#nav a[href='#/tokens']").is_visible()  # the admin's page is not offered
        for name in (
            "#/rollout/" + running["id"],
            "#/rollouts",
            "#/policies",
            "#/models",
            "#/devices",
            f"#/device/{fleet.rig.ids[0]}",
            "#/results",
            "#/tokens",
        ):
            page.goto(f"{fleet.url}/dashboard/{name}")
            page.locator(f"main[data-page={name[2:].split('/')[0]}][aria-busy=false] h1").wait_for()
            buttons = [b.inner_text() for b in page.locator("main button").all()]
            # A viewer may filter and look things up; nothing that changes anything is offered.
            assert set(buttons) <= {"Compare", "Show effective policy", "Filter", "Show"}, (name, buttons)
            assert page.locator(f"main :is({CHANGING_FORMS})").count() == 0, name
        _expect_text(page, "main", "Tokens need the admin role; this token is viewer")
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
        page.locator("#filter-labels").fill("bench")
        _expect_text(page, "#filter-error", 'selector: "bench" is not key=value')
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


PAGES = ("overview", "devices", "device", "models", "rollouts", "rollout", "policies", "results", "audit", "tokens")


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


# What fleetctl can do the dashboard offers too, each to the role the API allows: API tokens and enrollment
# (admin), assignments and signing again (operator), results and quarantine (viewer).


def _submit(page: Page, form: str, button: str, fill: dict[str, str], error: str, message: str) -> None:
    """Fill the fields of `form` by label, press `button`, and wait for `message` in `error`."""
    located = page.locator(form)
    for label, value in fill.items():
        located.get_by_label(label).fill(value)
    located.get_by_role("button", name=button).click()
    try:
        _expect_text(page, error, message)
    except AssertionError:
        raise AssertionError(f"{error} says {page.locator(error).inner_text()!r}, not {message!r}") from None


def _token_for(fleet: Fleet, role: str) -> str:
    if role not in fleet.tokens:
        made = fleet.api("POST", "/v1/tokens", {"name": f"dash-{role}", "role": role})
        assert made.status_code == 201, made.text
        fleet.tokens[role] = made.json()["token"]
    return fleet.tokens[role]


def _unexpected(console: Console) -> list[str]:
    """The console's errors but the 4xx answers the bad inputs got on purpose (Chromium logs each one)."""
    return [e for e in console.errors if not re.search(r"Failed to load resource: .* status of 4\d\d", e)]


def _page_shown(page: Page, name: str) -> None:
    page.locator(f"main[data-page={name}][aria-busy=false] h1").wait_for()


def test_an_admin_makes_a_token_shown_once_and_revokes_it(browser: Browser, fleet: Fleet) -> None:
    context, page, console = open_page(browser, fleet, fleet.token)
    try:
        page.goto(f"{fleet.url}/dashboard/#/tokens")
        _page_shown(page, "tokens")
        assert page.locator("#nav a[href='#/tokens']").is_visible()
        before = fleet.api("GET", "/v1/tokens").json()
        for name, message in (
            ("", "name: a name for the token's holder"),
            ("Bad Name!", "name: String should match pattern"),  # the API's 422
            ("admin-token", "the bootstrap admin token's"),
        ):
            _submit(page, "form#token-new", "Create token", {"Name": name}, "#token-error", message)
        assert fleet.api("GET", "/v1/tokens").json() == before
        assert page.locator("#token-secret").count() == 0

        page.locator("form#token-new").get_by_label("Name").fill("dash-ops")
        page.locator("form#token-new").get_by_label("Role").select_option("operator")
        page.get_by_role("button", name="Create token").click()
        secret = page.locator("#token-secret")
        secret.wait_for()
        made = secret.input_value()
        assert re.fullmatch(r"efa_[A-Za-z0-9_-]{43}", made), made
        _expect_text(page, "#token-made", "copy it now")
        assert fleet.api("GET", "/v1/whoami", token=made).json() == {"name": "dash-ops", "role": "operator"}
        _expect_text(page, "main table", r"dash-ops\s+operator")
        shot(page, "tokens-created-1280")
        # The same name again: the API's 409, and the first token still works.
        _submit(page, "form#token-new", "Create token", {"Name": "dash-ops"}, "#token-error", "exists: revoke it first")

        page.get_by_role("button", name="Revoke token dash-ops").click()  # the confirm() is accepted
        _expect_text(page, "main table", r"dash-ops\s+operator.*\s+revoked")
        listed = {t["name"]: t for t in fleet.api("GET", "/v1/tokens").json()["tokens"]}
        assert listed["dash-ops"]["revoked_at_ms"] is not None
        assert fleet.api("GET", "/v1/whoami", token=made).status_code == 401
        assert _unexpected(console) == [], console.errors
    finally:
        context.close()


def test_an_admin_mints_an_enrollment_token_and_adds_a_device(browser: Browser, fleet: Fleet) -> None:
    context, page, console = open_page(browser, fleet, fleet.token)
    try:
        page.goto(f"{fleet.url}/dashboard/#/devices")
        _page_shown(page, "devices")
        minted = fleet.api("GET", "/v1/enrollment-tokens").json()["tokens"]
        for fill, message in (
            ({"Labels": "bench"}, 'labels: "bench" is not key=value'),
            ({"Labels": "site=dash", "Expires in": "soon"}, "expires: a number with s, m, h or d"),
            ({"Expires in": "10s"}, "expires_in_s"),  # the API's 422: 60 s at least
            ({"Expires in": "1h", "Device id": "Bad Id!"}, "Bad Id!"),  # the API's 422 names the id
        ):
            _submit(page, "form#enroll", "Mint enrollment token", fill, "#enroll-error", message)
        assert fleet.api("GET", "/v1/enrollment-tokens").json()["tokens"] == minted

        _submit(
            page, "form#enroll", "Mint enrollment token", {"Device id": "dash-enrolled"}, "#enroll-made", "copy it now"
        )
        token = page.locator("#enroll-secret").input_value()
        assert token.startswith("efe_"), token
        _expect_text(page, "#enroll-command", rf"edge-agent enroll --url HOST:PORT --token {re.escape(token)}")
        now = fleet.api("GET", "/v1/enrollment-tokens").json()["tokens"]
        assert len(now) == len(minted) + 1
        assert (now[0]["device_id"], now[0]["labels"], now[0]["state"]) == ("dash-enrolled", {"site": "dash"}, "unused")
        _expect_text(page, "#enrollment-list", rf"{now[0]['token_id']}\s+unused\s+dash-enrolled")
        shot(page, "devices-enroll-1280")

        devices = {d["device_id"] for d in fleet.api("GET", "/v1/devices").json()["devices"]}
        for fill, message in (
            ({"Device id": ""}, "device_id: the new device's id"),
            ({"Device id": "dash added"}, "dash added"),  # the API's 422
            ({"Device id": fleet.rig.ids[0]}, fleet.rig.ids[0]),  # the API's 409: the id is taken
        ):
            _submit(page, "form#device-add", "Add device", fill, "#add-device-error", message)
        assert {d["device_id"] for d in fleet.api("GET", "/v1/devices").json()["devices"]} == devices
        add = page.locator("form#device-add")
        add.get_by_label("Labels").fill("site=dash")
        _submit(page, "form#device-add", "Add device", {"Device id": "dash-added"}, "#add-device-made", "copy it now")
        device_token = page.locator("#device-secret").input_value()
        added = fleet.api("GET", "/v1/devices/dash-added")
        assert added.status_code == 200 and added.json()["labels"] == {"site": "dash"}, added.text
        fleet.tokens["device:dash-added"] = device_token
        assert _unexpected(console) == [], console.errors
    finally:
        context.close()


def test_an_operator_assigns_unassigns_and_signs_again_but_is_offered_no_admin_page(
    browser: Browser, fleet: Fleet
) -> None:
    operator = _token_for(fleet, "operator")
    context, page, console = open_page(browser, fleet, operator)
    try:
        page.goto(f"{fleet.url}/dashboard/#/devices")
        _page_shown(page, "devices")
        _expect_text(page, "#who-name", "operator")
        assert not page.locator("#nav a[href='#/tokens']").is_visible()
        assert page.locator("main form#enroll, main form#device-add").count() == 0
        page.goto(f"{fleet.url}/dashboard/#/tokens")
        _page_shown(page, "tokens")
        _expect_text(page, "main", "Tokens need the admin role; this token is operator")

        page.goto(f"{fleet.url}/dashboard/#/models")
        _page_shown(page, "models")
        assignments = fleet.api("GET", "/v1/assignments").json()
        for fill, message in (
            ({"Version": ""}, "version: a version number"),
            ({"Version": "2", "Devices": "nowhere"}, 'selector: "nowhere" is not key=value'),
            ({"Devices": "site=nowhere", "Priority": "1.5"}, "priority: a whole number"),
            ({"Priority": "3", "Version": "99"}, "99"),  # the API's 422: not in the registry
        ):
            _submit(page, "form#assign-set", "Assign", fill, "#assign-error", message)
        assert fleet.api("GET", "/v1/assignments").json() == assignments
        _submit(
            page, "form#assign-set", "Assign", {"Version": "2"}, "#assign-saved", "Assigned digits v2 to site=nowhere"
        )
        made = [
            a for a in fleet.api("GET", "/v1/assignments").json()["assignments"] if a["selector"] == {"site": "nowhere"}
        ]
        assert [(a["model"], a["version"], a["priority"]) for a in made] == [(MODEL, 2, 3)]
        _expect_text(page, "#assignment-list", r"digits\s+v2\s+site=nowhere\s+3")
        shot(page, "models-operator-1280")
        page.get_by_role("button", name="Unassign digits from site=nowhere").click()
        wait_for(lambda: fleet.api("GET", "/v1/assignments").json() == assignments, 10, "the assignment removed", 0.1)
        _expect_text(page, "#assignment-list", r"^(?![\s\S]*site=nowhere)")

        def serial() -> int:
            return int(fleet.api("GET", f"/v1/models/{MODEL}/2").json()["serial"])

        first = serial()
        page.locator("form#sign-again").get_by_label("Version").select_option(f"{MODEL}:2")
        for expires, message in (("soon", "expires: a number with s, m, h or d"), ("10s", "expires_in_s")):
            _submit(page, "form#sign-again", "Sign again", {"Expires in": expires}, "#sign-error", message)
        assert serial() == first
        _submit(page, "form#sign-again", "Sign again", {"Expires in": "60d"}, "#sign-saved", rf"Signed {MODEL}:2 again")
        assert serial() > first
        _expect_text(page, "#sign-saved", rf"serial {serial()}")
        assert _unexpected(console) == [], console.errors
    finally:
        context.close()


def test_a_viewer_reads_the_results_and_a_device_s_quarantine(
    browser: Browser, fleet: Fleet, viewer_token: str
) -> None:
    import grpc

    from edgefleet.proto.edgefleet.v1 import services_pb2_grpc
    from tests.cloud_sync.conftest import batch, digits_payload, record

    device_id = "dash-results"
    added = fleet.api("POST", "/v1/devices", {"device_id": device_id, "labels": {"site": "dash"}})
    assert added.status_code == 201, added.text
    good = [record(seq, payload=digits_payload([0.05, 0.05, 0.7, 0.2], f"req-{seq}")) for seq in (1, 2)]
    unknown = record(3, kind=99)  # a kind cloud-sync does not know: quarantined, not stored
    target = fleet.rig.cloud.find("cloud_sync.ready")["grpc"]
    with grpc.insecure_channel(target) as channel:
        stub = services_pb2_grpc.UplinkStub(channel)
        metadata = [("authorization", f"Bearer {added.json()['token']}")]
        ack = stub.Upload(iter([batch(0, 3, records=[*good, unknown])]), metadata=metadata, timeout=10)
    assert ack.acked_seq == 3, ack

    context, page, console = open_page(browser, fleet, viewer_token)
    try:
        page.goto(f"{fleet.url}/dashboard/#/results")
        _page_shown(page, "results")
        for fill, message in (
            ({"Device": "no-such-device"}, "no-such-device"),
            ({"Device": "", "Start with the newest": "-1"}, "last:"),
        ):
            _submit(page, "form#results-filter", "Show", fill, "#results-error", message)
        _submit(
            page,
            "form#results-filter",
            "Show",
            {"Device": device_id, "Start with the newest": "20"},
            "#results-rows",
            "#2",
        )
        rows = page.locator("#results-rows tr")
        assert rows.count() == 2
        first = rows.nth(0).inner_text()
        assert re.search(rf"{device_id}\s+#1\s+digits:1\s+result\s+probabilities: argmax 2 \(0\.700\)", first), first
        _expect_text(page, "main", f"2 results of {device_id}")
        shot(page, "results-device-1280")

        page.goto(f"{fleet.url}/dashboard/#/device/{device_id}")
        _page_shown(page, "device")
        _expect_text(page, "#quarantine", r"#3\s+cloud\s+.*\d+ B\s+\S")
        shot(page, "device-quarantine-1280")
        assert _unexpected(console) == [], console.errors
    finally:
        context.close()
