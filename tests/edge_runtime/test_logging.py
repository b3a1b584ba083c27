"""Structured logs: JSON lines with event, level and timestamp; secrets redacted; levels filtered."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

from edge_runtime.config import AgentConfig
from edge_runtime.models.repository import ModelRepository
from edgefleet.logs import configure_logging, redact_secrets

log = structlog.get_logger("tests.logging")


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    """A stream to configure logging onto; structlog and the root logger are restored afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    out = io.StringIO()
    yield out
    structlog.reset_defaults()
    for handler in root.handlers[:]:
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    """Each line must be exactly one JSON object."""
    records = []
    for line in stream.getvalue().splitlines():
        record = json.loads(line)
        assert isinstance(record, dict)
        records.append(record)
    return records


def test_one_json_object_per_line_with_event_level_and_timestamp(stream: io.StringIO) -> None:
    configure_logging("info", stream)
    log.info("model.activated", model="digits", version=2, previous=None)
    log.warning("outbox.evicted", records=3, reason="buffer full\nsecond line")
    records = lines(stream)
    assert len(stream.getvalue().splitlines()) == 2  # a newline inside a value stays escaped
    first, second = records
    assert first["event"] == "model.activated"
    assert (first["model"], first["version"], first["previous"]) == ("digits", 2, None)
    assert first["level"] == "info" and second["level"] == "warning"
    assert second["reason"] == "buffer full\nsecond line"
    stamp = datetime.fromisoformat(first["timestamp"].replace("Z", "+00:00"))
    assert stamp.utcoffset() == timedelta(0)


def test_exceptions_are_structured_not_multiline(stream: io.StringIO) -> None:
    configure_logging("info", stream)
    try:
        raise ValueError("bad tensor")
    except ValueError:
        log.exception("kserve.internal_error")
    (record,) = lines(stream)
    assert record["level"] == "error"
    assert record["exception"][0]["exc_type"] == "ValueError"
    assert record["exception"][0]["exc_value"] == "bad tensor"


def test_secret_looking_keys_are_redacted(stream: io.StringIO) -> None:
    configure_logging("debug", stream)
    log.info(
        "device.enrolled",
        device_id="jetson-7",
        enrollment_token="tok-123",
        Password="hunter2",
        api_key="k-456",
        credentials={"cert": "PEM-789"},
    )
    (record,) = lines(stream)
    assert record["device_id"] == "jetson-7"
    for key in ("enrollment_token", "Password", "api_key", "credentials"):
        assert record[key] == "[redacted]"
    text = stream.getvalue()
    for secret in ("tok-123", "hunter2", "k-456", "PEM-789"):
        assert secret not in text


def test_secrets_nested_in_fields_are_redacted(stream: io.StringIO) -> None:
    # Caught a bug: only top-level keys were checked, so a secret inside a dict or list field was logged.
    configure_logging("info", stream)
    log.info(
        "sync.request",
        request={"url": "https://cloud/api", "headers": {"Authorization": "Bearer abc.def"}},
        peers=[{"name": "a", "token": "t-1"}, ("b", {"private_key": "pk-2"})],
    )
    (record,) = lines(stream)
    assert record["request"] == {"url": "https://cloud/api", "headers": {"Authorization": "[redacted]"}}
    assert record["peers"] == [{"name": "a", "token": "[redacted]"}, ["b", {"private_key": "[redacted]"}]]
    for secret in ("abc.def", "t-1", "pk-2"):
        assert secret not in stream.getvalue()


def test_redaction_survives_a_self_referencing_value() -> None:
    loop: dict[str, Any] = {"name": "x"}
    loop["self"] = loop
    event = redact_secrets(None, "info", {"event": "e", "value": loop, "secret": "s"})
    assert event["secret"] == "[redacted]"
    assert event["value"]["name"] == "x"


@pytest.mark.parametrize(
    ("level", "expected"),
    [
        ("debug", ["debug", "info", "warning", "error"]),
        ("info", ["info", "warning", "error"]),
        ("warning", ["warning", "error"]),
        ("error", ["error"]),
    ],
)
def test_records_below_the_level_are_dropped(stream: io.StringIO, level: str, expected: list[str]) -> None:
    configure_logging(level, stream)
    log.debug("a.debug")
    log.info("a.info")
    log.warning("a.warning")
    log.error("a.error")
    assert [r["level"] for r in lines(stream)] == expected
    assert [r["event"] for r in lines(stream)] == [f"a.{name}" for name in expected]


