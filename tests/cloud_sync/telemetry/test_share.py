"""Replicas in one share group split the device messages between them: each gets some, together all."""

from __future__ import annotations

from cloud_sync.store import Database
from cloud_sync.store.telemetry import TelemetryStore
from tests.cloud_sync.telemetry.conftest import PREFIX, MakeSubscriber, telemetry
from tests.mosquitto import Mosquitto, MqttWatcher
from tests.waiting import wait_for

MESSAGES = 200
T0 = 1_700_000_000_000  # 2023: device times in the past (a future one would be a wrong clock)


def test_two_subscribers_in_one_share_group_split_the_messages(
    db: Database, broker: Mosquitto, make_subscriber: MakeSubscriber
) -> None:
    store = TelemetryStore(db)
    replicas = [make_subscriber(store, broker, client_id=f"cloud-sync-{n}") for n in range(2)]
    devices = {device_id: MqttWatcher(broker, [], client_id=device_id) for device_id in ("cam-1", "cam-2")}

    def stored() -> int:
        return sum(r.stats().stored["telemetry"] for r in replicas)

    try:
        for seq in range(1, MESSAGES // 2 + 1):
            for device_id, device in devices.items():
                message = telemetry(device_id, seq, timestamp_ms=T0 + seq)
                device.client.publish(f"{PREFIX}/devices/{device_id}/telemetry", message.SerializeToString(), qos=1)
        wait_for(lambda: stored() == MESSAGES, 20, "every message stored by one replica or the other")
    finally:
        for device in devices.values():
            device.close()
    shares = [r.stats().stored["telemetry"] for r in replicas]
    assert all(share > 0 for share in shares), shares
    assert store.model_window("digits", 1, None, since_ms=0).windows == MESSAGES  # none twice, none lost
