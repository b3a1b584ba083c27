"""fleetctl as operators run it: a real `python -m cloud_sync.fleetctl` process against a real cloud-sync.

Each command's happy path, as text and as --json; `results tail` decoding kept inference results, and
following new uploads; every exit code (0 ok, 1 unreachable, 2 bad input, 3 not authorised, 4 not found).
"""

from __future__ import annotations

import base64
import json
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any

import pytest

from edgefleet.proto.edgefleet.v1 import results_pb2
from tests.cloud_sync.conftest import RunningCloudSync, batch, digits_payload, record
from tests.processes import REPO_ROOT

FLEETCTL = [sys.executable, "-m", "cloud_sync.fleetctl"]


def environment(cloud_sync: RunningCloudSync, **overrides: str | None) -> dict[str, str]:
    """The process environment with FLEETCTL_URL/TOKEN pointing at the test's cloud-sync; None removes one."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETCTL_") and k != "COLUMNS"}
    env.update(FLEETCTL_URL=cloud_sync.http_url, FLEETCTL_TOKEN=cloud_sync.admin_token)
    for key, value in overrides.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def fleetctl(
    cloud_sync: RunningCloudSync, *args: str, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*FLEETCTL, *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
        env=dict(env) if env is not None else environment(cloud_sync),
    )


def ok(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 0, (done.returncode, done.stdout, done.stderr)
    return done.stdout


def failed(done: subprocess.CompletedProcess[str], code: int) -> str:
    """The one-line message of a run that exited with `code` (and printed no traceback)."""
    assert done.returncode == code, (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr, done.stderr
    return done.stderr


# -- devices ---------------------------------------------------------------------------------------------------


def test_devices_add_prints_the_token_that_then_uploads(cloud_sync: RunningCloudSync) -> None:
    token = ok(fleetctl(cloud_sync, "devices", "add", "ctl-add-1", "--labels", "site=lab, cam=front")).strip()
    assert token.startswith("efd_") and "\n" not in token
    assert cloud_sync.upload(token, [batch(0, 1)]).acked_seq == 1
    assert cloud_sync.device("ctl-add-1")["labels"] == {"site": "lab", "cam": "front"}


def test_devices_add_json(cloud_sync: RunningCloudSync) -> None:
    created = json.loads(ok(fleetctl(cloud_sync, "--json", "devices", "add", "ctl-add-2", "--labels", "site=lab")))
    assert created["device_id"] == "ctl-add-2" and created["labels"] == {"site": "lab"}
    assert created["token"].startswith("efd_")


def test_devices_list(cloud_sync: RunningCloudSync) -> None:
    device_id, _ = cloud_sync.new_device("ctl", {"site": "lab"})
    revoked_id, _ = cloud_sync.new_device("ctl")
    cloud_sync.api.post(f"/v1/devices/{revoked_id}/revoke")

    text = ok(fleetctl(cloud_sync, "devices", "list"))
    assert device_id in text and "site=lab" in text
    revoked_line = next(line for line in text.splitlines() if revoked_id in line)
    assert "yes" in revoked_line

    listed = {d["device_id"]: d for d in json.loads(ok(fleetctl(cloud_sync, "--json", "devices", "list")))}
    assert listed[device_id]["labels"] == {"site": "lab"} and listed[device_id]["revoked"] is False
    assert listed[revoked_id]["revoked"] is True


def test_devices_show(cloud_sync: RunningCloudSync) -> None:
    device_id, token = cloud_sync.new_device("ctl", {"site": "lab"})
    upload = batch(0, 5, records=[record(1), record(2), record(4, kind=99), record(5)])  # 3 evicted, 4 rejected
    upload.produced_total, upload.evicted_total = 5, 1
    cloud_sync.upload(token, [upload])

    text = ok(fleetctl(cloud_sync, "devices", "show", device_id))
    assert device_id in text and "site" in text
    assert "acked seq 5: stored 3, evicted 1, rejected 1 (device reports produced 5, evicted 1, rejected 0)" in text
    assert "clock:" not in text  # nothing stamped ahead

    shown = json.loads(ok(fleetctl(cloud_sync, "--json", "devices", "show", device_id)))
    assert shown["device_id"] == device_id
    uplink = shown["uplink"]
    assert (uplink["acked_seq"], uplink["stored"], uplink["evicted"], uplink["rejected"]) == (5, 3, 1, 1)


def test_devices_show_flags_a_fast_clock(cloud_sync: RunningCloudSync) -> None:
    device_id, token = cloud_sync.new_device("ctl")
    ahead = record(2)
    ahead.created_at_ms += 8 * 24 * 3600 * 1000 + 3 * 3600 * 1000 + 1800 * 1000  # 8 d 3.5 h
    cloud_sync.upload(token, [batch(0, 2, records=[record(1), ahead])])

    text = ok(fleetctl(cloud_sync, "devices", "show", device_id))
    assert "clock: 1 records stamped ahead of the cloud's clock, by up to 8 d 3 h" in text
    shown = json.loads(ok(fleetctl(cloud_sync, "--json", "devices", "show", device_id)))
    assert shown["uplink"]["clock_skewed_total"] == 1
    assert shown["uplink"]["max_clock_skew_ms"] > 8 * 24 * 3600 * 1000


def test_devices_revoke(cloud_sync: RunningCloudSync) -> None:
    first, _ = cloud_sync.new_device("ctl")
    second, _ = cloud_sync.new_device("ctl")
    assert f"{first} revoked" in ok(fleetctl(cloud_sync, "devices", "revoke", first))
    assert json.loads(ok(fleetctl(cloud_sync, "--json", "devices", "revoke", second)))["revoked"] is True
    assert cloud_sync.device(first)["revoked"] and cloud_sync.device(second)["revoked"]


def test_labels_with_brackets_print_as_they_are(cloud_sync: RunningCloudSync) -> None:
    # Rich reads "[...]" as markup: a label value like "[/]" once crashed list and show with a MarkupError.
    device_id, _ = cloud_sync.new_device("ctl", {"note": "[/]", "style": "[bold]x"})
    assert "note=[/]" in ok(fleetctl(cloud_sync, "devices", "list"))
    shown = ok(fleetctl(cloud_sync, "devices", "show", device_id))
    assert "[/]" in shown and "[bold]x" in shown


@pytest.mark.parametrize("command, suffix", [("show", "#x"), ("revoke", "/revoke#"), ("revoke", "?x=1")])
def test_a_device_id_is_one_path_segment(cloud_sync: RunningCloudSync, command: str, suffix: str) -> None:
    # Sent unquoted, "cam/revoke#" once revoked "cam": the id must reach the API as it was typed.
    device_id, _ = cloud_sync.new_device("ctl")
    done = fleetctl(cloud_sync, "devices", command, device_id + suffix)
    assert done.returncode in (2, 4), (done.stdout, done.stderr)
    assert cloud_sync.device(device_id)["revoked"] is False


# -- quarantine ------------------------------------------------------------------------------------------------


def _quarantined_device(cloud_sync: RunningCloudSync, declared_reason: str = "damaged outbox page") -> str:
    """A device with seq 2 refused by the cloud (unknown kind) and seq 4 declared rejected by the device."""
    device_id, token = cloud_sync.new_device("quar")
    upload = batch(0, 5, records=[record(1), record(2, kind=99), record(3), record(5)])
    upload.rejected.add(seq=4, reason=declared_reason)
    upload.rejected_total = 1
    assert list(cloud_sync.upload(token, [upload]).rejected_seqs) == [2, 4]
    return device_id


def test_devices_quarantine_prints_one_line_per_rejected_seq(cloud_sync: RunningCloudSync) -> None:
    device_id = _quarantined_device(cloud_sync)
    refused = record(2, kind=99).SerializeToString()
    done = fleetctl(cloud_sync, "devices", "quarantine", device_id)
    lines = ok(done).splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith("#2 cloud ")
    assert f" {len(refused)} bytes: kind 99 is not a known RecordKind" in lines[0]
    assert lines[1].startswith("#4 device ") and lines[1].endswith("not sent: on the device: damaged outbox page")
    assert done.stderr == ""  # nothing more to page through


def test_devices_quarantine_json_prints_one_entry_per_line(cloud_sync: RunningCloudSync) -> None:
    device_id = _quarantined_device(cloud_sync)
    entries = [
        json.loads(line) for line in ok(fleetctl(cloud_sync, "--json", "devices", "quarantine", device_id)).splitlines()
    ]
    assert [(e["seq"], e["source"]) for e in entries] == [(2, "cloud"), (4, "device")]
    kept = results_pb2.ResultRecord.FromString(base64.b64decode(entries[0]["record"]))
    assert (kept.seq, kept.kind) == (2, 99)
    assert entries[0]["record_bytes"] == entries[0]["record_size"] == len(kept.SerializeToString())
    assert entries[1]["record"] is None and entries[1]["created_at_ms"] is None


def test_devices_quarantine_of_a_clean_device_says_so(cloud_sync: RunningCloudSync) -> None:
    device_id, token = cloud_sync.new_device("quar")
    cloud_sync.upload(token, [batch(0, 2)])
    assert ok(fleetctl(cloud_sync, "devices", "quarantine", device_id)).strip() == "no quarantined records"
    assert ok(fleetctl(cloud_sync, "--json", "devices", "quarantine", device_id)) == ""


def test_a_declared_reason_cannot_drive_the_terminal(cloud_sync: RunningCloudSync) -> None:
    # The device writes the reason: a newline must not forge a second entry, nor ESC reach the terminal.
    reason = "bad\n#9 cloud forged\x1b[2J [red]x[/] :smile:"
    device_id = _quarantined_device(cloud_sync, reason)
    out = ok(fleetctl(cloud_sync, "devices", "quarantine", device_id))
    lines = out.splitlines()
    assert len(lines) == 2 and "\x1b" not in out
    assert lines[1].endswith("on the device: bad\\n#9 cloud forged\\x1b[2J [red]x[/] :smile:")
    [_, declared] = [
        json.loads(line) for line in ok(fleetctl(cloud_sync, "--json", "devices", "quarantine", device_id)).splitlines()
    ]
    assert declared["reason"] == f"on the device: {reason}"  # as the device sent it


def test_devices_quarantine_pages_past_one_api_page(cloud_sync: RunningCloudSync) -> None:
    """1,200 entries: more than the API's 1,000 a page, so --limit and --after are followed across pages."""
    device_id, token = cloud_sync.new_device("quar")
    # Two batches: the test cloud-sync takes messages of at most 64 KiB.
    cloud_sync.upload(token, [batch(0, 600, records=[record(s, kind=99) for s in range(1, 601)])])
    cloud_sync.upload(token, [batch(600, 1200, records=[record(s, kind=99) for s in range(601, 1201)])])

    limited = fleetctl(cloud_sync, "--json", "devices", "quarantine", device_id, "--limit", "1100")
    assert [json.loads(line)["seq"] for line in ok(limited).splitlines()] == list(range(1, 1101))
    assert "more entries after seq 1100: continue with --after 1100" in limited.stderr

    rest = fleetctl(cloud_sync, "--json", "devices", "quarantine", device_id, "--after", "1100", "--limit", "100")
    assert [json.loads(line)["seq"] for line in ok(rest).splitlines()] == list(range(1101, 1201))
    assert rest.stderr == ""  # exactly the limit left: nothing more

    everything = ok(fleetctl(cloud_sync, "devices", "quarantine", device_id, "--limit", "5000")).splitlines()
    assert [line.split()[0] for line in everything] == [f"#{s}" for s in range(1, 1201)]

    first = fleetctl(cloud_sync, "devices", "quarantine", device_id, "--limit", "1")
    assert ok(first).startswith("#1 cloud ") and len(first.stdout.splitlines()) == 1
    assert "--after 1" in first.stderr