def test_stdlib_records_are_json_lines_too(stream: io.StringIO) -> None:
    # Caught a bug: asyncio's and grpc's own warnings (stdlib logging) reached stderr as plain text.
    configure_logging("info", stream)
    logging.getLogger("asyncio").warning("Executing %s took %.3f seconds", "<Handle>", 0.25)
    logging.getLogger("grpc._server").info("library chatter")  # libraries' info stays out
    (record,) = lines(stream)
    assert record["event"] == "Executing <Handle> took 0.250 seconds"
    assert record["level"] == "warning"
    assert record["logger"] == "asyncio"
    assert "timestamp" in record


def test_configuring_again_replaces_the_stdlib_route(stream: io.StringIO) -> None:
    configure_logging("info", io.StringIO())
    configure_logging("info", stream)
    logging.getLogger("asyncio").error("once")
    assert [r["event"] for r in lines(stream)] == ["once"]


def test_loading_a_model_logs_its_lifecycle(
    make_config: Callable[..., AgentConfig], model_packages: dict[str, Path]
) -> None:
    repository = ModelRepository(make_config())
    try:
        with capture_logs() as events:
            repository.install(model_packages["digits:1"])
    finally:
        repository.close()
    names = [e["event"] for e in events]
    assert names.index("model.installed") < names.index("model.ready") < names.index("model.activated")
    ready = next(e for e in events if e["event"] == "model.ready")
    assert (ready["model"], ready["version"]) == ("digits", 1)
    assert ready["backend"].startswith("onnxruntime/")
    assert ready["plan"]  # why the batcher chose its batch size, in words
    assert ready["batch"] >= 1
    assert ready["log_level"] == "info"
    installed = next(e for e in events if e["event"] == "model.installed")
    assert len(installed["sha256"]) == 64


def test_tracebacks_never_carry_local_variables() -> None:
    stream = io.StringIO()
    configure_logging("info", stream)
    log = structlog.get_logger("test")

    def fails(token: str) -> None:
        raise RuntimeError("boom")

    try:
        fails("efd_SECRET_VALUE")
    except RuntimeError:
        log.exception("something.failed")
    text = stream.getvalue()
    assert "something.failed" in text and "boom" in text
    assert "efd_SECRET_VALUE" not in text


def test_fields_are_data_not_python_reprs(stream: io.StringIO) -> None:
    import dataclasses
    import enum

    class Color(enum.Enum):
        RED = "red"

    @dataclasses.dataclass
    class Link:
        target: str
        token: str

    configure_logging("info", stream)
    log.info(
        "fields.typed",
        path=Path("/var/lib/edge-agent/outbox.db"),
        error=ValueError("bad tensor"),
        color=Color.RED,
        when=datetime(2026, 1, 2, 3, 4, 5),
        tags={"b", "a"},
        link=Link("cloud:443", "tok-SECRET"),
        raw=b"\x00\x01",
        other=object(),
    )
    (record,) = lines(stream)
    assert record["path"] == "/var/lib/edge-agent/outbox.db"  # not "PosixPath('/var/...')"
    assert record["error"] == {"type": "ValueError", "message": "bad tensor"}
    assert record["color"] == "red"
    assert record["when"] == "2026-01-02T03:04:05"
    assert record["tags"] == ["a", "b"]
    # A dataclass becomes an object, and a secret inside it is still redacted.
    assert record["link"] == {"target": "cloud:443", "token": "[redacted]"}
    assert "tok-SECRET" not in stream.getvalue()
    assert record["raw"] == "0001"
    assert isinstance(record["other"], str)


def test_stdlib_record_arguments_render_as_text(stream: io.StringIO) -> None:
    configure_logging("info", stream)
    logging.getLogger("grpc").warning("failed on %s", Path("/tmp/x"))
    (record,) = lines(stream)
    assert record["event"] == "failed on /tmp/x"


@pytest.mark.parametrize(
    ("method", "priority"), [("debug", 7), ("info", 6), ("warning", 4), ("error", 3), ("critical", 2)]
)
def test_journald_lines_start_with_the_syslog_priority(stream: io.StringIO, method: str, priority: int) -> None:
    configure_logging("debug", stream, syslog_prefix=True)
    getattr(log, method)("a.event", n=1)
    line = stream.getvalue().rstrip("\n")
    assert line.startswith(f"<{priority}>{{")
    assert json.loads(line[len(f"<{priority}>") :])["event"] == "a.event"


