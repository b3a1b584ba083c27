"""What compare, models list/show and devices show tell of a variant, on a real cloud-sync and real fleetctl runs.

Telemetry is written straight into the running cloud-sync's store (tests/cloud_sync/rollouts_api/conftest.py): the
store and the figures, not the transport, are under test.
"""

from __future__ import annotations

import json

import pytest

from cloud_sync.store import Database
from edgefleet.proto.edgefleet.v1 import services_pb2_grpc
from edgefleet.proto.edgefleet.v1.state_pb2 import (
    MODEL_ROLE_SHADOW,
    ModelRole,
    ModelState,
    ModelStatus,
    ReportedState,
)
from edgefleet.proto.edgefleet.v1.telemetry_pb2 import ModelVersionTelemetry
from tests.cloud_sync.conftest import RunningCloudSync
from tests.cloud_sync.rollouts_api.conftest import send_windows, window
from tests.cloud_sync.test_fleetctl import environment, failed, fleetctl, ok
from tests.cloud_sync.variants.conftest import family


def wide(cloud: RunningCloudSync, *args: str) -> str:
    """fleetctl ARGS on a terminal wide enough that no table cell wraps; its stdout."""
    return ok(fleetctl(cloud, *args, env=environment(cloud, COLUMNS="250")))


def _shadow_window(name: str, version: int, compared: int, agreed: int) -> ModelVersionTelemetry:
    """A window of `name:version` running as a SHADOW: its runs and its comparisons with the ACTIVE version."""
    shadow = window(name, version, requests=10, p99_ms=5)
    shadow.role = MODEL_ROLE_SHADOW
    shadow.shadow_compared, shadow.shadow_agreed = compared, agreed
    return shadow


def test_compare_shows_size_precision_lineage_and_agreement_as_a_shadow(
    cloud_sync: RunningCloudSync, cloud_db: Database
) -> None:
    name, selector, ids = family(cloud_sync)
    first, second, _ = ids
    # Devices ran v2 ACTIVE and the variant v3 as a SHADOW beside it (then ACTIVE on one of them).
    send_windows(cloud_db, first, [window(name, 2, requests=100, p99_ms=4), _shadow_window(name, 3, 80, 76)], 30)
    send_windows(cloud_db, second, [window(name, 2, requests=100, p99_ms=4), _shadow_window(name, 3, 20, 18)], 30)
    send_windows(cloud_db, first, [window(name, 3, requests=100, p99_ms=2)], 5)
    response = cloud_sync.api.get(
        "/v1/models/compare", params={"a": f"{name}:2", "b": f"{name}:3", "selector": f"var={selector['var']}"}
    )
    assert response.status_code == 200, response.text
    found = response.json()
    a, b = found["a"], found["b"]
    assert (a["registered"], a["size_bytes"], a["precision"], a["lineage"]) == (
        True,
        20 * len(f"{name}:2 "),
        None,
        None,
    )
    assert (b["registered"], b["size_bytes"], b["precision"]) == (True, 30 * len(f"{name}:3 "), "int8")
    assert b["lineage"] == {"parent": {"name": name, "version": 2}, "method": "int8-static", "precision": "int8"}
    # Agreement as a shadow: its SHADOW windows only, summed over the selected devices.
    assert (b["shadow_role_compared"], b["shadow_role_agreed"]) == (100, 94)
    assert b["shadow_role_agreement"] == pytest.approx(0.94)
    assert (a["shadow_role_compared"], a["shadow_role_agreement"]) == (0, None)
    assert found["relative"]["size_bytes"] == pytest.approx(1.5)

    # A version the registry lacks: its facts are null, and no size ratio is made up.
    missing = cloud_sync.api.get("/v1/models/compare", params={"a": f"{name}:2", "b": f"{name}:99"}).json()
    assert (missing["b"]["registered"], missing["b"]["size_bytes"], missing["b"]["lineage"]) == (False, None, None)
    assert missing["relative"]["size_bytes"] is None

    printed = wide(cloud_sync, "models", "compare", f"{name}:2", f"{name}:3", "--selector", f"var={selector['var']}")
    (made,) = [line for line in printed.splitlines() if "precision (lineage)" in line]
    assert "as built" in made and f"int8 (int8-static of {name}:2)" in made, printed
    (agreement,) = [line for line in printed.splitlines() if "agreement as a shadow" in line]
    assert "94.00%" in agreement, printed
    (size,) = [line for line in printed.splitlines() if "model.onnx size" in line]
    assert "1.50x" in size, printed


def test_compare_bad_refs_exit_2(cloud_sync: RunningCloudSync) -> None:
    assert "not name:version" in failed(fleetctl(cloud_sync, "models", "compare", "digits", "digits:2"), 2)
    assert "--since" in failed(fleetctl(cloud_sync, "models", "compare", "d:1", "d:2", "--since", "forever"), 2)


def test_models_list_and_show_print_the_lineage(cloud_sync: RunningCloudSync) -> None:
    name, _, _ = family(cloud_sync)
    rows = [line for line in wide(cloud_sync, "models", "list", "--name", name).splitlines() if name in line]
    variant_rows = [line for line in rows if "int8-static" in line or "fp16" in line]
    assert len(rows) == 4 and len(variant_rows) == 2, rows
    assert any(f"{name}:2" in line and "int8-static" in line and "int8" in line for line in variant_rows), rows
    assert any(f"{name}:3" in line and "fp16" in line for line in variant_rows), rows
    shown = ok(fleetctl(cloud_sync, "models", "show", name, "3"))
    assert f"variant of {name}:2: int8-static, computes in int8" in shown, shown
    assert "variant of" not in ok(fleetctl(cloud_sync, "models", "show", name, "2"))
    listed = json.loads(ok(fleetctl(cloud_sync, "--json", "models", "list", "--name", name)))
    assert [v["manifest"].get("lineage", {}).get("method") for v in listed] == [None, None, "int8-static", "fp16"]


def test_devices_show_prints_each_models_engine_and_precision(cloud_sync: RunningCloudSync) -> None:
    tokens: dict[str, str] = {}
    name, _, (device_id,) = family(cloud_sync, devices=1, tokens=tokens)
    token = tokens[device_id]
    shown = wide(cloud_sync, "devices", "show", device_id)
    assert f"{name}: desired 2, running -, PENDING" in shown, shown
    generation = cloud_sync.api.get(f"/v1/devices/{device_id}/state").json()["desired"]["generation"]
    state = ReportedState(device_id=device_id, generation=generation, converged=True)
    state.models.append(
        ModelStatus(
            name=name,
            version=2,
            role=ModelRole.MODEL_ROLE_ACTIVE,
            state=ModelState.MODEL_STATE_ACTIVE,
            backend="onnxruntime/CPUExecutionProvider",
            precision="fp32",
        )
    )
    services_pb2_grpc.ControlStub(cloud_sync.channel).Report(
        state, metadata=[("authorization", f"Bearer {token}")], timeout=10
    )
    shown = wide(cloud_sync, "devices", "show", device_id)
    assert f"{name}: desired 2, running 2 on onnxruntime/CPUExecutionProvider, precision fp32, ACTIVE" in shown, shown
