"""fleetctl tokens, whoami and audit as real processes against the session's cloud-sync: a token made and
used through fleetctl, each change it makes one audit record under its name; bad input exits 2, changing
nothing.
"""

from __future__ import annotations

import itertools
import json

import pytest

from tests.cloud_sync.conftest import RunningCloudSync
from tests.cloud_sync.roles.conftest import audit, client, new_token
from tests.cloud_sync.test_fleetctl import environment, failed, fleetctl, ok

_numbers = itertools.count(1)


def _name(prefix: str) -> str:
    return f"{prefix}-{next(_numbers)}"


@pytest.mark.slow  # ten fleetctl processes: ~6 s on a loaded machine
def test_a_token_made_with_fleetctl_acts_under_its_name_and_is_revoked(cloud_sync: RunningCloudSync) -> None:
    name = _name("fc-admin")
    token = ok(fleetctl(cloud_sync, "tokens", "create", "--name", name, "--role", "admin")).strip()
    assert token.startswith("efa_") and "\n" not in token
    as_it = environment(cloud_sync, FLEETCTL_TOKEN=token)
    assert ok(fleetctl(cloud_sync, "whoami", env=as_it)).strip() == f"{name} admin"
    assert json.loads(ok(fleetctl(cloud_sync, "whoami", "--json", env=as_it))) == {"name": name, "role": "admin"}

    ok(fleetctl(cloud_sync, "devices", "add", f"{name}-cam", "--labels", "site=fc", env=as_it))
    viewer = _name("fc-viewer")
    made = json.loads(
        ok(fleetctl(cloud_sync, "tokens", "create", "--name", viewer, "--role", "viewer", "--json", env=as_it))
    )
    assert (made["name"], made["role"]) == (viewer, "viewer") and made["token"].startswith("efa_")
    listed = json.loads(ok(fleetctl(cloud_sync, "tokens", "list", "--json")))
    assert {(t["name"], t["created_by"]) for t in listed} >= {(name, "admin-token"), (viewer, name)}
    table = ok(fleetctl(cloud_sync, "tokens", "list"))
    assert viewer in table and "viewer" in table
    assert f"revoked token {viewer} (viewer)" in ok(fleetctl(cloud_sync, "tokens", "revoke", viewer, env=as_it))

    records = audit(cloud_sync, actor=name)
    assert [(r["action"], r["target"]) for r in records] == [
        ("token.revoke", f"token/{viewer}"),
        ("token.create", f"token/{viewer}"),
        ("device.add", f"device/{name}-cam"),
    ]
    assert records[2]["after"] == {"device_id": f"{name}-cam", "labels": {"site": "fc"}}

    # Revoked: refused at once (exit 3).
    ok(fleetctl(cloud_sync, "tokens", "revoke", name))
    assert "cloud-sync refused (401)" in failed(fleetctl(cloud_sync, "whoami", env=as_it), 3)


def test_fleetctl_audit_shows_the_records_filtered(cloud_sync: RunningCloudSync) -> None:
    name, token = new_token(cloud_sync, "admin", "fc-audit")
    with client(cloud_sync, token) as admin:
        assert admin.post("/v1/devices", json={"device_id": f"{name}-cam"}).status_code == 201
        assert admin.post(f"/v1/devices/{name}-cam/revoke").status_code == 200
    records = audit(cloud_sync, actor=name)
    shown = json.loads(ok(fleetctl(cloud_sync, "audit", "--actor", name, "--json")))
    assert shown == records and [r["action"] for r in shown] == ["device.revoke", "device.add"]
    one = json.loads(ok(fleetctl(cloud_sync, "audit", "--actor", name, "--action", "device.add", "--json")))
    assert [r["target"] for r in one] == [f"device/{name}-cam"]
    target = f"device/{name}-cam"
    by_target = json.loads(ok(fleetctl(cloud_sync, "audit", "--target", target, "--limit", "1", "--json")))
    assert [r["action"] for r in by_target] == ["device.revoke"]
    lines = ok(fleetctl(cloud_sync, "audit", "--since", "1h", "--actor", name)).splitlines()
    assert len(lines) == 2
    assert f"  {name}  device.revoke  {target}  " in lines[0] and '"revoked":true' in lines[0]
    assert f"  {name}  device.add  {target}  - -> " in lines[1]


def test_a_viewer_is_refused_a_change_with_exit_3_naming_the_role(cloud_sync: RunningCloudSync) -> None:
    name = _name("fc-viewer")
    token = ok(fleetctl(cloud_sync, "tokens", "create", "--name", name, "--role", "viewer")).strip()
    as_viewer = environment(cloud_sync, FLEETCTL_TOKEN=token)
    message = failed(
        fleetctl(cloud_sync, "tokens", "create", "--name", f"{name}-x", "--role", "admin", env=as_viewer), 3
    )
    assert "this call needs the admin role; the token is viewer" in message
    assert "needs the admin role" in failed(fleetctl(cloud_sync, "tokens", "list", env=as_viewer), 3)
    assert json.loads(ok(fleetctl(cloud_sync, "audit", "--limit", "1", "--json", env=as_viewer)))
    assert audit(cloud_sync, actor=name) == []


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (("tokens", "create", "--name", "ok-name", "--role", "root"), 2, "'root' is not one of"),
        (("tokens", "create", "--role", "viewer"), 2, "Missing option '--name'"),
        (("tokens", "create", "--name", "bad name", "--role", "viewer"), 2, "name:"),
        (("tokens", "create", "--name", "admin-token", "--role", "admin"), 2, "bootstrap admin token"),
        (("tokens", "revoke", "nobody-has-this"), 4, "no token named 'nobody-has-this'"),
        (("tokens", "revoke", "admin-token"), 2, "bootstrap admin token"),
        (("audit", "--limit", "0"), 2, "--limit 0: a number of records from 1 to 1000"),
        (("audit", "--limit", "1001"), 2, "--limit 1001"),
        (("audit", "--since", "yesterday"), 2, "--since: 'yesterday' is not a duration"),
        (("audit", "--actor", " "), 2, "--actor: give a value"),
        (("audit", "--target", "x" * 300), 2, "target:"),
    ],
)
def test_bad_input_exits_2_and_changes_nothing(
    cloud_sync: RunningCloudSync, args: tuple[str, ...], code: int, message: str
) -> None:
    before = (cloud_sync.api.get("/v1/tokens").json(), audit(cloud_sync, limit=5))
    assert message in failed(fleetctl(cloud_sync, *args), code)
    assert (cloud_sync.api.get("/v1/tokens").json(), audit(cloud_sync, limit=5)) == before


def test_a_taken_name_exits_2(cloud_sync: RunningCloudSync) -> None:
    name = _name("fc-taken")
    ok(fleetctl(cloud_sync, "tokens", "create", "--name", name, "--role", "viewer"))
    records = audit(cloud_sync, target=f"token/{name}")
    assert "revoke it first" in failed(fleetctl(cloud_sync, "tokens", "create", "--name", name, "--role", "admin"), 2)
    assert audit(cloud_sync, target=f"token/{name}") == records
