"""A staged rollout that lives through chaos: digits v1 -> v2 across real agents whose reported states go through
a proxy that drops 10 % of them, while cloud-sync is restarted twice (once cleanly, once by SIGKILL) and the broker
once (without persistence: its sessions and retained desired states are gone) in the middle of the stages.

The promise under test: the rollout still ends, and ends in time. It completes with each stage stepped into
exactly once (no step lost or taken twice across the restarts), and the cloud sees every device converged on v2
ACTIVE within twice the rollout's total bake time, measured from its creation.

See tests/faults/control.py for the pieces and docs/notes/stream12-P3.md for the choices.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cloud_sync.rollouts.plan import parse_stages
from edgefleet.proto.edgefleet.v1.state_pb2 import MODEL_STATE_ACTIVE
from tests.faults.control import ControlCloud, ControlDevice, PacedLoad
from tests.faults.mqtt_proxy import MqttDropProxy
from tests.mosquitto import Mosquitto
from tests.processes import AgentProcess
from tests.waiting import wait_for

pytestmark = pytest.mark.slow

DEVICES = 3
STAGES = "shadow:30%:10s,active:30%:10s,active:100%:10s"  # 1 device shadows, 1 runs v2, then all 3
# v1 and v2 agree on 89 % of the held-out digits, but only on 79 % of the first 52, which every device's load
# sends first (in order): a gate that judges as soon as 20 requests are in may see ~26 rows of them, and at 0.7
# it failed this rollout once (17 of 26; P ~ 8 %). This test is about the rollout surviving chaos, not about the
# threshold (tests/fleet/test_rollouts.py stops a disagreeing candidate): at 0.5, P ~ 0.02 %.
GATES = "max_error_rate=0.05,min_shadow_agreement=0.5,min_devices=1,min_requests=20"
LABELS = {"chaos": "rollout"}


@pytest.fixture
def sockets() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="ef-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def on_v2(plane: ControlCloud, device_id: str) -> bool:
    """The cloud's stored report of the device is of its newest desired state, converged, digits 2 ACTIVE."""
    desired, report = plane.desired(device_id), plane.reported(device_id)
    if desired is None or report is None or report.generation != desired.generation or not report.converged:
        return False
    digits = [(m.version, m.state) for m in report.models if m.name == "digits"]
    return digits == [(2, MODEL_STATE_ACTIVE)]


def republished(plane: ControlCloud) -> int:
    """How many desired states the running cloud-sync sent again to devices whose report stayed behind."""
    assert plane.cloud.proc is not None
    return sum(
        int(e.get("devices", 0)) for e in plane.cloud.proc.events if e.get("event") == "control_mqtt.republished_behind"
    )