# -- results ---------------------------------------------------------------------------------------------------


def _tail_device(cloud_sync: RunningCloudSync) -> str:
    device_id, token = cloud_sync.new_device("tail")
    seven = [0.01] * 10
    seven[7] = 0.91
    records = [
        record(1, payload=digits_payload([0.05, 0.8] + [0.01875] * 8)),
        record(
            2,
            kind=results_pb2.RECORD_KIND_EVENT,
            payload_type="edgefleet.v1.DeviceEvent",
            payload=results_pb2.DeviceEvent(event="model.activated", model="digits", version=1).SerializeToString(),
        ),
        record(3, payload=digits_payload(seven)),
    ]
    cloud_sync.upload(token, [batch(0, 3, records=records)])
    return device_id


def test_results_tail_decodes_kept_inference_results(cloud_sync: RunningCloudSync) -> None:
    device_id = _tail_device(cloud_sync)
    lines = ok(fleetctl(cloud_sync, "results", "tail", "--device", device_id)).splitlines()
    assert len(lines) == 3
    assert f"{device_id} #1 digits:1 result probabilities: argmax 1 (0.800)" in lines[0]
    assert f"{device_id} #2 digits:1 event" in lines[1] and "edgefleet.v1.DeviceEvent" in lines[1]
    assert "#3" in lines[2] and "argmax 7 (0.910)" in lines[2]

    last = ok(fleetctl(cloud_sync, "results", "tail", "--device", device_id, "--last", "1")).splitlines()
    assert len(last) == 1 and "#3" in last[0]


