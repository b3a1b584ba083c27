"""Nothing kept is lost, whatever fails: the data plane's fault tests, with real processes.

Each test drives load through a real edge-agent into a real cloud-sync, breaks something for real, then
checks with `reckon`: every record the agent committed is in the cloud store exactly once, in seq order (or
accounted for as evicted or rejected), and stored + evicted + rejected = produced by both the cloud's and the
agent's own counters.
"""

from __future__ import annotations

import random
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.faults.fleet import Cloud, Device, Load, reckon
from tests.postgres import local_cluster, postgres_schema_url, restart_postgres
from tests.waiting import wait_for

pytestmark = pytest.mark.slow


def test_results_flow_to_the_cloud_exactly_once(cloud: Cloud, make_device: Callable[..., Device]) -> None:
    device = make_device()
    device.start()
    load = Load(device.socket)
    load.wait_answers(200)
    load.stop()
    counts = reckon(cloud, device)
    assert counts["stored"] >= 200 and counts["evicted"] == 0


def test_kill_9_the_agent_twenty_times_while_it_infers_and_uploads(
    cloud: Cloud, make_device: Callable[..., Device]
) -> None:
    device = make_device()
    rng = random.Random(20)
    load = Load(device.socket, keep=True)
    for _ in range(20):
        device.start()
        load.wait_answers(rng.randint(5, 60))  # a random moment: mid-append, mid-commit, mid-upload
        device.kill()
    device.start()
    load.wait_answers(20)
    load.stop()
    counts = reckon(cloud, device)
    assert counts["evicted"] == 0 and counts["stored"] == counts["produced"] >= 20 * 5
    # What an app was told was kept survived every kill and reached the cloud.
    assert len(load.kept_ids) >= 20 * 5
    assert not set(load.kept_ids) - cloud.request_ids(device.device_id)


def test_cloud_sync_down_under_load_then_back(cloud: Cloud, make_device: Callable[..., Device]) -> None:
    device = make_device()
    device.start()
    load = Load(device.socket)
    load.wait_answers(50)
    cloud.stop()
    load.wait_answers(300)  # the agent keeps answering and buffering while the cloud is away
    buffered = device.counters()
    assert buffered["last_seq"] > buffered["acked_seq"]
    cloud.start()
    load.wait_answers(50)
    load.stop()
    counts = reckon(cloud, device)
    assert counts["evicted"] == 0


def test_cloud_sync_killed_mid_upload(cloud: Cloud, make_device: Callable[..., Device]) -> None:
    device = make_device()
    device.start()
    load = Load(device.socket)
    for _ in range(3):
        load.wait_answers(100)
        cloud.kill()  # acks in flight are lost: the agent must re-send, the cloud must not duplicate
        cloud.start()
    load.stop()
    counts = reckon(cloud, device)
    assert counts["evicted"] == 0 and counts["stored"] == counts["produced"] >= 300


def test_a_full_outbox_evicts_and_every_eviction_is_accounted_for(
    cloud: Cloud, make_device: Callable[..., Device]
) -> None:
    # 64 KiB holds a few hundred records: with the cloud away, eviction must start.
    device = make_device(buffer={"max_bytes": 64 * 1024})
    device.start()
    load = Load(device.socket)
    load.wait_answers(20)
    cloud.stop()
    wait_for(lambda: device.counters()["evicted_total"] > 0, 60, "the outbox to evict past its bound")
    load.wait_answers(100)
    cloud.start()
    load.wait_answers(20)
    load.stop()
    counts = reckon(cloud, device)
    assert counts["evicted"] > 0 and counts["stored"] > 0


def test_postgresql_restarted_under_cloud_sync(
    tmp_path: Path, short_dir: Path, model_packages: dict[str, Path]
) -> None:
    cluster = local_cluster()
    if cluster is None:
        pytest.skip("needs root and a local PostgreSQL cluster that pg_ctlcluster can restart")
    with postgres_schema_url() as url:
        cloud = Cloud(tmp_path / "cloud-pg", database_url=url)
        cloud.start()
        try:
            token = cloud.add_device("cam-pg")
            device = Device(tmp_path / "cam-pg", short_dir, "cam-pg", cloud, token, model_packages["digits:1"])
            device.start()
            load = Load(device.socket, keep=True)
            for _ in range(2):
                load.wait_answers(150)
                restart_postgres(*cluster)  # every pooled connection of cloud-sync dies under it
            load.wait_answers(150)
            load.stop()
            counts = reckon(cloud, device)
            assert counts["evicted"] == 0 and counts["stored"] >= 450
            assert not set(load.kept_ids) - cloud.request_ids(device.device_id)
            assert cloud.proc is not None and cloud.proc.proc.poll() is None  # it rode it out, no restart
            device.kill()
        finally:
            cloud.kill()


def test_a_byte_flipped_in_a_stopped_agents_outbox_is_quarantined_and_the_rest_arrive(
    cloud: Cloud, make_device: Callable[..., Device]
) -> None:
    """The outside report: with the agent stopped, one flipped byte in a record's page passed quick_check at
    the next start and the altered result reached the cloud as a valid one."""
    device = make_device()
    cloud.stop()  # results stay in the outbox
    device.start()
    load = Load(device.socket)
    load.wait_answers(100)
    load.stop()
    device.stop()
    outbox = device.data_dir / "outbox.db"
    conn = sqlite3.connect(outbox)
    try:
        seq, payload = conn.execute("SELECT seq, payload FROM records ORDER BY seq LIMIT 1 OFFSET 50").fetchone()
    finally:
        conn.close()
    data = outbox.read_bytes()
    at = data.find(payload)  # the page that holds this record's payload
    assert at > 0 and data.find(payload, at + 1) < 0
    with outbox.open("r+b") as f:
        f.seek(at + len(payload) // 2)
        f.write(bytes([data[at + len(payload) // 2] ^ 0x04]))

    cloud.start()
    device.start()
    counts = reckon(cloud, device)

    assert counts["rejected"] == 1 and counts["evicted"] == 0
    assert seq not in cloud.seqs(device.device_id)
    assert cloud.rejected_seqs(device.device_id) == {seq}
    assert device.proc is not None and device.proc.find("outbox.quarantined") is not None
