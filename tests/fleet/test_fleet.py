"""The control plane end to end, on a fleet of five real edge-agent processes and a real cloud-sync.

Once with Mosquitto carrying desired and reported state (device accounts in its dynamic-security plugin, kept
by cloud-sync), once with no broker (the gRPC Control stream). Every change is made as an operator makes it,
with `fleetctl`: enrollment tokens with labels, `models push`, `models assign --selector site=lab` (four of
the five devices), `policies set`, `devices revoke`. The numbered checks run in order on one fleet per
transport, each building on the state the previous one left (a failed check skips the rest).
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from edgefleet.proto.edgefleet.v1 import models_pb2, services_pb2, services_pb2_grpc
from tests.fleet.harness import (
    Clients,
    Fleet,
    FleetAgent,
    batch_sizes,
    digits_input,
    events,
    expected_output,
    wait_all,
)
from tests.waiting import wait_for

pytestmark = pytest.mark.slow

CONVERGE_S = 60.0
# How the cloud refuses a revoked device: PERMISSION_DENIED "device X was revoked" where it knows the device
# (an open stream, a cached credential), UNAUTHENTICATED where the token names no device any more.
REFUSED = ("PERMISSION_DENIED", "UNAUTHENTICATED")


def runs(fleet: Fleet, agent: FleetAgent, version: int, policy_hash: str | None = None) -> bool:
    """The cloud's view: the device reported the desired generation, converged, digits `version` ACTIVE
    (and the policy hash, when given)."""
    state = fleet.cloud.state(agent.device_id)
    digits = next((m for m in state["models"] if m["name"] == "digits"), None)
    reported = state["reported"] or {}
    return (
        state["converged"]
        and digits is not None
        and (digits["desired_version"], digits["reported_version"], digits["state"]) == (version, version, "ACTIVE")
        and (policy_hash is None or reported.get("policy_hash") == policy_hash)
    )


def desired_hash(fleet: Fleet, agent: FleetAgent) -> str:
    desired = fleet.cloud.state(agent.device_id)["desired"]
    assert desired is not None, f"{agent.name} has no desired state"
    return str(desired["policy_hash"])


def assert_serves(agent: FleetAgent, package_version: str, fleet: Fleet) -> np.ndarray:
    """digits on the device answers as the package's own model does, from the named version."""
    x = digits_input(3, seed=7)
    with agent.client() as client:
        reply = client.infer("digits", {"pixels": x})
    assert reply.model_version == package_version, (agent.name, reply.model_version)
    want = expected_output(fleet.packages[f"digits:{package_version}"], x)
    got = reply.outputs["probabilities"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    return got


def test_1_enrolled_devices_run_digits_v1_where_the_selector_matches(fleet: Fleet) -> None:
    cloud, lab, field = fleet.cloud, fleet.matching(), fleet.others()
    assert (len(lab), len(field)) == (4, 1)
    # Enrollment: each device holds the id and labels its one-time token carried; every token is used.
    listed = {d["device_id"]: d for d in cloud.json("devices", "list")}
    assert {a.device_id: listed[a.device_id]["labels"] for a in fleet.agents.values()} == {
        a.name: a.labels for a in fleet.agents.values()
    }
    tokens = cloud.json("devices", "token", "list")
    assert sorted(t["used_by"] for t in tokens) == sorted(fleet.agents) and {t["state"] for t in tokens} == {"used"}

    pushed = cloud.json("models", "push", fleet.packages["digits:1"])
    assert (pushed["manifest"]["name"], pushed["manifest"]["version"]) == ("digits", 1)
    cloud.ok("models", "assign", "digits", "1", "--selector", "site=lab")
    wait_all(lab, lambda a: runs(fleet, a, 1), CONVERGE_S, "every lab device to run digits v1")

    for agent in lab:
        shown = cloud.json("devices", "show", agent.device_id)["state"]
        assert shown["converged"] and shown["in_sync"], shown
        (digits,) = shown["models"]
        assert (digits["name"], digits["reported_version"], digits["state"]) == ("digits", 1, "ACTIVE")
        assert_serves(agent, "1", fleet)
    # The field device: no desired state, no digits, nothing downloaded.
    (other,) = field
    shown = cloud.json("devices", "show", other.device_id)["state"]
    assert shown["desired"] is None and shown["models"] == [], shown
    with other.client() as client, pytest.raises(grpc.RpcError) as refused:
        client.infer("digits", {"pixels": digits_input()})
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND, refused.value.details()
    assert not (other.data_dir / "models" / "digits").exists()
    assert events(other.proc, "model.fetched") == []


def test_2_a_policy_reaches_the_lab_and_changes_batching_live_under_load(fleet: Fleet) -> None:
    cloud, lab = fleet.cloud, fleet.matching()
    target = lab[0]
    pid = target.pid
    start = batch_sizes(target)  # test 1's one request of 3 rows counts as a batch of 3

    def new_batches() -> dict[int, int]:
        """{rows: batches} executed since the load began."""
        now = batch_sizes(target)
        return {rows: n - start.get(rows, 0) for rows, n in now.items() if n > start.get(rows, 0)}

    clients = Clients(target.target, threads=16)
    try:
        clients.wait_answers(100)
        assert set(new_batches()) == {1}  # the config file's max_batch_size = 1: one request per batch
        policy = cloud.json(
            "policies",
            "set",
            "batch",
            "--selector",
            "site=lab",
            "--set",
            "inference.max_batch_size=4",
            "--set",
            "inference.max_queue_delay_ms=5",
        )
        assert policy["document"] == {"inference": {"max_batch_size": 4, "max_queue_delay_ms": 5}}, policy
        hashes = {a.name: desired_hash(fleet, a) for a in lab}
        assert len(set(hashes.values())) == 1 and "" not in hashes.values()
        (wanted,) = set(hashes.values())
        wait_all(lab, lambda a: runs(fleet, a, 1, wanted), CONVERGE_S, "every lab device to report the policy")
        # The batcher took it live: 16 apps now share batches of 2..4, never more.
        wait_for(lambda: max(new_batches()) > 1, 30, "batches of several rows")
        clients.wait_answers(300)
    finally:
        outcomes = clients.stop()
    assert set(outcomes) == {"ok"}, outcomes  # not one request failed across the change
    assert clients.sent == outcomes["ok"] > 400, (clients.sent, outcomes)  # and every one was answered
    sizes = new_batches()
    assert max(sizes) <= 4 and any(2 <= s <= 4 for s in sizes), sizes
    assert target.pid == pid and target.running() and len(events(target.proc, "agent.ready")) == 1
    assert events(target.proc, "policy.applied")
    for agent in lab:
        effective = cloud.json("policies", "effective", agent.device_id)
        assert effective["policy_hash"] == wanted and effective["sources"] == ["batch"], effective
    (other,) = fleet.others()
    assert cloud.state(other.device_id)["desired"] is None  # the selector does not pick the field device


def test_3_v2_replaces_v1_on_every_lab_device(fleet: Fleet) -> None:
    cloud, lab = fleet.cloud, fleet.matching()
    pushed = cloud.json("models", "push", fleet.packages["digits:2"])
    assert pushed["manifest"]["version"] == 2
    cloud.ok("models", "assign", "digits", "2", "--selector", "site=lab")
    wait_all(lab, lambda a: runs(fleet, a, 2), CONVERGE_S, "every lab device to run digits v2")

    for agent in lab:
        v2 = assert_serves(agent, "2", fleet)
        assert not np.allclose(v2, expected_output(fleet.packages["digits:1"], digits_input(3, seed=7)))
        # v1 by explicit version: retired after the switch, so NOT_FOUND naming what is loaded.
        with agent.client() as client, pytest.raises(grpc.RpcError) as refused:
            client.infer("digits", {"pixels": digits_input()}, version="1")
        assert refused.value.code() == grpc.StatusCode.NOT_FOUND, refused.value.details()
        assert "version 1 is not loaded (loaded: [2])" in (refused.value.details() or "")
        assert len(events(agent.proc, "model.fetched", model="digits", version=2)) == 1

    listed = {d["device_id"]: d for d in cloud.json("devices", "list")}
    for agent in lab:
        row = listed[agent.device_id]
        assert row["converged"] is True and row["desired_generation"] == row["reported_generation"], row
    (other,) = fleet.others()
    assert listed[other.device_id]["desired_generation"] is None
    # The table an operator reads: generation desired/reported and "ok" on every lab device's row.
    table = cloud.ok("devices", "list")
    for agent in lab:
        row_text = next(line for line in table.splitlines() if f" {agent.device_id} " in line)
        generation = listed[agent.device_id]["desired_generation"]
        assert f"{generation}/{generation} ok" in row_text, row_text


def test_4_a_device_offline_during_a_change_converges_when_it_returns(fleet: Fleet) -> None:
    cloud, lab = fleet.cloud, fleet.matching()
    away, rest = lab[1], [a for a in lab if a is not lab[1]]
    pid = away.pid
    generation = cloud.state(away.device_id)["desired"]["generation"]
    away.pause()
    try:
        if fleet.transport == "mqtt":
            # The broker misses its keepalive and publishes its will: the cloud sees it offline.
            wait_for(lambda: cloud.devices()[away.device_id]["online"] is False, 30, f"{away.name} to go offline")
        cloud.ok(
            "policies",
            "set",
            "batch",
            "--selector",
            "site=lab",
            "--set",
            "inference.max_batch_size=4",
            "--set",
            "inference.max_queue_delay_ms=2",
        )
        wanted = desired_hash(fleet, away)
        assert cloud.state(away.device_id)["desired"]["generation"] > generation
        wait_all(rest, lambda a: runs(fleet, a, 2, wanted), CONVERGE_S, "the online lab devices to take the change")
        assert not cloud.state(away.device_id)["in_sync"]  # stopped: it has not answered
    finally:
        away.resume()
    wait_all([away], lambda a: runs(fleet, a, 2, wanted), CONVERGE_S, f"{away.name} to converge once back")
    if fleet.transport == "mqtt":
        wait_for(lambda: cloud.devices()[away.device_id]["online"] is True, 30, f"{away.name} to be online again")
    # What ran kept running: the same process, v2 downloaded and activated once, v1 once.
    assert away.pid == pid and away.running()
    assert len(events(away.proc, "agent.ready")) == 1
    for version in (1, 2):
        assert len(events(away.proc, "model.fetched", model="digits", version=version)) == 1, version
        assert len(events(away.proc, "model.activated", model="digits", version=version)) == 1, version
    assert_serves(away, "2", fleet)


def test_4b_a_device_stopped_during_a_change_converges_after_its_restart_without_a_download(fleet: Fleet) -> None:
    cloud, lab = fleet.cloud, fleet.matching()
    away, rest = lab[3], [a for a in lab if a is not lab[3]]
    assert away.proc is not None
    away.proc.signal()
    assert away.proc.finish(30) == 0, away.proc.stderr
    cloud.ok("policies", "set", "batch", "--selector", "site=lab", "--set", "inference.max_queue_delay_ms=3")
    wanted = desired_hash(fleet, away)
    wait_all(rest, lambda a: runs(fleet, a, 2, wanted), CONVERGE_S, "the running lab devices to take the change")
    assert not cloud.state(away.device_id)["in_sync"]
    away.start().wait_ready(60)
    wait_all([away], lambda a: runs(fleet, a, 2, wanted), CONVERGE_S, f"{away.name} to converge after its restart")
    # Its persisted desired state and installed v2 were enough: nothing downloaded or installed again.
    assert events(away.proc, "model.fetched") == [] and events(away.proc, "model.installed") == []
    assert_serves(away, "2", fleet)


def test_5_a_revoked_device_is_refused_everywhere_and_not_counted_converged(fleet: Fleet) -> None:
    cloud, lab = fleet.cloud, fleet.matching()
    revoked, rest = lab[2], [a for a in lab if a is not lab[2]]
    token = revoked.token
    assert revoked.proc is not None and cloud.proc is not None
    seen = len(revoked.proc.events)
    cloud.ok("devices", "revoke", revoked.device_id)

    def since(name: str) -> list[dict[str, object]]:
        """The revoked agent's `name` events logged after the revocation."""
        assert revoked.proc is not None
        return [e for e in list(revoked.proc.events)[seen:] if e.get("event") == name]

    # Control: cut off at once.
    if fleet.transport == "mqtt":
        wait_for(lambda: events(cloud.proc, "broker_accounts.disabled", device=revoked.device_id), 20, "disabling")
        wait_for(lambda: since("mqtt.disconnected"), 20, "the broker to drop the revoked device")
        wait_for(lambda: since("mqtt.connect_refused"), 30, "the broker to refuse its reconnect")
    else:
        refused = wait_for(lambda: since("control.refused"), 20, "the Control stream to refuse the device")
        assert refused[0]["code"] in REFUSED, refused
        assert "revoked" in str(refused[0]["details"]), refused
    # Upload: a kept result is stored on the device, and the cloud refuses to take it.
    with revoked.client() as client:
        reply = client.infer("digits", {"pixels": digits_input()}, keep=True)
    assert reply.parameters.get("edgefleet.kept") is True and reply.model_version == "2"  # it still serves
    uplink = wait_for(lambda: since("uplink.refused"), 30, "the cloud to refuse the device's upload")
    assert uplink[0]["code"] in REFUSED and "revoked" in str(uplink[0]["details"]), uplink
    # Download: with the device's own credential, even a version assigned to it is refused.
    with grpc.insecure_channel(cloud.grpc_target) as channel:
        stub = services_pb2_grpc.ArtifactsStub(channel)
        request = services_pb2.DownloadRequest(model=models_pb2.ModelRef(name="digits", version=2))
        with pytest.raises(grpc.RpcError) as download:
            list(stub.Download(request, metadata=[("authorization", f"Bearer {token}")], timeout=10))
    assert download.value.code().name in REFUSED and "revoked" in (download.value.details() or ""), download.value
    assert events(cloud.proc, "artifacts.refused", code=download.value.code().name), "no refusal in cloud-sync's log"

    # A change afterwards reaches the others, never the revoked device, and it does not count as converged.
    before = cloud.state(revoked.device_id)["desired"]["generation"]
    cloud.ok("policies", "set", "batch", "--selector", "site=lab", "--set", "inference.max_batch_size=3")
    wanted = desired_hash(fleet, rest[0])
    wait_all(rest, lambda a: runs(fleet, a, 2, wanted), CONVERGE_S, "the other lab devices to take the change")
    assert cloud.state(revoked.device_id)["desired"]["generation"] == before
    listed = {d["device_id"]: d for d in cloud.json("devices", "list")}
    row = listed[revoked.device_id]
    assert row["revoked"] is True and row["converged"] is not True, row
    assert sum(1 for d in listed.values() if d["converged"]) == len(rest)
    assert cloud.json("devices", "show", revoked.device_id)["state"]["converged"] is False
    assert cloud.state(revoked.device_id)["converged"] is False
    shown = cloud.ok("devices", "show", revoked.device_id)
    assert "REVOKED" in shown and ": converged" not in shown, shown
