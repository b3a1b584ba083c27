"""GET /v1/models/compare and `fleetctl models compare`: two versions' five figures on the same devices."""

from __future__ import annotations

import itertools
import json

import pytest

from cloud_sync.store import Database
from tests.cloud_sync.conftest import RunningCloudSync
from tests.cloud_sync.rollouts_api.conftest import send_windows, window
from tests.cloud_sync.test_fleetctl import failed, fleetctl, ok

_numbers = itertools.count(1)


def _fleet(cloud_sync: RunningCloudSync, cloud_db: Database) -> tuple[str, str]:
    """Two devices of a group of their own running model v1 and v2 side by side, and one outside the group;
    (group, model name)."""
    group = f"cmp{next(_numbers)}"
    name = f"digits-{group}"
    first, _ = cloud_sync.new_device(labels={"cmp": group})
    second, _ = cloud_sync.new_device(labels={"cmp": group})
    outside, _ = cloud_sync.new_device(labels={"cmp": f"{group}-other"})
    for device_id in (first, second):
        send_windows(
            cloud_db,
            device_id,
            [
                window(name, 1, requests=100, errors=1, p50_ms=1, p95_ms=2, p99_ms=4, cpu_seconds=0.5),
                window(
                    name, 2, requests=100, errors=4, p50_ms=2, p95_ms=4, p99_ms=8, cpu_seconds=1.0, energy_joules=20.0
                ),
            ],
        )
    # A device the selector leaves out: were it counted, every figure would change.
    send_windows(cloud_db, outside, [window(name, 1, requests=1000, errors=1000, p99_ms=500, cpu_seconds=90)])
    return group, name


def test_compare_gives_each_versions_figures_on_the_selected_devices_and_b_relative_to_a(
    cloud_sync: RunningCloudSync, cloud_db: Database
) -> None:
    group, name = _fleet(cloud_sync, cloud_db)
    response = cloud_sync.api.get(
        "/v1/models/compare", params={"a": f"{name}:1", "b": f"{name}:2", "selector": f"cmp={group}"}
    )
    assert response.status_code == 200, response.text
    found = response.json()
    assert (found["selector"], found["devices_selected"], found["since_s"]) == ({"cmp": group}, 2, 3600)
    a, b = found["a"], found["b"]
    assert (a["version"], a["devices"], a["requests"], a["errors"]) == (1, 2, 200, 2)
    assert (b["version"], b["devices"], b["requests"], b["errors"]) == (2, 2, 200, 8)
    assert (a["p50_ms"], a["p95_ms"], a["p99_ms"]) == pytest.approx((1, 2, 4))
    assert (b["p50_ms"], b["p95_ms"], b["p99_ms"]) == pytest.approx((2, 4, 8))
    assert a["error_rate"] == pytest.approx(0.01) and b["error_rate"] == pytest.approx(0.04)
    # 100 requests in a 10 s window on each of two devices.
    assert a["requests_per_s"] == pytest.approx(20) and b["requests_per_s"] == pytest.approx(20)
    assert a["cpu_seconds_per_inference"] == pytest.approx(0.005)
    assert b["cpu_seconds_per_inference"] == pytest.approx(0.01)
    # Energy only where it was reported.
    assert a["joules_per_inference"] is None and b["joules_per_inference"] == pytest.approx(0.2)
    relative = found["relative"]
    assert relative["p99_ms"] == pytest.approx(2) and relative["error_rate"] == pytest.approx(4)
    assert relative["cpu_seconds_per_inference"] == pytest.approx(2) and relative["requests_per_s"] == pytest.approx(1)
    assert relative["joules_per_inference"] is None

    # Without a selector every device counts, the outside one included.
    everyone = cloud_sync.api.get("/v1/models/compare", params={"a": f"{name}:1", "b": f"{name}:2"}).json()
    assert everyone["a"]["requests"] == 1200 and everyone["a"]["devices"] == 3


def test_a_version_without_telemetry_compares_as_zeros_with_no_ratio(
    cloud_sync: RunningCloudSync, cloud_db: Database
) -> None:
    group, name = _fleet(cloud_sync, cloud_db)
    found = cloud_sync.api.get(
        "/v1/models/compare", params={"a": f"{name}:1", "b": f"{name}:9", "selector": f"cmp={group}"}
    ).json()
    assert (found["b"]["devices"], found["b"]["requests"], found["b"]["p99_ms"]) == (0, 0, 0.0)
    assert all(ratio is None for ratio in found["relative"].values())