def test_results_tail_json_prints_one_record_per_line(cloud_sync: RunningCloudSync) -> None:
    device_id = _tail_device(cloud_sync)
    out = ok(fleetctl(cloud_sync, "--json", "results", "tail", "--device", device_id, "--last", "0"))
    rows = [json.loads(line) for line in out.splitlines()]
    assert [(r["device_id"], r["seq"]) for r in rows] == [(device_id, 1), (device_id, 2), (device_id, 3)]
    assert rows[1]["payload_type"] == "edgefleet.v1.DeviceEvent"


def _lines(stream: Any) -> Iterator[str]:
    """The lines of `stream` as a reader thread gets them; each next() waits at most 20 s."""
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        for line in stream:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    while True:
        try:
            line = lines.get(timeout=20)
        except queue.Empty:
            raise AssertionError("fleetctl printed nothing for 20 s") from None
        if line is None:
            return
        yield line


def test_results_tail_follow_prints_records_uploaded_after_it_started(cloud_sync: RunningCloudSync) -> None:
    device_id, token = cloud_sync.new_device("follow")
    cloud_sync.upload(token, [batch(0, 1, records=[record(1, payload=digits_payload([0.9] + [0.01] * 9))])])
    argv = [*FLEETCTL, "results", "tail", "--device", device_id, "--follow", "--interval", "0.1"]
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT, env=environment(cloud_sync)
    )
    try:
        lines = _lines(proc.stdout)
        assert f"{device_id} #1" in next(lines)  # it has started and caught up
        cloud_sync.upload(token, [batch(1, 2, records=[record(2, payload=digits_payload([0.01] * 9 + [0.9]))])])
        second = next(lines)
        assert f"{device_id} #2" in second and "argmax 9" in second
        assert proc.poll() is None  # still following
    finally:
        proc.terminate()
        proc.communicate(timeout=10)