def test_journald_prefix_covers_stdlib_records_and_exceptions(stream: io.StringIO) -> None:
    configure_logging("info", stream, syslog_prefix=True)
    logging.getLogger("asyncio").error("loop trouble")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("a.failed")
    first, second = stream.getvalue().splitlines()
    assert first.startswith("<3>{") and json.loads(first[3:])["event"] == "loop trouble"
    assert second.startswith("<3>{") and json.loads(second[3:])["exception"][0]["exc_type"] == "RuntimeError"


def _log_in_child(env: dict[str, str], stdout: Any) -> subprocess.CompletedProcess[str]:
    code = (
        "import structlog\n"
        "from edgefleet.logs import configure_logging\n"
        "configure_logging('info')\n"
        "structlog.get_logger('child').error('child.failed', reason='disk full')\n"
        "structlog.get_logger('child').info('child.ok')\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code], env=env, stdout=stdout, stderr=subprocess.PIPE, text=True, timeout=60
    )


def test_a_child_whose_stdout_is_the_journal_stream_prefixes_priorities(tmp_path: Path) -> None:
    # systemd sets JOURNAL_STREAM to the device and inode of the stream it connected stdout to.
    out = tmp_path / "journal-stream"
    with out.open("w") as handle:
        st = os.fstat(handle.fileno())
        env = {**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        done = _log_in_child(env, handle)
    assert done.returncode == 0, done.stderr
    first, second = out.read_text().splitlines()
    assert first.startswith("<3>{") and json.loads(first[3:])["event"] == "child.failed"
    assert second.startswith("<6>{") and json.loads(second[3:])["event"] == "child.ok"


def test_a_child_whose_stdout_is_not_the_journal_stream_keeps_plain_json(tmp_path: Path) -> None:
    # Run from a shell under systemd and piped to jq: JOURNAL_STREAM is inherited but names another stream.
    env = {**os.environ, "JOURNAL_STREAM": "1:2"}
    done = _log_in_child(env, subprocess.PIPE)
    assert done.returncode == 0, done.stderr
    events = [json.loads(line)["event"] for line in done.stdout.splitlines()]
    assert events == ["child.failed", "child.ok"]
    bad = _log_in_child({**os.environ, "JOURNAL_STREAM": "not-a-pair"}, subprocess.PIPE)
    assert [json.loads(line)["event"] for line in bad.stdout.splitlines()] == ["child.failed", "child.ok"]


_IN_PROCESS_APP = """
import logging, sys
from pathlib import Path
import numpy as np
from edge_runtime import InferRequest, ModelRepository
from edge_runtime.config import AgentConfig, config_from_dict

data = Path(sys.argv[2])
config = config_from_dict(AgentConfig, {
    "agent": {"data_dir": str(data)},
    "server": {"unix_socket": str(data / "s.sock"), "tcp_address": "", "metrics_address": ""},
    "engine": {"backend": "onnxruntime", "intra_op_threads": 1, "warmup_inferences": 1},
})
if sys.argv[3] == "asked":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s %(message)s")
repository = ModelRepository(config)
repository.install(Path(sys.argv[1]))
reply = repository.infer(InferRequest("digits", {"pixels": np.zeros((1, 64), np.float32)}))
print("answer", reply.outputs["probabilities"].shape)
repository.close()
"""


@pytest.mark.parametrize("logging_asked", [False, True])
def test_the_in_process_api_prints_nothing_on_the_apps_stdout(
    model_packages: dict[str, Path], tmp_path: Path, logging_asked: bool
) -> None:
    mode = "asked" if logging_asked else "silent"
    done = subprocess.run(
        [sys.executable, "-c", _IN_PROCESS_APP, str(model_packages["digits:1"]), str(tmp_path), mode],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "answer (1, 10)\n"  # the app's own output, and nothing of ours
    if not logging_asked:
        assert done.stderr == ""  # a library says nothing unless the app configures logging
        return
    # The app asked (logging.basicConfig): our events reach its handlers as JSON messages under our loggers.
    ready = [line for line in done.stderr.splitlines() if line.startswith("INFO edge_runtime.models.served ")]
    events = [json.loads(line.split(" ", 2)[2]) for line in ready]
    assert any(e["event"] == "model.ready" and e["model"] == "digits" for e in events)
