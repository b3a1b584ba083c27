"""Fixtures shared by every test: the sample model packages, agent configs, short socket paths."""

from __future__ import annotations

import gc
import logging
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from edge_runtime.config import AgentConfig, config_from_dict


def pytest_collection_finish(session: pytest.Session) -> None:
    """What collection imported and built (modules, test items) lives for the whole run: out of the collector's
    sight, so that a full collection late in a worker walks what the tests made, not all of that again (a worker
    held 326,000 objects after 200 tests, and one collection of them took 206 ms: the loop checks see it)."""
    gc.collect()
    gc.freeze()


@pytest.fixture(autouse=True)
def _structlog_defaults() -> Iterator[None]:
    """Undo configure_logging after a test: its level filter would hide info events from capture_logs."""
    yield
    structlog.reset_defaults()
    root = logging.getLogger()
    for handler in [h for h in root.handlers if type(h).__module__ == "edgefleet.logs"]:
        root.removeHandler(handler)
    root.setLevel(logging.WARNING)


@pytest.fixture(scope="session")
def model_packages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Built once per session: {"digits:1": dir, "digits:2": dir, "mobilenet-bench:1": dir}."""
    from models.build import build_all

    out = tmp_path_factory.mktemp("models")
    return {p.manifest.ref: p.directory for p in build_all(out)}


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short directory for Unix sockets (their paths are limited to 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="ef-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


@pytest.fixture
def config_data(tmp_path: Path, short_dir: Path) -> dict[str, Any]:
    """Config data for a test agent: its own data dir and socket, no TCP, no metrics port."""
    return {
        "agent": {"data_dir": str(tmp_path / "data"), "shutdown_grace_s": 5.0},
        "server": {
            "unix_socket": str(short_dir / "infer.sock"),
            "tcp_address": "",
            "metrics_address": "",
            "http_unix_socket": "",
            "http_tcp_address": "",
        },
        "engine": {"backend": "onnxruntime", "intra_op_threads": 1, "warmup_inferences": 1},
    }


@pytest.fixture
def make_config(config_data: dict[str, Any]) -> Callable[..., AgentConfig]:
    """make_config(inference={"max_batch_size": 8}) -> AgentConfig over the test's defaults."""

    def make(**sections: dict[str, Any]) -> AgentConfig:
        return config_from_dict(AgentConfig, _merge(config_data, sections))

    return make