@pytest.mark.parametrize(
    ("params", "says"),
    [
        ({"b": "digits:2"}, "a"),
        ({"a": "digits", "b": "digits:2"}, "a: 'digits' is not name:version"),
        ({"a": "digits:1", "b": "Not A Name:2"}, "b: model name"),
        ({"a": "digits:1", "b": "digits:0"}, "b: model version"),
        ({"a": "digits:1", "b": "digits:-2"}, "b: 'digits:-2' is not name:version"),
        ({"a": "digits:1", "b": "digits:2", "selector": "site"}, "selector: selector term 'site' is not key=value"),
        # The schema's form (format_selector's): what parse_selector would strip is refused, not guessed.
        ({"a": "digits:1", "b": "digits:2", "selector": "site = lab"}, "selector: write it as 'site=lab'"),
        ({"a": "digits:1", "b": "digits:2", "since_s": 0}, "since_s"),
        ({"a": "digits:1", "b": "digits:2", "since_s": 10**9}, "since_s"),
        ({"a": "digits:1", "b": "digits:2", "since_s": "1h"}, "since_s"),
    ],
)
def test_bad_input_is_a_422_naming_the_field(
    cloud_sync: RunningCloudSync, params: dict[str, str | int], says: str
) -> None:
    response = cloud_sync.api.get("/v1/models/compare", params=params)
    assert response.status_code == 422, response.text
    assert says in response.text


def test_the_api_needs_the_admin_token(cloud_sync: RunningCloudSync) -> None:
    response = cloud_sync.api.get(
        "/v1/models/compare", params={"a": "digits:1", "b": "digits:2"}, headers={"Authorization": "Bearer nope"}
    )
    assert response.status_code == 401


def test_fleetctl_models_compare_prints_b_relative_to_a(cloud_sync: RunningCloudSync, cloud_db: Database) -> None:
    group, name = _fleet(cloud_sync, cloud_db)
    printed = ok(
        fleetctl(
            cloud_sync, "models", "compare", f"{name}:1", f"{name}:2", "--selector", f"cmp={group}", "--since", "2h"
        )
    )
    assert f"{name}:1 vs {name}:2 on cmp={group} (2 devices), the last 7200 s" in printed
    rows = {
        line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:5]]
        for line in printed.splitlines()
        if line.count("│") >= 5
    }
    assert rows["latency p99 (ms)"] == ["4", "8", "2.00x"]
    assert rows["error rate"] == ["1.00%", "4.00%", "4.00x"]
    assert rows["joules / inference"] == ["-", "0.2", "-"]
    assert rows["devices reporting"] == ["2", "2", "1.00x"] or rows["devices reporting"][:2] == ["2", "2"]

    shown = json.loads(
        ok(fleetctl(cloud_sync, "--json", "models", "compare", f"{name}:1", f"{name}:2", "--selector", f"cmp={group}"))
    )
    assert shown["relative"]["p99_ms"] == pytest.approx(2) and shown["devices_selected"] == 2


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["digits", "digits:2"], "A 'digits' is not name:version"),
        (["digits:1", "digits:x"], "B 'digits:x' is not name:version"),
        (["digits:1", "digits:2", "--since", "0s"], "--since '0s'"),
        (["digits:1", "digits:2", "--since", "forever"], "--since 'forever'"),
        (["digits:1", "digits:2", "--selector", "site"], "selector term 'site' is not key=value"),
        (["BAD:1", "digits:2"], "a: model name"),
    ],
)
def test_fleetctl_models_compare_bad_input_exits_2(cloud_sync: RunningCloudSync, args: list[str], says: str) -> None:
    assert says in failed(fleetctl(cloud_sync, "models", "compare", *args), 2)


def test_fleetctl_models_series_prints_each_version_over_time(cloud_sync: RunningCloudSync, cloud_db: Database) -> None:
    group, name = _fleet(cloud_sync, cloud_db)
    printed = ok(fleetctl(cloud_sync, "models", "series", name, "--selector", f"cmp={group}", "--step", "1h"))
    rows = [[c.strip() for c in line.split("│")[1:-1]] for line in printed.splitlines() if f"│ {name}:" in line]
    # One step holds both windows of each version; the device outside the selector is left out.
    assert [(r[0], r[2], r[3], r[5]) for r in rows] == [
        (f"{name}:1", "1", "4", "1.00%"),
        (f"{name}:2", "2", "8", "4.00%"),
    ]
    shown = json.loads(ok(fleetctl(cloud_sync, "models", "series", name, "--selector", f"cmp={group}", "--json")))
    assert [v["version"] for v in shown["versions"]] == [1, 2] and shown["step_s"] == 60
    assert "no telemetry of nothing-here" in ok(fleetctl(cloud_sync, "models", "series", "nothing-here"))


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["digits", "--step", "5s"], "--step '5s'"),
        (["digits", "--since", "30s"], "--since '30s'"),
        (["digits", "--since", "8d"], "--since '8d'"),
        (["digits", "--selector", "site"], "selector term 'site' is not key=value"),
        (["BAD"], "model"),
    ],
)
def test_fleetctl_models_series_bad_input_exits_2(cloud_sync: RunningCloudSync, args: list[str], says: str) -> None:
    assert says in failed(fleetctl(cloud_sync, "models", "series", *args), 2)
