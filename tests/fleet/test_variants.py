"""A compressed variant goes through the fleet like any version, but proven first: real processes, apps under load.

One cloud-sync (its rollout controller ticking every 0.2 s), Mosquitto with device accounts, three enrolled agents
publishing telemetry every second, and an app calling each device the whole time with held-out digits. The fleet
runs digits v2; an INT8 variant of it is made here with ONNX Runtime's static QDQ quantization over the held-out
digits as calibration (cloud_sync.compress) and pushed like any package (`fleetctl models push`). The numbered
checks run in order on the one fleet: a variant's rollout without a shadow stage is refused (exit 2) and changes
nothing; a damaged variant (the INT8 one with its weights scrambled, its lineage intact) is stopped by the shadow
agreement gate in stage 1 with every device still on v2; the good variant goes through every stage and completes,
every device ACTIVE on it and reporting precision int8. Not the refusals' details nor compare's arithmetic
(tests/cloud_sync/variants/).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from cloud_sync.compress import Calibration, calibration_digest, compress
from models.build import digits_holdout
from tests.fleet.conftest import _broker_missing
from tests.fleet.harness import Clients, Fleet, FleetAgent, events, remove, short_socket_dir, start_fleet, wait_all
from tests.waiting import wait_for

pytestmark = pytest.mark.slow

LABELS = {f"var-{i}": {"site": "depot", "line": str(i)} for i in range(1, 4)}
SELECTOR = "site=depot"
PARENT, VARIANT, DAMAGED = 2, 6, 7
# As tests/fleet/test_rollouts.py: v2 and its INT8 variant agree on ~97 % of held-out digits (cloud_sync.compress
# measures 435 of 450), the scrambled one on ~10 %. 50 compared rows (or requests) before a rate counts.
GATES = "max_error_rate=0.01,max_p99_ratio=4,min_shadow_agreement=0.7,min_devices=1,min_requests=50"
ROWS = 32
CONVERGE_S = 60.0
ROLLOUT_S = 120.0


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, model_packages: dict[str, Path]) -> Iterator[Fleet]:
    """The module's own fleet (MQTT): three devices the selector site=depot picks, telemetry every second."""
    if missing := _broker_missing():
        pytest.skip(missing)
    sockets = short_socket_dir()
    started = start_fleet(
        tmp_path_factory.mktemp("fleet-variants"),
        sockets,
        "mqtt",
        LABELS,
        model_packages,
        cloud_sections={"rollouts": {"tick_s": 0.2}},
        agent_sections={"telemetry": {"interval_s": 1.0}},
    )
    try:
        yield started
    finally:
        started.close()
        remove(sockets)


@pytest.fixture(scope="module")
def variants(tmp_path_factory: pytest.TempPathFactory, model_packages: dict[str, Path]) -> dict[int, Path]:
    """{version: package directory} of the INT8 variant of digits v2 and of its damaged copy."""
    parent = model_packages[f"digits:{PARENT}"]
    out = tmp_path_factory.mktemp("variants")
    pixels, _ = digits_holdout()
    calibration = Calibration("upload", {"pixels": pixels}, calibration_digest({"pixels": pixels}))
    manifest = json.loads((parent / "manifest.json").read_text())
    made = compress(
        (parent / "model.onnx").read_bytes(), manifest, "int8-static", version=VARIANT, calibration=calibration
    )
    assert made.report.agreement >= 0.9, made.report  # what the shadow stage should see again on the devices
    damaged = _scrambled(made.model)
    damaged_manifest = {
        **made.manifest,
        "version": DAMAGED,
        "sha256": _sha256(damaged),
        "size": len(damaged),
        "description": "the int8 variant of digits:2 with its weights scrambled (a broken quantizer)",
    }
    return {
        VARIANT: _package(out / str(VARIANT), parent, made.manifest, made.model),
        DAMAGED: _package(out / str(DAMAGED), parent, damaged_manifest, damaged),
    }


