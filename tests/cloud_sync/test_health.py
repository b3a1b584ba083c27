"""cloud-sync's device port answers grpc.health.v1 with its clock, which `edge-agent doctor` measures skew by."""

from __future__ import annotations

import time
from collections.abc import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cloud_sync.health import SERVER_TIME_KEY
from edge_runtime.agent import doctor
from edge_runtime.config import AgentConfig
from tests.cloud_sync.conftest import RunningCloudSync


def test_health_check_serving_with_the_server_clock(cloud_sync: RunningCloudSync) -> None:
    with grpc.insecure_channel(cloud_sync.grpc_target) as channel:
        before = time.time_ns() // 1_000_000
        answer, call = health_pb2_grpc.HealthStub(channel).Check.with_call(health_pb2.HealthCheckRequest(), timeout=10)
        after = time.time_ns() // 1_000_000
    assert answer.status == health_pb2.HealthCheckResponse.SERVING
    told = dict(call.initial_metadata())
    assert before <= int(told[SERVER_TIME_KEY]) <= after  # the same host's clock, read during the call


def test_doctor_measures_no_skew_against_a_real_cloud_sync(
    cloud_sync: RunningCloudSync, make_config: Callable[..., AgentConfig]
) -> None:
    assert doctor.SERVER_TIME_KEY == SERVER_TIME_KEY
    config = make_config(cloud={"grpc_target": cloud_sync.grpc_target})
    reached, server_time = doctor.check_cloud(config, timeout_s=10)
    assert reached.result == doctor.PASS and server_time is not None
    clock = doctor.check_clock(server_time, time.time_ns() // 1_000_000)
    assert clock.result == doctor.PASS, clock
