"""Hard examples end to end, on real processes under load: two enrolled edge-agents serve digits v1 (undertrained,
so many held-out digits are uncertain) to apps calling without pause; a policy turns hard examples on with a
byte budget; the devices keep the uncertain inputs within it, upload them with everything else, and the cloud
lists them attributable (device, version, engine, precision, why) and exports them.

What the apps saw is the oracle: each answer's probabilities give its margin, so the test knows which answers
were uncertain. The budget must bind (fewer kept than the apps saw), every kept one must be one the model was
unsure of, their bytes within the budget, random samples must go on as before beside them, and each device's
ledger must balance (stored + evicted + rejected = produced, nothing evicted). Not the measures' arithmetic nor
the budget's windows (tests/edge_runtime/hard_examples/), nor the export's formats (tests/cloud_sync/samples/).
"""

from __future__ import annotations

import io
import json
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from models.build import digits_holdout
from tests.fleet.harness import Fleet, FleetAgent, remove, short_socket_dir, start_fleet, wait_all
from tests.waiting import wait_for

pytestmark = pytest.mark.slow

LABELS = {f"hx-{i}": {"site": "hx"} for i in (1, 2)}
SELECTOR = "site=hx"
THRESHOLD = 0.5  # margin p1 - p2 below it: uncertain (v1 answers ~1/5 of the held-out digits so)
BUDGET_BYTES = 24_000  # per device per window: a few dozen digits hard examples, far fewer than the apps meet
SAMPLE_RATE = 0.02


def margin(probabilities: np.ndarray[Any, Any]) -> float:
    top = np.sort(probabilities.reshape(-1))[::-1]
    return float(top[0] - top[1])


class App(threading.Thread):
    """Calls digits on one device, one held-out digit after another, and remembers each answer's margin."""

    def __init__(self, agent: FleetAgent, pixels: np.ndarray[Any, Any]) -> None:
        super().__init__(daemon=True)
        self.agent, self.pixels = agent, pixels
        self.halt = threading.Event()
        self.lock = threading.Lock()
        self.answered = 0
        self.uncertain = 0
        self.failed: list[str] = []

    def run(self) -> None:
        with self.agent.client(timeout_s=30) as client:
            i = 0
            while not self.halt.is_set():
                try:
                    reply = client.infer("digits", {"pixels": self.pixels[i % len(self.pixels)][None]})
                    unsure = margin(reply.outputs["probabilities"]) < THRESHOLD
                    with self.lock:
                        self.answered += 1
                        self.uncertain += unsure
                except grpc.RpcError as exc:
                    self.failed.append(f"{exc.code().name}: {exc.details()}")
                i += 1


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, model_packages: dict[str, Path]) -> Iterator[Fleet]:
    sockets = short_socket_dir()
    started = start_fleet(tmp_path_factory.mktemp("fleet-hard"), sockets, "grpc", LABELS, model_packages)
    try:
        yield started
    finally:
        started.close()
        remove(sockets)


def samples(fleet: Fleet, reason: str, device: str) -> list[dict[str, Any]]:
    """Every sample of digits the cloud holds for `device` with `reason`, paging through the API."""
    found: list[dict[str, Any]] = []
    after = 0
    while True:
        page = fleet.cloud.get(f"/v1/samples?model=digits&reason={reason}&device={device}&after_id={after}&limit=1000")
        found += page["samples"]
        if not page["more"]:
            return found
        after = page["next_after_id"]


def ledger_settled(fleet: Fleet, agent: FleetAgent) -> bool:
    up = fleet.cloud.get(f"/v1/devices/{agent.device_id}")["uplink"]
    return bool(up["device_produced"] > 0 and up["stored"] + up["evicted"] + up["rejected"] == up["device_produced"])