def _sha256(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def _scrambled(model: bytes) -> bytes:
    """The model with every INT8 weight tensor's values shuffled: same graph, same scales, wrong weights."""
    graph = onnx.load_from_string(model)
    rng = np.random.default_rng(7)
    for tensor in graph.graph.initializer:
        if tensor.data_type == onnx.TensorProto.INT8 and len(tensor.dims) == 2:
            values = onnx.numpy_helper.to_array(tensor).copy()
            flat = values.reshape(-1)
            rng.shuffle(flat)
            tensor.CopyFrom(onnx.numpy_helper.from_array(flat.reshape(values.shape), tensor.name))
    return graph.SerializeToString()


def _package(directory: Path, parent: Path, manifest: dict[str, Any], model: bytes) -> Path:
    """A package directory as `edge-agent package` writes one: manifest.json, model.onnx (and the parent's
    warmup.npz where the manifest names it)."""
    directory.mkdir(parents=True)
    (directory / "model.onnx").write_bytes(model)
    (directory / "manifest.json").write_text(json.dumps(manifest))
    if manifest.get("warmup"):
        shutil.copy(parent / "warmup.npz", directory / "warmup.npz")
    return directory


@pytest.fixture(scope="module")
def load(fleet: Fleet) -> Iterator[dict[str, Clients]]:
    """One app per device calling digits with held-out images, one request after another, all module long."""
    pixels, _ = digits_holdout()
    clients = {name: Clients(agent.target, threads=1, inputs=pixels, rows=ROWS) for name, agent in fleet.agents.items()}
    try:
        yield clients
    finally:
        for c in clients.values():
            c.stop()


# -- what the cloud and the devices say -------------------------------------------------------------------------


def digits_statuses(fleet: Fleet, agent: FleetAgent) -> list[dict[str, Any]]:
    report = fleet.cloud.state(agent.device_id)["reported"] or {}
    return [m for m in report.get("models", []) if m["name"] == "digits"]


def runs(fleet: Fleet, agent: FleetAgent, version: int) -> bool:
    """Converged on its desired state, which is digits `version` ACTIVE and nothing else of digits."""
    state = fleet.cloud.state(agent.device_id)
    shown = [
        (int(m["version"]), m["role"].removeprefix("MODEL_ROLE_"), m["state"].removeprefix("MODEL_STATE_"))
        for m in digits_statuses(fleet, agent)
    ]
    return bool(state["converged"]) and shown == [(version, "ACTIVE", "ACTIVE")]


def create(fleet: Fleet, to: int, stages: str) -> str:
    created = fleet.cloud.json(
        "rollouts", "create", "--model", "digits", "--to", str(to), "--selector", SELECTOR,
        "--stages", stages, "--gates", GATES, "--shadow-sample", "0.5",
    )  # fmt: skip
    assert (created["from_version"], created["to_version"], created["state"]) == (PARENT, to, "running"), created
    return str(created["id"])


def ended(fleet: Fleet, rollout_id: str) -> dict[str, Any]:
    last: dict[str, Any] = {}

    def done() -> bool:
        last.update(fleet.cloud.get(f"/v1/rollouts/{rollout_id}"))
        return last["state"] in ("completed", "aborted")

    try:
        wait_for(done, ROLLOUT_S, f"rollout {rollout_id} to end", poll=0.2)
    except AssertionError as exc:
        raise AssertionError(f"{exc}: stage {last.get('stage_index')}, {last.get('last_evaluation')}") from None
    return last


def no_failures(load: dict[str, Clients]) -> None:
    for name, clients in load.items():
        assert set(clients.outcomes) <= {"ok"}, (name, clients.outcomes)
        clients.wait_answers(20, timeout=30)


# -- the checks, in order ------------------------------------------------------------------------------------------


def test_1_the_fleet_runs_digits_v2_and_the_variants_are_pushed_with_their_lineage(
    fleet: Fleet, variants: dict[int, Path]
) -> None:
    cloud = fleet.cloud
    cloud.json("models", "push", fleet.packages[f"digits:{PARENT}"])
    for version, directory in variants.items():
        pushed = cloud.json("models", "push", directory)
        lineage = pushed["manifest"]["lineage"]
        assert (pushed["version"], lineage["parent"]["version"], lineage["method"]) == (version, PARENT, "int8-static")
    listed = [line for line in cloud.ok("models", "list", "--name", "digits").splitlines() if "int8-static" in line]
    assert len(listed) == 2 and all("digits:2" in line and "int8" in line for line in listed), listed
    cloud.ok("models", "assign", "digits", str(PARENT), "--selector", SELECTOR)
    wait_all(list(fleet.agents.values()), lambda a: runs(fleet, a, PARENT), CONVERGE_S, "every device to run v2")


def test_2_a_variant_is_not_rolled_out_unproven(fleet: Fleet, load: dict[str, Clients]) -> None:
    cloud = fleet.cloud
    no_failures(load)
    refused = cloud.fleetctl(
        "rollouts", "create", "--model", "digits", "--to", str(VARIANT), "--selector", SELECTOR,
        "--stages", "active:33%:2s,active:100%", "--gates", GATES,
    )  # fmt: skip
    assert refused.returncode == 2, (refused.stdout, refused.stderr)
    assert "compressed variant (int8 of digits:2)" in refused.stderr and "shadow stage first" in refused.stderr
    assert cloud.get("/v1/rollouts")["rollouts"] == []
    for agent in fleet.agents.values():
        assert runs(fleet, agent, PARENT), agent.name


def test_3_a_damaged_variant_is_stopped_by_the_shadow_agreement_gate(fleet: Fleet, load: dict[str, Clients]) -> None:
    cloud = fleet.cloud
    rollout_id = create(fleet, DAMAGED, "shadow:33%:2s,active:33%:2s,active:100%")
    first = set(cloud.get(f"/v1/rollouts/{rollout_id}")["stage_devices"])
    assert len(first) == 1, first
    final = ended(fleet, rollout_id)
    assert (final["state"], final["stage_index"]) == ("aborted", 0), final
    assert final["last_evaluation"]["failed_gate"] == "min_shadow_agreement", final["last_evaluation"]
    found = cloud.json("rollouts", "events", rollout_id)
    assert [e["kind"] for e in found] == ["created", "gate_failed", "aborted"], found
    assert found[0]["values"]["variant"] == {
        "parent_version": PARENT,
        "method": "int8-static",
        "precision": "int8",
        "from_is_parent": True,
    }, found[0]
    assert found[1]["values"]["gates"]["min_shadow_agreement"]["value"] < 0.7, found[1]

    agents = list(fleet.agents.values())
    wait_all(agents, lambda a: runs(fleet, a, PARENT), CONVERGE_S, "every device to be back on v2 ACTIVE")
    for agent in agents:
        # It only ever ran as a shadow on the first stage's device: never switched to, never answering an app.
        assert events(agent.proc, "model.activated", model="digits", version=DAMAGED) == [], agent.name
        assert load[agent.name].versions[str(DAMAGED)] == 0, agent.name
        shadowed = events(agent.proc, "model.shadowing", model="digits", version=DAMAGED)
        assert bool(shadowed) == (agent.device_id in first), agent.name
    no_failures(load)


def test_4_the_int8_variant_is_proven_in_shadow_and_completes(fleet: Fleet, load: dict[str, Clients]) -> None:
    cloud = fleet.cloud
    stages = "shadow:33%:2s,active:33%:2s,active:100%"
    rollout_id = create(fleet, VARIANT, stages)
    final = ended(fleet, rollout_id)
    assert (final["state"], final["stage_index"]) == ("completed", 2), final
    found = cloud.json("rollouts", "events", rollout_id)
    assert [e["kind"] for e in found] == ["created", "advanced", "advanced", "advanced", "completed"], found
    agreement = found[1]["values"]["gates"]["min_shadow_agreement"]
    assert agreement["ok"] is True and agreement["value"] >= 0.7, agreement

    agents = list(fleet.agents.values())

    def int8(agent: FleetAgent) -> bool:
        return runs(fleet, agent, VARIANT) and [m["precision"] for m in digits_statuses(fleet, agent)] == ["int8"]

    wait_all(agents, int8, CONVERGE_S, "every device to run the variant ACTIVE, reporting precision int8")
    shown = cloud.ok("devices", "show", agents[0].device_id)
    assert "precision int8" in shown, shown

    # What compare shows of parent and variant on these devices: the registry's sizes and lineage, and the
    # variant's agreement as a shadow in stage 1.
    compared = cloud.json("models", "compare", f"digits:{PARENT}", f"digits:{VARIANT}", "--selector", SELECTOR)
    a, b = compared["a"], compared["b"]
    assert (a["lineage"], b["lineage"]["parent"], b["precision"]) == (None, {"name": "digits", "version": 2}, "int8")
    assert b["size_bytes"] < a["size_bytes"] and compared["relative"]["size_bytes"] < 0.75, compared
    assert b["shadow_role_compared"] > 0 and b["shadow_role_agreement"] >= 0.7, b

    for name, clients in load.items():
        outcomes = clients.stop()
        assert set(outcomes) == {"ok"} and clients.sent == outcomes["ok"] > 0, (name, clients.sent, outcomes)
        assert clients.versions[str(VARIANT)] > 0, (name, clients.versions)


def test_5_a_variant_is_not_assigned_by_hand_unless_forced(fleet: Fleet) -> None:
    cloud = fleet.cloud
    assigned = cloud.fleetctl("models", "assign", "digits", str(DAMAGED), "--selector", SELECTOR)
    assert assigned.returncode == 2, (assigned.stdout, assigned.stderr)
    assert "compressed variant (int8 of digits:2)" in assigned.stderr and "--force" in assigned.stderr
    found = cloud.json("models", "assignments", "--model", "digits")
    assert [(a["version"], a["selector_text"]) for a in found] == [(VARIANT, SELECTOR)], found
    for agent in fleet.agents.values():
        assert runs(fleet, agent, VARIANT), agent.name
