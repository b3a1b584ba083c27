"""`cloud-sync` as its operator runs it on the host: config checking, add-device, and `run`'s start and stop.

Exit codes: 0 success, 2 bad input (a config error names its key), 1 a runtime failure. Every invocation is a
real `python -m cloud_sync.cli` process.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from cloud_sync.config import CloudSyncConfig
from tests.cloud_sync.conftest import (
    RunningCloudSync,
    cloud_sync_config,
    run_cloud_sync_cli,
    run_cloud_sync_cli_all,
)
from tests.mosquitto import Mosquitto, MqttWatcher, free_port
from tests.processes import CloudSyncProcess
from tests.waiting import wait_for


def test_check_config_prints_the_effective_values(tmp_path: Path) -> None:
    path = cloud_sync_config(tmp_path, grpc={"ingest_threads": 2})
    done = run_cloud_sync_cli("check-config", path)
    assert done.returncode == 0, done.stderr
    effective = json.loads(done.stdout)
    assert effective["grpc"]["ingest_threads"] == 2
    assert effective["grpc"]["listen"] == "127.0.0.1:0"
    assert effective["mqtt"] == CloudSyncConfig().mqtt.model_dump()  # defaults filled in


BAD_CONFIGS = {
    "unknown-key": ('[grpc]\nlistn = "127.0.0.1:7000"\n', "grpc.listn: unknown key"),
    "unknown-section": ('[grpcc]\nlisten = "127.0.0.1:7000"\n', "grpcc: unknown key"),
    "wrong-type": ('[grpc]\ningest_threads = "four"\n', "grpc.ingest_threads"),
    "out-of-range": ("[grpc]\ningest_threads = 0\n", "grpc.ingest_threads"),
    "not-a-choice": ('[server]\nlog_level = "loud"\n', "server.log_level"),
    "not-a-table": ('server = "fast"\n', "server"),
    "not-toml": ("[grpc\nlisten = 1\n", "not valid TOML"),
    "listen-without-port": ('[http]\nlisten = "localhost"\n', "http.listen"),
    "listen-port-too-big": ('[grpc]\nlisten = "127.0.0.1:99999"\n', "grpc.listen"),
    "listen-port-not-a-number": ('[http]\nlisten = "127.0.0.1:http"\n', "http.listen"),
    # What `run` refused only once it started, check-config now refuses too (issue 13).
    "unsupported-database": ('[database]\nurl = "mysql://db/edgefleet"\n', "database.url: unsupported database"),
    "in-memory-sqlite": ('[database]\nurl = "sqlite://"\n', "database.url: in-memory SQLite"),
    "postgres-driver": ('[database]\nurl = "postgresql+asyncpg://db/x"\n', "database.url: unsupported PostgreSQL"),
    "broker-url": ('[mqtt]\nurl = "tcp://broker:1883"\n', "mqtt.url"),
    "accounts-without-broker": ('[mqtt]\nmanage_accounts = "mosquitto-dynsec"\n', "mqtt.manage_accounts"),
    "tls-cert-alone": ('[tls]\ncert_file = "/nonexistent/cert.pem"\n', "tls.cert_file and tls.key_file"),
    "tls-missing-file": (
        '[tls]\ncert_file = "/nonexistent/cert.pem"\nkey_file = "/nonexistent/key.pem"\n',
        "tls.cert_file: cannot read /nonexistent/cert.pem",
    ),
    "fleet-ca-key-alone": ('[fleet_ca]\nkey_file = "/nonexistent/ca.key"\n', "fleet_ca.cert_file and"),
    "enrollment-listen-without-mtls": ('[grpc]\nenrollment_listen = "127.0.0.1:7001"\n', "grpc.enrollment_listen"),
}


@pytest.fixture(scope="module")
def bad_config_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, subprocess.CompletedProcess[str]]:
    """check-config on each bad file, side by side."""
    root = tmp_path_factory.mktemp("bad-configs")
    for name, (text, _) in BAD_CONFIGS.items():
        (root / f"{name}.toml").write_text(text)
    argvs: dict[str, list[str | Path]] = {name: ["check-config", root / f"{name}.toml"] for name in BAD_CONFIGS}
    argvs["missing-file"] = ["check-config", root / "missing.toml"]
    argvs["run-missing-file"] = ["run", "--config", root / "missing.toml"]
    argvs["run-unsupported-database"] = ["run", "--config", root / "unsupported-database.toml"]
    return run_cloud_sync_cli_all(argvs)


@pytest.mark.parametrize("name", [*BAD_CONFIGS, "missing-file", "run-missing-file", "run-unsupported-database"])
def test_a_bad_config_exits_2_naming_the_key(
    bad_config_runs: dict[str, subprocess.CompletedProcess[str]], name: str
) -> None:
    done = bad_config_runs[name]
    assert done.returncode == 2, (done.stdout, done.stderr)
    says = BAD_CONFIGS[name.removeprefix("run-")][1] if name != "run-missing-file" and name != "missing-file" else ""
    says = says or "cannot read config"
    assert says in done.stderr
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_add_device_prints_a_token_once_and_refuses_bad_input(tmp_path: Path) -> None:
    path = cloud_sync_config(tmp_path)
    first = run_cloud_sync_cli("add-device", "cam-1", "--labels", "site=lab", "--config", path)
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip().startswith("efd_")

    refusals = {
        "registered already": ["cam-1"],
        "invalid device id": ["cam 2"],
        "not key=value": ["cam-3", "--labels", "site"],
        "invalid label key": ["cam-4", "--labels", "bad key=x"],
        "not valid UTF-8": ["cam-5", "--labels", os.fsdecode(b"site=\xff")],
    }
    runs = run_cloud_sync_cli_all({says: ["add-device", *argv, "--config", path] for says, argv in refusals.items()})
    for says, done in runs.items():
        assert done.returncode == 2, (says, done.stderr)
        assert says in done.stderr and "Traceback" not in done.stderr


def _run_exits(config_path: Path) -> subprocess.CompletedProcess[str]:
    return run_cloud_sync_cli("run", "--config", config_path, timeout=30)


@pytest.mark.parametrize("section", ["grpc", "http"])
def test_run_on_a_taken_port_exits_2_naming_the_key(cloud_sync: RunningCloudSync, tmp_path: Path, section: str) -> None:
    taken = cloud_sync.grpc_target if section == "grpc" else cloud_sync.http_url.removeprefix("http://")
    done = _run_exits(cloud_sync_config(tmp_path, **{section: {"listen": taken}}))
    assert done.returncode == 2, done.stderr
    assert f"{section}.listen {taken}" in done.stderr
    # Whatever had started is stopped cleanly: no traceback, no warning about a server left running.
    assert "Traceback" not in done.stderr and "Warning" not in done.stderr, done.stderr


def test_sigterm_stops_cloud_sync_with_exit_0(tmp_path: Path) -> None:
    proc = CloudSyncProcess(cloud_sync_config(tmp_path))
    try:
        proc.wait_ready(60)
        proc.signal(signal.SIGTERM)
        assert proc.finish(30) == 0, proc.stderr
    finally:
        proc.kill()
    names = proc.event_names()
    assert names.index("cloud_sync.ready") < names.index("cloud_sync.stopping") < names.index("cloud_sync.stopped")
    assert "Traceback" not in proc.stderr


def test_admin_token_is_made_once(tmp_path: Path) -> None:
    path = cloud_sync_config(tmp_path)
    # Two at once on a fresh data dir: both print the one token the file keeps.
    runs = run_cloud_sync_cli_all(
        {
            "first": ["admin-token", "--create", "--config", path],
            "second": ["admin-token", "--create", "--config", path],
        }
    )
    assert [done.returncode for done in runs.values()] == [0, 0], [done.stderr for done in runs.values()]
    token_file = tmp_path / "data" / "admin-token"
    assert runs["first"].stdout == runs["second"].stdout == token_file.read_text()
    assert token_file.read_text().startswith("efa_")
    assert token_file.stat().st_mode & 0o777 == 0o600


def test_admin_token_never_mints_a_token_for_a_data_dir_no_server_made(tmp_path: Path) -> None:
    # A wrong --config (another data dir) once minted a token there: every API call with it then failed (401).
    path = cloud_sync_config(tmp_path)
    done = run_cloud_sync_cli("admin-token", "--config", path)
    assert done.returncode == 2 and done.stdout == "", done.stderr
    assert str((tmp_path / "data").resolve()) in done.stderr and "--create" in done.stderr, done.stderr
    assert f"cloud-sync run --config {path}" in done.stderr
    assert not (tmp_path / "data").exists()  # nothing made


def test_cloud_sync_version() -> None:
    done = run_cloud_sync_cli("--version")
    assert done.returncode == 0, done.stderr
    assert re.fullmatch(r"cloud-sync \S+\n", done.stdout), done.stdout


def test_admin_token_made_by_several_at_once_is_one_token(tmp_path: Path) -> None:
    # `cloud-sync admin-token` beside a first `cloud-sync run`: each once wrote a token of its own, and one of
    # them then served (or printed) a token that the file no longer held.
    from cloud_sync.admin_token import admin_token

    callers = 8
    start = threading.Barrier(callers)

    def make() -> str:
        start.wait(10)
        return admin_token(tmp_path)

    with ThreadPoolExecutor(callers) as pool:
        tokens = set(pool.map(lambda _: make(), range(callers)))
    assert tokens == {(tmp_path / "admin-token").read_text().strip()}
    assert [p.name for p in tmp_path.iterdir()] == ["admin-token"]  # no temporary file left behind


def test_an_admin_token_file_without_a_token_is_refused(tmp_path: Path) -> None:
    # Served as it was, an empty file let "Authorization: Bearer " (an empty token) through.
    path = cloud_sync_config(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "admin-token").write_text("\n")
    runs = run_cloud_sync_cli_all({"run": ["run", "--config", path], "admin-token": ["admin-token", "--config", path]})
    for done in runs.values():
        assert done.returncode == 2, done.stderr
        assert "holds no valid token" in done.stderr and "Traceback" not in done.stderr
        assert done.stdout == ""


@pytest.mark.parametrize("taken", ["grpc", "http"])
def test_a_second_run_on_a_taken_port_never_touches_the_first_one_s_broker_session(tmp_path: Path, taken: str) -> None:
    # Caught a bug: the second process started its MQTT subscriber (the same client id) before binding its
    # ports, so the broker closed the first one's connection to hand the id over, then the second exited.
    client_id = "cloud-sync-replica-0"
    for name in ("first", "second"):
        (tmp_path / name).mkdir()
    with Mosquitto(tmp_path / "broker", persistence=True) as broker:
        ports = {"grpc": free_port(), "http": free_port()}
        mqtt = {"url": broker.url, "client_id": client_id}
        first_config = cloud_sync_config(
            tmp_path / "first",
            grpc={"listen": f"127.0.0.1:{ports['grpc']}"},
            http={"listen": f"127.0.0.1:{ports['http']}"},
            mqtt=mqtt,
        )
        first = CloudSyncProcess(first_config)
        try:
            first.wait_ready(60)
            first.wait_event("telemetry.connected", 30)
            # The same data dir and client id; of the two ports, only the one named by `taken` collides.
            listen = {"grpc": "127.0.0.1:0", "http": "127.0.0.1:0", taken: f"127.0.0.1:{ports[taken]}"}
            second = _run_exits(
                cloud_sync_config(
                    tmp_path / "second",
                    server={"data_dir": str(tmp_path / "first" / "data")},
                    grpc={"listen": listen["grpc"]},
                    http={"listen": listen["http"]},
                    mqtt=mqtt,
                )
            )
            assert second.returncode == 2, second.stderr
            assert f"{taken}.listen 127.0.0.1:{ports[taken]}" in second.stderr
            assert "Traceback" not in second.stderr

            # The first still holds its session: a device's status published now reaches its store.
            assert run_cloud_sync_cli("add-device", "cam-mq", "--config", first_config).returncode == 0
            device = MqttWatcher(broker, [], client_id="cam-mq")
            try:
                device.publish("edgefleet/v1/devices/cam-mq/status", b"online", retain=True)
            finally:
                device.close()
            token = run_cloud_sync_cli("admin-token", "--config", first_config).stdout.strip()
            api = httpx.Client(
                base_url=f"http://127.0.0.1:{ports['http']}",
                headers={"Authorization": f"Bearer {token}"},
                timeout=10,
                trust_env=False,
            )
            with api:
                wait_for(
                    lambda: api.get("/v1/devices/cam-mq").json().get("online") is True,
                    15,
                    "the first cloud-sync to store the device's status",
                )
            names = first.event_names()
            assert names.count("telemetry.connected") == 1 and "telemetry.disconnected" not in names
            # Each of the first one's clients (telemetry, and the control link's own) connected once, ever.
            for client in (client_id, f"{client_id}-control"):
                assert broker.log_text().count(f"as {client} (") == 1, broker.log_text()
        finally:
            first.signal(signal.SIGTERM)
            assert first.finish(30) == 0, first.stderr