def test_a_rollout_through_lost_reports_and_cloud_and_broker_restarts_completes_within_twice_its_bake_time(
    tmp_path: Path, sockets: Path, model_packages: dict[str, Path]
) -> None:
    bake_s = sum(stage.bake_s for stage in parse_stages(STAGES))
    with Mosquitto(tmp_path / "broker") as broker:
        proxy = MqttDropProxy(broker.port, lambda topic: topic.endswith("/reported"), share=0.1, seed=12)
        # The controller ticks often, so its part of the time is the bake, not the tick; a report lost on the way
        # is asked for again after 2 s, not the default 30 s (which alone is more than this rollout's bake time).
        settings = {"rollouts": {"tick_s": 0.5}, "mqtt": {"republish_after_s": 2.0}}
        plane = ControlCloud(tmp_path / "cloud", broker.url, settings=settings)
        devices: list[ControlDevice] = []
        loads: list[PacedLoad] = []
        try:
            plane.start()
            for ref in ("digits:1", "digits:2"):
                plane.push(model_packages[ref])
            key = plane.signing_key()
            for i in range(DEVICES):
                device_id = f"chaos-{i}"
                token = plane.add_device(device_id, {**LABELS, "n": str(i)})
                devices.append(
                    ControlDevice(
                        tmp_path / device_id,
                        sockets,
                        device_id,
                        plane.cloud,
                        token,
                        model_packages["digits:1"],
                        upload={"sample_rate": 0.0},
                        mqtt={"url": proxy.url, "keepalive_s": 5},
                        telemetry={"interval_s": 0.5},  # gate figures every half second
                        signing_key=key,
                    )
                )
            for device in devices:  # started side by side: each pays the interpreter's start-up
                device.proc = AgentProcess(device.config)
            for device in devices:
                assert device.proc is not None
                device.proc.wait_ready(60)

            # Before the rollout (not under test): every device assigned and converged on v1, nothing dropped.
            proxy.dropping = False
            plane.assign("digits", 1, LABELS)
            for device in devices:
                generation = plane.wait_desired(device.device_id, "digits", 1).generation
                assert plane.wait_reported(device.device_id, generation, 30).converged
            loads = [PacedLoad(device.socket) for device in devices]
            proxy.dropping = True

            began = time.monotonic()
            created = plane.call(
                "POST",
                "/v1/rollouts",
                json={
                    "model": "digits",
                    "to_version": 2,
                    "selector": LABELS,
                    "stages": STAGES,
                    "gates": GATES,
                    "shadow_sample_rate": 0.5,
                },
            )
            rollout_id = created["id"]
            assert created["from_version"] == 1 and created["state"] == "running"

            # Chaos, each in the middle of a stage: the controller has judged the stage at least once.
            def judged(index: int) -> object:
                return lambda r: (
                    r.state != "running"
                    or (r.stage_index >= index and (r.last_evaluation or {}).get("stage_index") == index)
                )

            marks = []
            plane.wait_rollout(rollout_id, judged(0), bake_s, "judged in its shadow stage")
            plane.restart()  # SIGTERM, then started again on the same ports and database
            marks.append(f"cloud-sync restarted {time.monotonic() - began:.1f}s")
            plane.wait_rollout(rollout_id, judged(1), bake_s, "judged in its first active stage")
            broker.restart()  # without persistence: every session and retained desired state is lost
            marks.append(f"broker restarted {time.monotonic() - began:.1f}s")
            plane.wait_rollout(rollout_id, judged(2), bake_s, "judged in its last stage")
            plane.kill()  # SIGKILL: no goodbye to the broker, no lock or session let go cleanly
            plane.start()
            marks.append(f"cloud-sync killed and started {time.monotonic() - began:.1f}s")

            # Terminal: the rollout completed and the cloud sees every device converged on v2 ACTIVE.
            deadline = 2 * bake_s - (time.monotonic() - began)
            rollout = plane.wait_rollout(rollout_id, lambda r: r.state != "running", deadline, "to end")
            assert rollout.state == "completed", f"the rollout ended {rollout.state}: {rollout.reason}"
            remaining = max(0.0, 2 * bake_s - (time.monotonic() - began))
            for device in devices:
                wait_for(
                    lambda d=device: on_v2(plane, d.device_id),  # type: ignore[misc]
                    remaining,
                    f"the cloud to see {device.device_id} converged on digits 2",
                    poll=0.05,
                )
                remaining = max(0.0, 2 * bake_s - (time.monotonic() - began))
            elapsed = time.monotonic() - began
            events = plane.rollout_events(rollout_id)
            steps = ", ".join([*marks, *(f"{e.kind} {(e.at_ms - events[0].at_ms) / 1000:.1f}s" for e in events[1:])])
            print(
                f"rollout under chaos: terminal after {elapsed:.1f}s (total bake {bake_s:.0f}s; {steps}; "
                f"reports dropped {proxy.stats.dropped} of {proxy.stats.matched}, desired states sent again since the "
                f"last start {republished(plane)})"
            )
            assert elapsed <= 2 * bake_s, f"terminal after {elapsed:.1f}s, more than twice the bake time {bake_s}s"

            # Each stage stepped into exactly once across the restarts, and the last one completed it.
            kinds = [event.kind for event in events]
            assert kinds == ["created", "advanced", "advanced", "advanced", "completed"], kinds
            assert proxy.stats.dropped > 0, "no report was dropped: the test tested nothing"
            for device, load in zip(devices, loads, strict=True):
                assert device.agreed_version() == 2
                assert load.answered.get("2", 0) > 0, f"{device.device_id} never answered with v2"
        finally:
            for load in loads:
                load.stop()
            for device in devices:
                device.kill()
            plane.kill()
            proxy.close()
