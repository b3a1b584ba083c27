"""Fixtures shared by the device-side tests: the model zoo packaged by `edge-agent package`."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import structlog

from edge_runtime.models.package import write_npz
from tests.models.zoo import CASES


@pytest.fixture(scope="session")
def zoo_packages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every zoo model, packaged once per session through `edge-agent package` (its main()): name -> package."""
    from edge_runtime.agent.cli import main

    root = tmp_path_factory.mktemp("zoo")
    packages: dict[str, Path] = {}
    for case in CASES.values():
        model = root / f"{case.name}.onnx"
        model.write_bytes(case.build())
        args = ["package", str(model), "--name", case.name, "--version", "1", "--out", str(root / case.name)]
        if case.warmup is not None:
            write_npz(root / f"{case.name}.npz", case.warmup())
            args += ["--warmup-inputs", str(root / f"{case.name}.npz")]
        assert main([*args, *case.args]) == 0, case.name
        packages[case.name] = root / case.name
    # main() configured logging for a command line; the test that first asked for the zoo may capture logs.
    structlog.reset_defaults()
    root_logger = logging.getLogger()
    for handler in [h for h in root_logger.handlers if type(h).__module__ == "edgefleet.logs"]:
        root_logger.removeHandler(handler)
    root_logger.setLevel(logging.WARNING)
    return packages
