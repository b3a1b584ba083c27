"""A model that failed to load, seen through a real gRPC channel: UNAVAILABLE with the reason on ModelInfer
and ModelMetadata, ModelReady false, and ServerReady strict by default or not, as configured."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from edge_runtime.inference.tensors import TensorSpec
from edge_runtime.models.package import write_package
from tests.edge_runtime.kserve.conftest import Serve, Served, digits_inputs, rpc_error


def broken(served: Served, tmp_path: Path, name: str = "broken", version: int = 1) -> None:
    """Make `name` active with a package that verifies but cannot load, then load what is active."""
    write_package(
        tmp_path / f"{name}-{version}",
        b"truncated onnx",
        name=name,
        version=version,
        inputs=[TensorSpec("pixels", "FP32", (-1, 64))],
        outputs=[TensorSpec("probabilities", "FP32", (-1, 10))],
        max_batch_size=8,
    )
    served.repo.store.install(tmp_path / f"{name}-{version}")
    served.repo.store.set_active(name, version)
    served.repo.load_active()


def test_a_failed_model_answers_unavailable_with_its_reason(serve: Serve, tmp_path: Path) -> None:
    served = serve("digits:1")
    broken(served, tmp_path)
    client = served.client()
    for call in (
        lambda: client.infer("broken", {"pixels": digits_inputs(1)}),
        lambda: client.model_metadata("broken"),
        lambda: client.infer("broken", {"pixels": digits_inputs(1)}, version="1"),
    ):
        error = rpc_error(call)
        assert error.code() == grpc.StatusCode.UNAVAILABLE, error.details()
        assert error.details().startswith("model broken version 1 failed to load: broken:1: onnxruntime cannot load")
    assert not client.model_ready("broken")
    assert not client.model_ready("broken", "1")
    assert client.model_ready("digits")
    assert client.infer("digits", {"pixels": digits_inputs(2)}).outputs["probabilities"].shape == (2, 10)
    assert not client.ready()  # strict: a model that should be served serves nothing


@pytest.mark.parametrize("strict", [True, False])
def test_server_ready_follows_strict_readiness(serve: Serve, tmp_path: Path, strict: bool) -> None:
    served = serve("digits:1", server={"strict_readiness": strict})
    client = served.client()
    assert client.ready()
    broken(served, tmp_path)
    assert client.ready() is not strict
    assert client.model_ready("digits") and not client.model_ready("broken")  # the per-model truth either way


def test_a_fallback_serves_the_previous_version_and_the_failed_one_says_why(serve: Serve, tmp_path: Path) -> None:
    served = serve("digits:1", "digits:2")
    broken(served, tmp_path, name="digits", version=3)
    client = served.client()
    assert client.ready()
    assert client.infer("digits", {"pixels": digits_inputs(1)}).model_version == "2"
    assert client.model_ready("digits") and client.model_ready("digits", "2")
    assert not client.model_ready("digits", "3")
    error = rpc_error(lambda: client.model_metadata("digits", "3"))
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert "version 3 failed to load" in error.details()
    (status,) = [s for s in served.repo.status() if s.active]
    assert status.version == 2 and status.reason.endswith("; serving version 2")
