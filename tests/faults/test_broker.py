"""The broker restarted under a running fleet: presence and telemetry come back by themselves, the agent
keeps inferring and buffering meanwhile, and the data plane (gRPC) loses nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.faults.fleet import Cloud, Device, Load, reckon
from tests.mosquitto import Mosquitto
from tests.waiting import wait_for

pytestmark = pytest.mark.slow


def test_mosquitto_restarted_under_a_running_fleet(
    tmp_path: Path, short_dir: Path, model_packages: dict[str, Path]
) -> None:
    broker = Mosquitto(tmp_path / "broker", "max_queued_messages 100000", persistence=True).start()
    cloud = Cloud(tmp_path / "cloud", mqtt_url=broker.url)
    cloud.start()
    device = None
    try:
        token = cloud.add_device("cam-mq")
        device = Device(
            tmp_path / "cam-mq",
            short_dir,
            "cam-mq",
            cloud,
            token,
            model_packages["digits:1"],
            mqtt={"url": broker.url},
            telemetry={"interval_s": 0.2},
        )
        device.start()
        load = Load(device.socket, keep=True)

        def telemetry_seq() -> int:
            latest, presence = cloud.telemetry("cam-mq")
            return latest.message.seq if latest is not None and presence is not None and presence.online else 0

        first = wait_for(telemetry_seq, 30, "telemetry and presence from the device")
        load.wait_answers(50)
        broker.restart()
        load.wait_answers(100)  # the agent answers (and keeps results) while reconnecting
        wait_for(lambda: telemetry_seq() > first + 5, 60, "telemetry to flow again after the restart")
        assert cloud.telemetry("cam-mq")[1].online

        def digits_requests() -> int:
            latest = cloud.telemetry("cam-mq")[0]
            return sum(m.requests for m in latest.message.models if m.name == "digits")

        wait_for(digits_requests, 30, "telemetry windows after the restart to count the traffic")

        load.wait_answers(50)
        load.stop()
        reckon(cloud, device)
        assert not set(load.kept_ids) - cloud.request_ids("cam-mq")

        device.kill()  # no goodbye: the broker's last will marks it offline
        wait_for(lambda: not cloud.telemetry("cam-mq")[1].online, 30, "the last will to mark the device offline")
    finally:
        if device is not None:
            device.kill()
        cloud.kill()
        broker.stop()
