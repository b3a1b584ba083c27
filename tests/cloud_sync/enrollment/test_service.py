"""Enrollment through a real `cloud-sync run`: tokens minted over the admin API, redeemed over gRPC.

What a device gets (id, a working credential, the fleet key, the endpoints, its labels); a token used twice
or never minted, and every kind of bad input to the new endpoints and the RPC, refused with a reason and
changing nothing; a revoked device's credential refused.
"""

from __future__ import annotations

from typing import Any

import grpc
import httpx
import pytest

from edgefleet.proto.edgefleet.v1 import services_pb2, services_pb2_grpc, state_pb2
from tests.cloud_sync.conftest import RunningCloudSync, batch

ENROLL_METHOD = "/edgefleet.v1.Enrollment/Enroll"


def mint(cloud_sync: RunningCloudSync, **body: Any) -> dict[str, Any]:
    response = cloud_sync.api.post("/v1/enrollment-tokens", json=body)
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


def enroll(cloud_sync: RunningCloudSync, token: str, hostname: str = "jetson") -> services_pb2.EnrollResponse:
    stub = services_pb2_grpc.EnrollmentStub(cloud_sync.channel)
    request = services_pb2.EnrollRequest(token=token, agent=state_pb2.AgentInfo(hostname=hostname))
    response: services_pb2.EnrollResponse = stub.Enroll(request, timeout=10)
    return response


def refused(cloud_sync: RunningCloudSync, request: services_pb2.EnrollRequest) -> grpc.RpcError:
    stub = services_pb2_grpc.EnrollmentStub(cloud_sync.channel)
    with pytest.raises(grpc.RpcError) as caught:
        stub.Enroll(request, timeout=10)
    return caught.value


def device_count(cloud_sync: RunningCloudSync) -> int:
    return len(cloud_sync.api.get("/v1/devices").json()["devices"])


def test_a_device_enrolls_and_its_credential_uploads(cloud_sync: RunningCloudSync) -> None:
    created = mint(cloud_sync, labels={"site": "lab", "cam": "front"}, expires_in_s=600)
    assert created["token"].startswith("efe_") and created["labels"] == {"site": "lab", "cam": "front"}
    response = enroll(cloud_sync, created["token"], hostname="jetson-enroll-1")
    assert response.device_id.startswith("jetson-enroll-1-")
    assert dict(response.labels) == {"site": "lab", "cam": "front"}
    assert response.endpoints.grpc_target == cloud_sync.grpc_target
    assert response.endpoints.mqtt_url == ""  # no broker: control over the gRPC stream
    assert response.endpoints.topic_prefix == "edgefleet/v1"
    fleet_key = cloud_sync.api.get("/v1/fleet/signing-key").json()
    assert response.signing_public_key.hex() == fleet_key["public_key"]
    assert cloud_sync.upload(response.device_token, [batch(0, 2)]).acked_seq == 2
    assert cloud_sync.device(response.device_id)["labels"] == {"site": "lab", "cam": "front"}


def test_a_token_enrols_one_device_only(cloud_sync: RunningCloudSync) -> None:
    token = mint(cloud_sync)["token"]
    enroll(cloud_sync, token)
    before = device_count(cloud_sync)
    error = refused(cloud_sync, services_pb2.EnrollRequest(token=token))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "used already" in error.details() and "fleetctl devices token create" in error.details()
    assert device_count(cloud_sync) == before


def test_a_token_never_minted_is_refused(cloud_sync: RunningCloudSync) -> None:
    error = refused(cloud_sync, services_pb2.EnrollRequest(token="efe_" + "A" * 43))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "not one cloud-sync minted" in error.details()


def test_a_pre_chosen_device_id(cloud_sync: RunningCloudSync) -> None:
    token = mint(cloud_sync, device_id="enroll-chosen-1", expires_in_s=60)["token"]
    assert enroll(cloud_sync, token).device_id == "enroll-chosen-1"