# -- exit codes ------------------------------------------------------------------------------------------------


def test_no_token_exits_3_saying_where_to_get_one(cloud_sync: RunningCloudSync) -> None:
    message = failed(fleetctl(cloud_sync, "devices", "list", env=environment(cloud_sync, FLEETCTL_TOKEN=None)), 3)
    assert "no admin token" in message and "cloud-sync admin-token" in message


@pytest.mark.parametrize("token", ["efa_wrong", "é-not-ascii"], ids=["wrong", "not-ascii"])
def test_a_wrong_token_exits_3(cloud_sync: RunningCloudSync, token: str) -> None:
    message = failed(fleetctl(cloud_sync, "devices", "list", env=environment(cloud_sync, FLEETCTL_TOKEN=token)), 3)
    assert "token" in message.lower()


def test_the_token_comes_from_token_file(cloud_sync: RunningCloudSync, tmp_path: Any) -> None:
    token_file = tmp_path / "admin-token"
    token_file.write_text(cloud_sync.admin_token + "\n")
    env = environment(cloud_sync, FLEETCTL_TOKEN=None)
    ok(fleetctl(cloud_sync, "--token-file", str(token_file), "devices", "list", env=env))
    message = failed(fleetctl(cloud_sync, "--token-file", str(tmp_path / "missing"), "devices", "list", env=env), 2)
    assert "--token-file" in message


