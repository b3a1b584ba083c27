"""cloud-sync with a broker: a policy set through the admin API reaches the device's MQTT topic, and the
device's report over MQTT is what GET /v1/devices/{id}/state shows. The real CloudSync.run, in-process."""

from __future__ import annotations

from pathlib import Path

import httpx

from cloud_sync.admin_token import admin_token
from edgefleet.proto.edgefleet.v1.state_pb2 import DesiredState, ReportedState
from tests.cloud_inprocess import InProcessCloud
from tests.mosquitto import Mosquitto, MqttWatcher
from tests.waiting import wait_for

PREFIX = "edgefleet/v1"


def test_a_policy_goes_out_over_mqtt_and_the_report_comes_back(tmp_path: Path) -> None:
    with Mosquitto(tmp_path / "broker") as broker:
        cloud = InProcessCloud(tmp_path / "cloud", mqtt={"url": broker.url, "topic_prefix": PREFIX}).start()
        device = None
        try:
            cloud.add_device("cam-1")
            token = admin_token(cloud.config.data_dir)
            with httpx.Client(
                base_url=cloud.http_url, headers={"Authorization": f"Bearer {token}"}, trust_env=False, timeout=30
            ) as api:
                body = {"selector": {}, "priority": 1, "document": {"inference": {"max_batch_size": 4}}}
                assert api.put("/v1/policies/fleet", json=body).status_code == 200
                device = MqttWatcher(broker, [f"{PREFIX}/devices/cam-1/desired"], client_id="cam-1")
                got = wait_for(lambda: device.on(f"{PREFIX}/devices/cam-1/desired"), 10, "the desired state")
                state = DesiredState.FromString(got[-1].payload)
                assert state.policy_json == '{"inference":{"max_batch_size":4}}' and state.policy_hash
                reported = ReportedState(
                    device_id="cam-1", generation=state.generation, policy_hash=state.policy_hash, converged=True
                )
                device.publish(f"{PREFIX}/devices/cam-1/reported", reported.SerializeToString(), retain=True)
                wait_for(lambda: cloud.reported("cam-1"), 10, "the report to be stored")
                shown = api.get("/v1/devices/cam-1/state").json()
                assert (shown["in_sync"], shown["converged"]) == (True, True)
        finally:
            if device is not None:
                device.close()
            cloud.stop()
        assert cloud.blocked == []
