"""`edge-agent` as a user runs it: help, config checking, installing packages; exit codes 0 / 1 / 2.

Every invocation is a real `python -m edge_runtime.agent.cli` process. The independent ones start side by
side in one module fixture (each pays the interpreter's start-up); each test then asserts on its own run.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from edge_runtime import __version__
from edge_runtime.config import field_docs
from edge_runtime.inference.tensors import TensorSpec
from edge_runtime.models.package import read_package, write_package
from edge_runtime.models.store import ModelStore
from tests.edge_runtime.agent.conftest import REPO_ROOT, run_cli, run_cli_all
from tests.models import zoo
from tests.processes import toml_text

COMMANDS = ["run", "inspect", "package", "install", "models", "check-config", "status", "doctor"]

BAD_CONFIGS = {
    "unknown-key": ("[inference]\nmax_batch_sze = 4\n", ["unknown key 'inference.max_batch_sze'"]),
    "unknown-section": ("[infrence]\nmax_batch_size = 4\n", ["unknown key 'infrence'"]),
    "wrong-type": ('[inference]\nmax_batch_size = "8"\n', ["inference.max_batch_size must be int", "str"]),
    "bool-for-int": ("[inference]\ninstances = true\n", ["inference.instances must be int"]),
    "not-a-section": ('agent = "fast"\n', ["agent must be a table"]),
    "out-of-range": ("[agent]\nshutdown_grace_s = -1\n", ["agent.shutdown_grace_s = -1.0 is out of range"]),
    "not-a-choice": ('[engine]\nbackend = "cuda"\n', ["engine.backend must be one of", "'cuda'"]),
    "cross-field": (
        "[inference]\npriority_levels = 2\ndefault_priority = 3\n",
        ["inference.default_priority (3)", "inference.priority_levels (2)"],
    ),
    "invalid-toml": ("[agent\ndata_dir = 1\n", ["not valid TOML"]),
}

NOT_PACKAGES = ["empty-dir", "missing-dir", "no-model-file"]


class Runs:
    """The side-by-side runs, by name, and the directory their inputs live in."""

    def __init__(self, root: Path, results: dict[str, subprocess.CompletedProcess[str]]) -> None:
        self.root = root
        self.results = results

    def __getitem__(self, name: str) -> subprocess.CompletedProcess[str]:
        return self.results[name]


def _corrupt_copy(package: Path, target: Path) -> Path:
    shutil.copytree(package, target)
    model = target / "model.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0x01  # same size, one bit different
    model.write_bytes(bytes(data))
    return target


def _packages_that_cannot_serve(root: Path, zoo_packages: dict[str, Path]) -> dict[str, Path]:
    """Packages whose checksums verify but which must not be installed, each for its own reason."""
    made: dict[str, Path] = {}

    def rewrite(name: str, source: str, payload: bytes | None = None, **changes: Any) -> None:
        m = read_package(zoo_packages[source]).manifest
        fields: dict[str, Any] = {
            "name": m.name, "version": m.version, "inputs": list(m.inputs), "outputs": list(m.outputs),
            "max_batch_size": m.max_batch_size, **changes,
        }  # fmt: skip
        data = payload if payload is not None else (zoo_packages[source] / "model.onnx").read_bytes()
        made[name] = write_package(root / name, data, **fields).directory

    rewrite("truncated", "cnn", payload=(zoo_packages["cnn"] / "model.onnx").read_bytes()[:700])
    rewrite(
        "zipmap-declared",
        "tabular",
        outputs=[TensorSpec("label", "INT64", (-1,)), TensorSpec("probabilities", "FP32", (-1, 3))],
    )
    rewrite("lying-manifest", "cnn", inputs=[TensorSpec("pixels", "FP32", (-1, 3, 32, 32))])
    rewrite("detector-bare", "detector")  # no warm-up shapes: warm-up at 1x1 fails
    return made


@pytest.fixture(scope="module")
def runs(
    tmp_path_factory: pytest.TempPathFactory, model_packages: dict[str, Path], zoo_packages: dict[str, Path]
) -> Runs:
    root = tmp_path_factory.mktemp("cli")
    argvs: dict[str, list[str | Path]] = {"help": ["--help"], "version": ["--version"]}
    argvs.update({f"help-{command}": [command, "--help"] for command in COMMANDS})
    argvs.update({"unknown-command": ["serve"], "no-command": []})

    valid = root / "valid.toml"
    valid.write_text(
        toml_text(
            {
                "agent": {"data_dir": str(root / "valid-data"), "shutdown_grace_s": 3},
                "server": {"tcp_address": "127.0.0.1:9001"},
                "inference": {"max_batch_size": 8},
            }
        )
    )
    argvs["check-valid"] = ["check-config", valid]
    argvs["check-valid-json"] = ["check-config", valid, "--json"]
    # What `run` refuses after the keys and types passed: check-config refuses it too (preflight.py).
    for name, data in {
        "public-tcp": {"server": {"tcp_address": "0.0.0.0:8001"}},
        "remote-plaintext-cloud": {
            "cloud": {"grpc_target": "10.1.2.3:7000", "device_id": "d", "token_file": str(root / "token")}
        },
        "no-token-file": {"cloud": {"grpc_target": "127.0.0.1:7000", "device_id": "d"}},
        "bad-metrics-address": {"server": {"metrics_address": "metrics"}},
        "mqtt-without-device": {"mqtt": {"url": "mqtt://127.0.0.1:1883"}},
    }.items():
        (root / f"run-refuses-{name}.toml").write_text(toml_text({"agent": {"data_dir": str(root / "r")}, **data}))
        argvs[f"run-refuses-{name}"] = ["check-config", root / f"run-refuses-{name}.toml"]
    (root / "token").write_text("efd_token\n")
    argvs["status-bad-timeout"] = ["status", "--config", valid, "--timeout", "0"]
    argvs["status-bad-option"] = ["status", "--config", valid, "--jsn"]
    argvs["doctor-bad-timeout"] = ["doctor", "--config", valid, "--timeout", "-1"]
    for name, (text, _expected) in BAD_CONFIGS.items():
        (root / f"{name}.toml").write_text(text)
        argvs[f"bad-{name}"] = ["check-config", root / f"{name}.toml"]
    missing = root / "nowhere.toml"
    argvs["missing-check-config"] = ["check-config", missing]
    argvs["missing-run"] = ["run", "--config", missing]
    argvs["missing-models"] = ["models", "--config", missing]

    def config(name: str, data_dir: Path) -> Path:
        path = root / f"{name}.toml"
        path.write_text(toml_text({"agent": {"data_dir": str(data_dir)}}))
        return path

    corrupted = _corrupt_copy(model_packages["digits:1"], root / "corrupted")
    argvs["install-corrupted"] = ["install", corrupted, "--config", config("corrupted", root / "corrupted-data")]
    (root / "empty-dir").mkdir()
    (root / "no-model-file").mkdir()
    shutil.copy(model_packages["digits:1"] / "manifest.json", root / "no-model-file")
    for what in NOT_PACKAGES:
        argvs[f"install-{what}"] = ["install", root / what, "--config", config(what, root / f"{what}-data")]
    for what, package in _packages_that_cannot_serve(root, zoo_packages).items():
        argvs[f"install-{what}"] = ["install", package, "--config", config(what, root / f"{what}-data")]
    (root / "cnn.onnx").write_bytes(zoo.cnn())
    (root / "detector.onnx").write_bytes(zoo.detector())
    (root / "not.onnx").write_bytes(b"GIF89a this is a picture")
    argvs["package-cnn"] = ["package", root / "cnn.onnx", "--name", "cnn", "--version", "3", "--out", root / "cnn-3"]
    argvs["package-not-onnx"] = ["package", root / "not.onnx", "--name", "x", "--version", "1", "--out", root / "x"]
    argvs["package-bad-shape"] = [
        "package", root / "detector.onnx", "--name", "d", "--version", "1", "--shape", "images=1x3xHxW",
    ]  # fmt: skip
    argvs["package-no-sizes"] = [
        "package",
        root / "detector.onnx",
        "--name",
        "d",
        "--version",
        "1",
        "--out",
        root / "d",
    ]
    (root / "timeline.onnx").write_bytes(zoo.timeline())
    (root / "inspect").mkdir()
    (root / "inspect" / "detector.onnx").write_bytes(zoo.detector())
    argvs["inspect-detector"] = ["inspect", root / "inspect" / "detector.onnx", "--shape", "images=1x3x64x64"]
    argvs["inspect-timeline"] = ["inspect", root / "timeline.onnx"]
    argvs["package-two-batchings"] = [
        "package", root / "cnn.onnx", "--name", "c", "--version", "1", "--no-batching", "--max-batch-size", "4",
    ]  # fmt: skip
    (root / "a-file").write_text("")
    # As root, permission bits stop nothing: a data dir under a plain file fails for everyone.
    argvs["install-unwritable"] = [
        "install",
        model_packages["digits:1"],
        "--config",
        config("unwritable", root / "a-file" / "data"),
    ]
    return Runs(root, run_cli_all(argvs))


@pytest.mark.parametrize("command", ["", *COMMANDS])
def test_help_describes_each_command(runs: Runs, command: str) -> None:
    result = runs[f"help-{command}" if command else "help"]
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: edge-agent")
    if command:
        assert result.stdout.startswith(f"usage: edge-agent {command}")
    else:
        for name in COMMANDS:
            assert name in result.stdout


def test_version(runs: Runs) -> None:
    assert runs["version"].returncode == 0
    assert runs["version"].stdout.strip() == f"edge-agent {__version__}"


@pytest.mark.parametrize("name", ["unknown-command", "no-command"])
def test_bad_command_line_exits_2(runs: Runs, name: str) -> None:
    result = runs[name]
    assert result.returncode == 2
    assert "usage: edge-agent" in result.stderr
    if name == "unknown-command":
        assert "invalid choice: 'serve'" in result.stderr


def test_check_config_prints_the_effective_values(runs: Runs) -> None:
    result = runs["check-valid"]
    assert result.returncode == 0, result.stderr
    values = json.loads(result.stdout)
    assert set(values) == set(field_docs())  # every option, set or defaulted
    assert values["agent.data_dir"] == str(runs.root / "valid-data")
    assert values["agent.shutdown_grace_s"] == 3.0  # an integer where a float is due is taken as a float
    assert values["server.tcp_address"] == "127.0.0.1:9001"
    assert values["inference.max_batch_size"] == 8
    assert values["inference.max_queue_depth"] == 256  # a default
    assert values["server.unix_socket"] == "/run/edgefleet/inference.sock"


def test_check_config_takes_json_and_prints_the_same(runs: Runs) -> None:
    assert runs["check-valid-json"].returncode == 0
    assert json.loads(runs["check-valid-json"].stdout) == json.loads(runs["check-valid"].stdout)


RUN_REFUSES = {
    "public-tcp": "server.tcp_address host '0.0.0.0' is not a loopback address",
    "remote-plaintext-cloud": "cloud.grpc_target 10.1.2.3:7000 is not loopback: set cloud.ca_file",
    "no-token-file": "cloud.token_file is not set",
    "bad-metrics-address": "server.metrics_address",
    "mqtt-without-device": "mqtt.url is set but cloud.device_id is not",
}


@pytest.mark.parametrize("name", list(RUN_REFUSES))
def test_check_config_refuses_what_run_refuses(runs: Runs, name: str) -> None:
    # Caught a bug: check-config accepted a non-loopback server.tcp_address that `run` then refused.
    result = runs[f"run-refuses-{name}"]
    assert result.returncode == 2, result.stdout
    assert result.stderr.startswith("edge-agent: error: ") and RUN_REFUSES[name] in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("status-bad-timeout", "--timeout must be positive"),
        ("status-bad-option", "unrecognized arguments: --jsn"),
        ("doctor-bad-timeout", "--timeout must be positive"),
    ],
)
def test_bad_status_and_doctor_arguments_exit_2(runs: Runs, name: str, message: str) -> None:
    result = runs[name]
    assert result.returncode == 2 and message in result.stderr


@pytest.mark.parametrize("name", list(BAD_CONFIGS))
def test_bad_config_exits_2_naming_the_key(runs: Runs, name: str) -> None:
    result = runs[f"bad-{name}"]
    assert result.returncode == 2, result.stdout
    assert result.stdout == ""
    assert result.stderr.startswith(f"edge-agent: error: {runs.root / name}.toml: ")
    for fragment in BAD_CONFIGS[name][1]:
        assert fragment in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("command", ["check-config", "run", "models"])
def test_missing_config_file_exits_2_naming_the_file(runs: Runs, command: str) -> None:
    result = runs[f"missing-{command}"]
    assert result.returncode == 2
    assert f"cannot read config {runs.root / 'nowhere.toml'}: No such file or directory" in result.stderr


def _installed(data_dir: Path) -> list[str]:
    models = data_dir / "models"
    return sorted(str(p.relative_to(models)) for p in models.rglob("*")) if models.exists() else []


def test_install_refuses_a_corrupted_package(runs: Runs) -> None:
    result = runs["install-corrupted"]
    assert result.returncode == 2
    assert "digits:1: model.onnx sha256" in result.stderr
    assert "does not match the manifest" in result.stderr
    assert _installed(runs.root / "corrupted-data") == []  # nothing, not even a staging directory


@pytest.mark.parametrize("what", NOT_PACKAGES)
def test_install_refuses_what_is_not_a_package(runs: Runs, what: str) -> None:
    result = runs[f"install-{what}"]
    assert result.returncode == 2
    assert f"edge-agent: error: {runs.root / what} is not a model package" in result.stderr
    assert _installed(runs.root / f"{what}-data") == []


def test_unwritable_data_dir_exits_1_without_a_traceback(runs: Runs) -> None:
    # Caught a bug: an OSError escaped main() as a traceback instead of a one-line message.
    result = runs["install-unwritable"]
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("edge-agent: ")
    assert str(runs.root / "a-file") in result.stderr


def _models(config: Path) -> list[list[str]]:
    result = run_cli("models", "--config", config)
    assert result.returncode == 0, result.stderr
    return [line.split("\t") for line in result.stdout.splitlines()]


def test_install_activates_and_models_lists_it(
    write_config: Callable[..., Path], model_packages: dict[str, Path], tmp_path: Path
) -> None:
    config = write_config({"agent": {"data_dir": str(tmp_path / "data")}})
    result = run_cli("install", model_packages["digits:1"], "--config", config)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("digits version 1 active")
    assert _models(config) == [["digits", "1", "active"]]

    result = run_cli("install", model_packages["digits:2"], "--config", config, "--no-activate")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("digits version 2 installed")
    assert _models(config) == [["digits", "1", "active"], ["digits", "2", ""]]
    pointer = ModelStore(tmp_path / "data" / "models").active("digits")
    assert pointer is not None and pointer.version == 1
    listed = run_cli("models", "--config", config, "--json")
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout) == [
        {"name": "digits", "version": 1, "active": True, "previous": False},
        {"name": "digits", "version": 2, "active": False, "previous": False},
    ]


def test_package_writes_a_package_and_says_what_it_found(runs: Runs) -> None:
    result = runs["package-cnn"]
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"reading {runs.root / 'cnn.onnx'} (1.7 KiB)"
    assert "input   image  FP32  [-1, 3, 32, 32]" in lines
    assert "output  probabilities  FP32  [-1, 10]" in lines
    assert any(line.startswith("batching: yes, max_batch_size 32: ") for line in lines)
    assert lines[-1] == f"cnn:3 packaged: install it with `edge-agent install {runs.root / 'cnn-3'}`"
    assert read_package(runs.root / "cnn-3").manifest.ref == "cnn:3"


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("package-not-onnx", "not.onnx is not an ONNX model"),
        ("package-bad-shape", "--shape 'images=1x3xHxW': '1x3xHxW' is not sizes joined by 'x'"),
        (
            "package-no-sizes",
            "no representative size for 'images' axes [2, 3] of [-1, 3, -1, -1]: give one with --shape",
        ),
        ("package-two-batchings", "argument --max-batch-size: not allowed with argument --no-batching"),
    ],
)
def test_package_refuses_bad_input_with_exit_2(runs: Runs, name: str, message: str) -> None:
    result = runs[name]
    assert result.returncode == 2, result.stdout
    assert message in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("what", "message"),
    [
        ("truncated", "cnn:1 was not installed: cnn:1: onnxruntime cannot load the model"),
        ("zipmap-declared", "output 'probabilities' is seq(map(int64,tensor(float))) in the model, not a tensor"),
        ("lying-manifest", "manifest inputs ['pixels'] do not match the model's ['image']"),
        ("detector-bare", "the sizes of 'images' axes [2, 3] were guessed (1) because the package has no warm-up data"),
    ],
)
def test_install_refuses_a_package_that_cannot_serve_and_installs_nothing(runs: Runs, what: str, message: str) -> None:
    # Caught a bug: install only checked checksums, so these became "active" and then served nothing.
    result = runs[f"install-{what}"]
    assert result.returncode == 2, result.stdout
    assert result.stderr.startswith("edge-agent: error: ")
    assert message in result.stderr
    assert _installed(runs.root / f"{what}-data") == []


def test_inspect_says_what_package_would_write_and_writes_nothing(runs: Runs) -> None:
    result = runs["inspect-detector"]
    assert result.returncode == 0, result.stderr
    assert "input   images  FP32  [-1, 3, -1, -1]" in result.stdout
    assert "output  boxes  FP32  [-1, -1, 6]" in result.stdout
    assert result.stdout.splitlines()[-1] == "`edge-agent package` would write max_batch_size 32 (writing nothing now)"
    assert [p.name for p in (runs.root / "inspect").iterdir()] == ["detector.onnx"]
    assert not (REPO_ROOT / "manifest.json").exists()  # the command's working directory


def test_inspect_names_what_a_model_whose_axis_0_is_time_still_needs(runs: Runs) -> None:
    result = runs["inspect-timeline"]
    assert result.returncode == 2
    assert "axis 0 is not a batch axis (row 1 of output 'running' at batch 2 differs" in result.stderr
    assert "'frames' axes [0] of [-1, 4]; give it with --shape" in result.stderr


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_a_row_in_the_docs(command: str) -> None:
    table = (REPO_ROOT / "docs" / "edge-agent.md").read_text().split("## Commands", 1)[1].split("\n## ", 1)[0]
    assert f"| `edge-agent {command} " in table