@pytest.mark.parametrize(
    "args",
    [
        ["devices", "show", "nobody-home"],
        ["devices", "revoke", "nobody-home"],
        # Once printed nothing and exited 0 (or, with --follow, waited forever) for a mistyped id.
        ["results", "tail", "--device", "nobody-home", "--follow"],
        ["devices", "quarantine", "nobody-home"],
    ],
    ids=["show", "revoke", "tail", "quarantine"],
)
def test_an_unknown_device_exits_4(cloud_sync: RunningCloudSync, args: list[str]) -> None:
    assert "nobody-home" in failed(fleetctl(cloud_sync, *args), 4)


@pytest.mark.parametrize(
    "args, says",
    [
        (["devices", "add", "ctl-bad-labels", "--labels", "site"], "not key=value"),
        (["devices", "add", "ctl-bad-labels", "--labels", "bad key=v"], "label key"),
        (["devices", "add", "ctl-bad-labels", "--labels", os.fsdecode(b"site=\xff")], "not valid UTF-8"),
        (["devices", "add", "cam 1"], "invalid device id"),
        (["devices", "add", "c" * 129], "device_id"),
        (["results", "tail", "--last", "-1"], "--last"),
        (["results", "tail", "--interval", "0"], "--interval"),
        (["devices", "add"], "device_id"),
        (["devices", "quarantine", "ctl-bad-labels", "--limit", "0"], "--limit"),
        (["devices", "quarantine", "ctl-bad-labels", "--after", "-1"], "--after"),
        (["devices", "quarantine", "ctl-bad-labels", "--limit", "many"], "--limit"),
        (["devices", "quarantine"], "device_id"),
    ],
    ids=[
        "labels-no-equals",
        "label-key",
        "label-not-utf-8",
        "device-id",
        "device-id-too-long",
        "last-negative",
        "interval-zero",
        "missing-argument",
        "quarantine-limit-zero",
        "quarantine-after-negative",
        "quarantine-limit-not-a-number",
        "quarantine-no-device",
    ],
)
def test_bad_input_exits_2(cloud_sync: RunningCloudSync, args: list[str], says: str) -> None:
    message = failed(fleetctl(cloud_sync, *args), 2)
    assert says in message
    if message.startswith("fleetctl: "):
        # fleetctl's own messages are one line, however long (rich once wrapped them at 80 columns).
        assert len(message.strip().splitlines()) == 1, message
    assert cloud_sync.api.get("/v1/devices/ctl-bad-labels").status_code == 404


def test_cloud_sync_unreachable_exits_1_naming_the_url_option(cloud_sync: RunningCloudSync) -> None:
    # A bound socket that never listens: connections to it are refused, and no other process can take the port.
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{closed.getsockname()[1]}"
        began = time.monotonic()
        message = failed(fleetctl(cloud_sync, "devices", "list", env=environment(cloud_sync, FLEETCTL_URL=url)), 1)
    assert url in message and "--url" in message
    assert time.monotonic() - began < 20


@pytest.mark.parametrize("url", ["localhost:8080", "http://[::1"])
def test_a_url_that_is_not_http_exits_2(cloud_sync: RunningCloudSync, url: str) -> None:
    assert "--url" in failed(fleetctl(cloud_sync, "--url", url, "devices", "list"), 2)


# -- output and shell --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "command", [["devices", "list"], ["devices", "token", "list"], ["policies", "list"], ["models", "assignments"]]
)
def test_json_is_accepted_after_the_command_as_before_it(cloud_sync: RunningCloudSync, command: list[str]) -> None:
    cloud_sync.new_device("ctl-json")
    before = json.loads(ok(fleetctl(cloud_sync, "--json", *command)))
    after = json.loads(ok(fleetctl(cloud_sync, *command, "--json")))
    assert isinstance(after, list)
    if command == ["devices", "list"]:  # another test may add a device between the two runs
        assert {d["device_id"] for d in before} <= {d["device_id"] for d in after}
    else:
        assert after == before


