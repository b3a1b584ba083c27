"""`fleetctl devices token create | list` as a real process against a real cloud-sync."""

from __future__ import annotations

import json

import pytest

from cloud_sync.errors import InvalidArgument
from cloud_sync.fleetctl_enrollment import parse_duration
from edgefleet.proto.edgefleet.v1 import services_pb2, services_pb2_grpc
from tests.cloud_sync.conftest import RunningCloudSync
from tests.cloud_sync.test_fleetctl import failed, fleetctl, ok


def test_token_create_prints_a_token_that_enrols(cloud_sync: RunningCloudSync) -> None:
    token = ok(fleetctl(cloud_sync, "devices", "token", "create", "--labels", "site=lab,cam=front")).strip()
    assert token.startswith("efe_") and "\n" not in token
    stub = services_pb2_grpc.EnrollmentStub(cloud_sync.channel)
    response = stub.Enroll(services_pb2.EnrollRequest(token=token), timeout=10)
    assert dict(response.labels) == {"site": "lab", "cam": "front"}


def test_token_create_json_with_a_device_id_and_expiry(cloud_sync: RunningCloudSync) -> None:
    created = json.loads(
        ok(
            fleetctl(
                cloud_sync, "--json", "devices", "token", "create", "--expires", "2h", "--device-id", "ctl-token-1"
            )
        )
    )
    assert created["device_id"] == "ctl-token-1" and created["token"].startswith("efe_")
    listed = json.loads(ok(fleetctl(cloud_sync, "--json", "devices", "token", "list")))
    assert any(t["device_id"] == "ctl-token-1" and t["state"] == "unused" for t in listed)
    assert created["token"] not in json.dumps(listed)


def test_token_list_shows_the_state(cloud_sync: RunningCloudSync) -> None:
    ok(fleetctl(cloud_sync, "devices", "token", "create", "--labels", "listed=yes"))
    text = ok(fleetctl(cloud_sync, "devices", "token", "list"))
    assert "listed=yes" in text and "unused" in text


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--expires", "forever"], "not a duration"),
        (["--expires", "10s"], "expires_in_s"),
        (["--expires", "31d"], "expires_in_s"),
        (["--labels", "site"], "key=value"),
        (["--device-id", "cloud-sync-2"], "reserved"),
    ],
)
def test_bad_input_exits_2_with_the_reason(cloud_sync: RunningCloudSync, args: list[str], message: str) -> None:
    assert message in failed(fleetctl(cloud_sync, "devices", "token", "create", *args), 2)


@pytest.mark.parametrize(("text", "seconds"), [("90", 90), ("90s", 90), ("15m", 900), ("24h", 86400), ("30d", 2592000)])
def test_durations(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "h", "1.5h", "-1h", "3w", "1 2h"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(InvalidArgument, match="not a duration"):
        parse_duration(text)