def test_a_revoked_enrolled_device_is_cut_off(cloud_sync: RunningCloudSync) -> None:
    response = enroll(cloud_sync, mint(cloud_sync)["token"])
    assert cloud_sync.api.post(f"/v1/devices/{response.device_id}/revoke").status_code == 200
    stub = services_pb2_grpc.UplinkStub(cloud_sync.channel)
    # The authenticator's cache (AUTH_CACHE_S) never saw this token: refused at once.
    with pytest.raises(grpc.RpcError) as caught:
        stub.Upload(iter([batch(0, 1)]), metadata=[("authorization", f"Bearer {response.device_token}")], timeout=10)
    assert caught.value.code() in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED)


@pytest.mark.parametrize(
    ("request_fields", "match"),
    [
        ({"token": ""}, "token: the one-time enrollment token is missing"),
        ({"token": "efe_" + "x" * 200}, "token: at most 128"),
        ({"token": "efe_a\nb"}, "token: at most 128 printable"),
        ({"token": "efe_x", "agent": state_pb2.AgentInfo(hostname="h" * 300)}, "agent.hostname"),
        ({"token": "efe_x", "agent": state_pb2.AgentInfo(gpu="a\x1bb")}, "agent.gpu"),
        ({"token": "efe_x", "agent": state_pb2.AgentInfo(providers=["p"] * 40)}, "agent.providers"),
        ({"token": "efe_x", "csr_pem": b"-----BEGIN CERTIFICATE REQUEST-----"}, "csr_pem"),
    ],
)
def test_a_bad_request_is_invalid_and_uses_no_token(
    cloud_sync: RunningCloudSync, request_fields: dict[str, Any], match: str
) -> None:
    error = refused(cloud_sync, services_pb2.EnrollRequest(**request_fields))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert match in error.details()


def test_a_bad_request_leaves_a_real_token_unused(cloud_sync: RunningCloudSync) -> None:
    token = mint(cloud_sync)["token"]
    error = refused(cloud_sync, services_pb2.EnrollRequest(token=token, csr_pem=b"x"))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert enroll(cloud_sync, token).device_id


def test_a_message_that_does_not_parse_is_invalid(cloud_sync: RunningCloudSync) -> None:
    call = cloud_sync.channel.unary_unary(ENROLL_METHOD)
    with pytest.raises(grpc.RpcError) as caught:
        call(b"\xff\xff\xff", timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "EnrollRequest" in caught.value.details()


def test_tokens_are_listed_without_their_secret(cloud_sync: RunningCloudSync) -> None:
    created = mint(cloud_sync, labels={"list": "me"})
    enroll(cloud_sync, created["token"])
    mint(cloud_sync, labels={"list": "me-too"})
    response = cloud_sync.api.get("/v1/enrollment-tokens")
    assert response.status_code == 200
    assert created["token"] not in response.text and created["token"][4:] not in response.text
    states = {t["labels"].get("list"): t["state"] for t in response.json()["tokens"]}
    assert states["me"] == "used" and states["me-too"] == "unused"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"expires_in_s": 59}, "expires_in_s"),
        ({"expires_in_s": 31 * 86400}, "expires_in_s"),
        ({"expires_in_s": "3600"}, "expires_in_s"),
        ({"labels": {"bad key": "x"}}, None),
        ({"labels": ["site=lab"]}, "labels"),
        ({"device_id": "cloud-sync-1"}, None),
        ({"device_id": ""}, "device_id"),
        ({"unknown": 1}, "unknown"),
    ],
)
def test_bad_token_requests_are_422_naming_the_problem_and_mint_nothing(
    cloud_sync: RunningCloudSync, body: dict[str, Any], field: str | None
) -> None:
    before = len(cloud_sync.api.get("/v1/enrollment-tokens").json()["tokens"])
    response = cloud_sync.api.post("/v1/enrollment-tokens", json=body)
    assert response.status_code == 422, response.text
    if field is not None:
        assert field in response.text
    assert len(cloud_sync.api.get("/v1/enrollment-tokens").json()["tokens"]) == before


def test_the_token_routes_need_the_admin_token(cloud_sync: RunningCloudSync) -> None:
    for method in ("GET", "POST"):
        response = httpx.request(method, f"{cloud_sync.http_url}/v1/enrollment-tokens", json={}, trust_env=False)
        assert response.status_code == 401