def test_json_after_a_command_with_arguments_and_options(cloud_sync: RunningCloudSync) -> None:
    device_id, _ = cloud_sync.new_device("ctl-json")
    shown = json.loads(ok(fleetctl(cloud_sync, "devices", "show", device_id, "--json")))
    assert shown["device_id"] == device_id
    created = json.loads(ok(fleetctl(cloud_sync, "devices", "add", "ctl-json-add", "--json", "--labels", "a=b")))
    assert created["labels"] == {"a": "b"} and created["token"].startswith("efd_")
    # Without --json anywhere, the same command prints text.
    assert not ok(fleetctl(cloud_sync, "devices", "show", device_id)).lstrip().startswith("{")


def _numbers(value: Any, key: str = "") -> Iterator[tuple[str, Any]]:
    """(key, value) of every field whose name says it is a count, an id or a time."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _numbers(v, k)
    elif isinstance(value, list):
        for v in value:
            yield from _numbers(v, key)
    elif key.endswith(("_ms", "_seq", "_total", "generation", "_bytes")) or key in ("seq", "version", "attempts"):
        yield key, value


def test_json_numbers_are_numbers(cloud_sync: RunningCloudSync) -> None:
    # The desired and reported states are protobuf messages: the JSON mapping writes 64-bit integers as strings,
    # and `"generation": "1"` once reached scripts that compared it with a number.
    from edgefleet.proto.edgefleet.v1.state_pb2 import ReportedState
    from tests.cloud_sync.desired.test_api_state import push_model, report

    device_id, token = cloud_sync.new_device("ctl-num", {"numbers": "yes"})
    push_model(cloud_sync, "ctlnum", 1)
    ok(fleetctl(cloud_sync, "models", "assign", "ctlnum", "1", "--selector", "numbers=yes"))
    shown = json.loads(ok(fleetctl(cloud_sync, "--json", "devices", "show", device_id)))
    generation = shown["state"]["desired"]["generation"]
    assert isinstance(generation, int) and generation >= 1
    report(cloud_sync, token, ReportedState(device_id=device_id, generation=generation, reported_at_ms=1))

    shown = json.loads(ok(fleetctl(cloud_sync, "devices", "show", device_id, "--json")))
    assert shown["state"]["reported"]["generation"] == generation and shown["state"]["in_sync"] is True
    found = dict(_numbers(shown))
    assert {"generation", "issued_at_ms", "reported_at_ms", "created_at_ms", "acked_seq"} <= set(found)
    for key, value in _numbers(shown):
        assert value is None or (isinstance(value, int) and not isinstance(value, bool)), (key, value)
    listed = next(
        d for d in json.loads(ok(fleetctl(cloud_sync, "devices", "list", "--json"))) if d["device_id"] == device_id
    )
    assert listed["desired_generation"] == generation and isinstance(listed["created_at_ms"], int)


def test_show_completion_prints_a_bash_script_for_fleetctl(cloud_sync: RunningCloudSync) -> None:
    script = ok(fleetctl(cloud_sync, "--show-completion", "bash"))
    assert "_FLEETCTL_COMPLETE=complete_bash" in script
    assert script.rstrip().endswith("complete -o default -F _fleetctl_completion fleetctl")


@pytest.mark.parametrize(
    "words, cword, expected",
    [
        ("fleetctl devices li", 2, "list"),
        ("fleetctl rollouts ab", 2, "abort"),
        ("fleetctl devices list --j", 3, "--json"),
    ],
)
def test_completion_completes_commands_and_options(
    cloud_sync: RunningCloudSync, words: str, cword: int, expected: str
) -> None:
    # What bash's completion function (the script above) runs on <TAB>.
    env = environment(cloud_sync, _FLEETCTL_COMPLETE="complete_bash", COMP_WORDS=words, COMP_CWORD=str(cword))
    assert ok(fleetctl(cloud_sync, env=env)).split() == [expected]
