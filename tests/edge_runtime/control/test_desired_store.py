"""DesiredStore: the last desired state survives a restart; a damaged or foreign file reads as none, logged,
never as a crash or as a wrong state."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from edge_runtime.control.desired_store import DESIRED_FILE, MAX_DESIRED_BYTES, DesiredStore
from edgefleet.proto.edgefleet.v1.state_pb2 import MODEL_ROLE_ACTIVE, DesiredState, ModelAssignment


def state(generation: int = 7) -> DesiredState:
    return DesiredState(
        device_id="cam-1",
        generation=generation,
        models=[ModelAssignment(name="digits", version=2, role=MODEL_ROLE_ACTIVE, sha256="ab" * 32)],
        policy_json='{"inference": {"max_batch_size": 8}}',
        policy_hash="0123456789abcdef",
        issued_at_ms=1_800_000_000_000,
    )


def test_nothing_saved_loads_as_none(tmp_path: Path) -> None:
    assert DesiredStore(tmp_path).load() is None


def test_a_saved_state_loads_after_a_restart_from_a_private_file(tmp_path: Path) -> None:
    DesiredStore(tmp_path).save(state())
    assert DesiredStore(tmp_path).load() == state()
    assert (tmp_path / DESIRED_FILE).stat().st_mode & 0o777 == 0o600


def test_saving_replaces_the_previous_state(tmp_path: Path) -> None:
    store = DesiredStore(tmp_path)
    store.save(state(7))
    store.save(state(8))
    assert store.load() == state(8)
    assert [p.name for p in (tmp_path / DESIRED_FILE).parent.iterdir()] == ["desired.pb"]  # no temp files left


def damage(tmp_path: Path, how: str) -> None:
    store = DesiredStore(tmp_path)
    store.save(state())
    path = tmp_path / DESIRED_FILE
    raw = path.read_bytes()
    if how == "truncated":
        path.write_bytes(raw[: len(raw) - 5])
    elif how == "flipped":
        path.write_bytes(raw[:-3] + bytes([raw[-3] ^ 0x40]) + raw[-2:])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "bare protobuf":  # an older or foreign writer's bytes: no header
        path.write_bytes(state().SerializeToString())
    elif how == "huge":
        path.write_bytes(raw + b"\0" * MAX_DESIRED_BYTES)


@pytest.mark.parametrize("how", ["truncated", "flipped", "empty", "bare protobuf", "huge"])
def test_a_damaged_file_loads_as_none_with_a_log_line(tmp_path: Path, how: str) -> None:
    damage(tmp_path, how)
    with capture_logs() as logs:
        assert DesiredStore(tmp_path).load() is None
    assert [e["event"] for e in logs] == ["control.desired_damaged"]
    DesiredStore(tmp_path).save(state(9))  # and the next state replaces it
    assert DesiredStore(tmp_path).load() == state(9)


def test_an_unreadable_path_loads_as_none_with_a_log_line(tmp_path: Path) -> None:
    (tmp_path / DESIRED_FILE).mkdir(parents=True)  # a directory where the file should be
    with capture_logs() as logs:
        assert DesiredStore(tmp_path).load() is None
    assert [e["event"] for e in logs] == ["control.desired_unreadable"]


@settings(max_examples=50, deadline=None)
@given(garbage=st.binary(max_size=512))
def test_bytes_without_the_header_load_as_none_never_raise(
    tmp_path_factory: pytest.TempPathFactory, garbage: bytes
) -> None:
    data_dir = tmp_path_factory.mktemp("desired")
    (data_dir / DESIRED_FILE).parent.mkdir(parents=True)
    (data_dir / DESIRED_FILE).write_bytes(garbage)
    with capture_logs():
        assert DesiredStore(data_dir).load() is None
