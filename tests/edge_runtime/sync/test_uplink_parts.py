"""The uploader's pure parts: backoff, pacing, the compression decision, channel and token checks."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge_runtime.config import CloudSection
from edge_runtime.errors import ConfigError
from edge_runtime.outbox import UploadBatch
from edge_runtime.sync.uplink import Backoff, Pacer, compressible, open_channel, read_token
from edgefleet.proto.edgefleet.v1 import results_pb2


@given(st.integers(0, 200), st.integers(0, 2**32 - 1))
def test_backoff_delays_stay_within_the_growing_ceiling(failures: int, seed: int) -> None:
    backoff = Backoff(base_s=0.2, cap_s=30.0, rng=random.Random(seed))
    for n in range(failures):
        delay = backoff.next_delay()
        assert 0 <= delay <= min(30.0, 0.2 * 2**n)
    backoff.reset()
    assert backoff.next_delay() <= 0.2


def test_the_pacer_holds_the_byte_rate() -> None:
    pacer = Pacer(rate=1000, _at=0.0)
    assert pacer.delay_for(500, now=0.5) == 0.0  # 500 tokens accrued in 0.5 s
    assert pacer.delay_for(1000, now=0.5) == pytest.approx(1.0)  # 1000 short: one second
    assert Pacer(rate=0).delay_for(10**9, now=0.0) == 0.0


def batch_of(payloads: list[bytes]) -> UploadBatch:
    records = [results_pb2.ResultRecord(seq=i + 1, payload=p) for i, p in enumerate(payloads)]
    return UploadBatch(results_pb2.ResultBatch(records=records, after_seq=0, through_seq=len(records)))


def test_gzip_is_used_only_when_it_pays() -> None:
    text = [b"probabilities " * 50 for _ in range(20)]
    noise = [random.Random(i).randbytes(800) for i in range(20)]
    assert compressible(batch_of(text))
    assert not compressible(batch_of(noise))
    assert not compressible(batch_of([b"tiny"]))


def test_plaintext_only_to_a_loopback_cloud_sync() -> None:
    with pytest.raises(ConfigError, match="not loopback: set cloud.ca_file"):
        open_channel(CloudSection(grpc_target="cloud.example.com:7000"))
    with pytest.raises(ConfigError, match="cannot read cloud.ca_file"):
        open_channel(CloudSection(grpc_target="cloud.example.com:7000", ca_file="/nonexistent/ca.pem"))


def test_the_token_file_is_required_readable_and_not_empty(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cloud.token_file is not set"):
        read_token(CloudSection(grpc_target="127.0.0.1:1"))
    with pytest.raises(ConfigError, match="cannot read cloud.token_file"):
        read_token(CloudSection(token_file=str(tmp_path / "missing")))
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(ConfigError, match="is empty"):
        read_token(CloudSection(token_file=str(empty)))
    good = tmp_path / "token"
    good.write_text("efd_abc\n")
    assert read_token(CloudSection(token_file=str(good))) == "efd_abc"