def test_the_fleet_keeps_uncertain_inputs_within_the_budget_and_the_ledger_balances(
    fleet: Fleet, tmp_path: Path
) -> None:
    cloud, agents = fleet.cloud, list(fleet.agents.values())
    cloud.ok("models", "push", fleet.packages["digits:1"])
    cloud.ok("models", "assign", "digits", "1", "--selector", SELECTOR)
    policy = {
        "samples.hard_bytes_per_window": BUDGET_BYTES,
        "samples.hard_window_s": 3600,
        "samples.measure": "margin",
        "samples.threshold": THRESHOLD,
        "upload.sample_rate": SAMPLE_RATE,
    }
    sets = [arg for key, value in policy.items() for arg in ("--set", f"{key}={value}")]
    cloud.ok("policies", "set", "hard-examples", "--selector", SELECTOR, "--priority", "10", *sets)

    def serving(agent: FleetAgent) -> bool:
        state = cloud.state(agent.device_id)
        desired, reported = state.get("desired") or {}, state.get("reported") or {}
        active = [m for m in reported.get("models", []) if m["state"].endswith("ACTIVE") and m["version"] == 1]
        return bool(state["converged"] and active and reported.get("policy_hash") == desired.get("policy_hash"))

    wait_all(agents, serving, 60, "every device serving digits v1 under the hard-example policy")

    pixels, _ = digits_holdout()
    apps: dict[str, App] = {}
    for agent in agents:
        for n in range(2):
            apps[f"{agent.name}/{n}"] = App(agent, np.roll(pixels, 97 * n, axis=0))
    for app in apps.values():
        app.start()
    try:
        # Past the budget many times over: each uncertain answer would keep ~800 declared bytes.
        enough = 3 * BUDGET_BYTES // 800

        def busy() -> bool:
            return all(sum(a.uncertain for k, a in apps.items() if k.startswith(ag.name)) > enough for ag in agents)

        wait_for(busy, 120, f"the apps to meet more than {enough} uncertain answers per device")
    finally:
        for app in apps.values():
            app.halt.set()
        for app in apps.values():
            app.join(30)
    assert not any(app.failed for app in apps.values()), {k: a.failed[:3] for k, a in apps.items()}

    wait_all(agents, lambda a: ledger_settled(fleet, a), 60, "every device's ledger to settle in the cloud")
    for agent in agents:
        seen = sum(a.uncertain for k, a in apps.items() if k.startswith(agent.name))
        kept = samples(fleet, "uncertain", agent.device_id)
        assert kept, f"{agent.name}: no hard example reached the cloud"
        assert len(kept) < seen, f"{agent.name}: {len(kept)} kept of {seen} uncertain: the budget did not bind"
        assert sum(s["payload_bytes"] for s in kept) <= BUDGET_BYTES, kept[-1]
        for s in kept:
            assert (s["model"], s["version"], s["device_id"]) == ("digits", 1, agent.device_id), s
            assert (s["measure"], s["precision"]) == ("margin", "fp32"), s
            assert s["engine"].startswith("onnxruntime"), s
            assert 0 <= s["score"] < THRESHOLD, s
        randoms = samples(fleet, "random", agent.device_id)
        assert randoms, f"{agent.name}: random sampling stopped beside hard examples"
        up = cloud.get(f"/v1/devices/{agent.device_id}")["uplink"]
        assert up["evicted"] == 0 and up["rejected"] == 0, up

    # Exported for labelling: the inputs are exactly held-out digits v1 was unsure of.
    out = tmp_path / "export"
    cloud.ok("samples", "export", "--model", "digits:1", "--reason", "uncertain", "--format", "npz", "--out", out)
    (data_file,) = [p for p in out.iterdir() if p.suffix == ".npz"]
    manifest = json.loads((out / "manifest.json").read_text())
    with zipfile.ZipFile(io.BytesIO(data_file.read_bytes())) as archive:
        assert "manifest.json" in archive.namelist()
    exported = np.load(data_file, allow_pickle=False)
    inputs = exported["inputs/pixels"].reshape(-1, 64)  # one (1, 64) request per sample
    total = sum(len(samples(fleet, "uncertain", a.device_id)) for a in agents)
    assert manifest["count"] == total == len(inputs), (manifest, total, len(inputs))
    known = {row.tobytes() for row in pixels}
    assert all(row.tobytes() in known for row in inputs.astype(np.float32))
