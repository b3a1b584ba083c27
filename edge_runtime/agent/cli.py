"""The edge-agent command line: run the agent, inspect and package an ONNX file, install a package, check a
config, ask a running agent for its status, and diagnose the device (doctor).

Exit codes: 0 success, 1 a runtime failure, 2 bad input (arguments, config file, ONNX file, model package).
The work is done by importable modules (models/packaging.py, models/checks.py); this module only parses
arguments, prints and maps errors to exit codes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from edge_runtime import __version__
from edge_runtime.agent.identity import apply_identity
from edge_runtime.config import AgentConfig, field_docs, load_config
from edge_runtime.errors import ConfigError, EdgeRuntimeError, EngineError, PackageError
from edgefleet.logs import configure_logging

if TYPE_CHECKING:
    from edge_runtime.models.packaging import PackageRequest

__all__ = ["main"]

DEFAULT_CONFIG = "/etc/edgefleet/edge-agent.toml"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edge-agent", description="Edgefleet's device agent.")
    parser.add_argument("--version", action="version", version=f"edge-agent {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="serve inference (what the systemd unit runs)")
    run.add_argument("--config", default=DEFAULT_CONFIG, help=f"TOML config file (default {DEFAULT_CONFIG})")

    inspect = commands.add_parser(
        "inspect",
        help="show how an ONNX file would be packaged, writing nothing",
        description="Read the ONNX file's inputs and outputs as ONNX Runtime sees them, find out whether axis 0 is "
        "a batch axis, and say what `edge-agent package` would record, or what it still needs.",
    )
    inspect.add_argument("model", type=Path, help="the ONNX file")
    _probe_arguments(inspect)

    package = commands.add_parser(
        "package",
        help="make a model package from an ONNX file",
        description="Read the ONNX file's inputs and outputs, find out whether axis 0 is a batch axis, record "
        "representative warm-up inputs or shapes, and write a package that `edge-agent install` takes.",
    )
    package.add_argument("model", type=Path, help="the ONNX file")
    package.add_argument("--name", required=True, help="model name: a-z, 0-9, '.', '_', '-'")
    package.add_argument("--version", required=True, type=int, dest="model_version", help="integer version (>= 1)")
    _probe_arguments(package)
    package.add_argument("--labels", type=Path, metavar="FILE", help="class labels, one per line")
    package.add_argument("--description", default="", help="one line for the manifest")
    package.add_argument("--out", type=Path, metavar="DIR", help="package directory to write (default: NAME-VERSION)")
    package.add_argument("--force", action="store_true", help="replace what is at --out")

    install = commands.add_parser(
        "install",
        help="check and install a model package into the data dir",
        description="Verify the package (sha256, size), load it with ONNX Runtime, match it against its manifest "
        "and warm it up; only a package that passes is installed (and, by default, made active).",
    )
    install.add_argument("package", type=Path, help="directory holding model.onnx and manifest.json")
    install.add_argument("--config", default=DEFAULT_CONFIG, help="TOML config file (for the data dir)")
    install.add_argument("--no-activate", action="store_true", help="install only; keep serving the current version")

    models = commands.add_parser("models", help="list installed model versions and which is active")
    models.add_argument("--config", default=DEFAULT_CONFIG, help="TOML config file (for the data dir)")
    _json_argument(models)

    status = commands.add_parser(
        "status",
        help="ask the running agent how it is doing",
        description="Ask the running agent over its local endpoint (server.unix_socket, else server.tcp_address): "
        "models and versions with their states and reasons, queue depths, the outbox and upload lag, the cloud and "
        "broker links, the desired generation applied, health and uptime. Exit 1 when no agent answers.",
    )
    status.add_argument("--config", default=DEFAULT_CONFIG, help=f"TOML config file (default {DEFAULT_CONFIG})")
    status.add_argument("--timeout", type=float, default=5.0, metavar="S", help="seconds to wait for an answer")
    _json_argument(status)

    doctor = commands.add_parser(
        "doctor",
        help="check this device: GPU, CUDA, TensorRT, disk, credentials, clock, cloud and broker",
        description="Run every check an operator would run by hand; each says PASS, WARN, FAIL or ABSENT and what "
        "to do. Needs no running agent. Exit 1 when any check FAILs.",
    )
    doctor.add_argument("--config", default=DEFAULT_CONFIG, help=f"TOML config file (default {DEFAULT_CONFIG})")
    doctor.add_argument("--timeout", type=float, default=3.0, metavar="S", help="seconds per network check (default 3)")
    _json_argument(doctor)

    enroll = commands.add_parser(
        "enroll",
        help="enroll this device with a one-time token",
        description="Trade a one-time enrollment token (fleetctl devices token create) for this device's identity: "
        "its id, credential, the fleet's signing key and the endpoints, written 0600 into DATA_DIR/identity/. "
        "`run` then takes every cloud and broker setting the config leaves empty from there.",
    )
    enroll.add_argument("--url", required=True, help="cloud-sync's gRPC address: HOST:PORT or grpc://HOST:PORT")
    enroll.add_argument("--token", required=True, help="the one-time enrollment token")
    enroll.add_argument("--config", default=DEFAULT_CONFIG, help="TOML config file (its data dir and CA file)")
    enroll.add_argument("--data-dir", type=Path, help="where to write the identity (default: the config's data dir)")
    enroll.add_argument("--ca-file", help="PEM CA bundle to reach cloud-sync over TLS (default: cloud.ca_file)")
    enroll.add_argument("--force", action="store_true", help="replace an existing identity")

    check = commands.add_parser(
        "check-config",
        help="validate a config file as `run` does and print the effective values",
        description="Apply every check `edge-agent run` makes before it starts (keys, types, bounds, the listen "
        "addresses, token and CA files, the cloud and broker settings, the enrolled identity), then print the "
        "effective values as JSON. Exit 2 naming the key when `run` would refuse the config.",
    )
    check.add_argument("config", help="TOML config file")
    _json_argument(check, "(the output is JSON either way)")
    return parser


def _json_argument(parser: argparse.ArgumentParser, note: str = "") -> None:
    parser.add_argument("--json", action="store_true", help=f"print JSON instead of text {note}".rstrip())


def _probe_arguments(parser: argparse.ArgumentParser) -> None:
    """What `inspect` and `package` both take: how to batch, and representative inputs or shapes."""
    batching = parser.add_mutually_exclusive_group()
    batching.add_argument(
        "--max-batch-size",
        type=int,
        metavar="B",
        help="largest batch per run; refused if axis 0 is not a batch axis (default: 32 when it is)",
    )
    batching.add_argument("--no-batching", action="store_true", help="package without a batch axis")
    parser.add_argument(
        "--warmup-inputs",
        type=Path,
        metavar="FILE.npz",
        help="one representative request: an array per input, named after it (numpy.savez)",
    )
    parser.add_argument(
        "--shape",
        action="append",
        default=[],
        metavar="INPUT=D1xD2...",
        help="representative shape of an input with variable axes (repeatable), e.g. images=1x3x640x640",
    )


def _run(config: AgentConfig) -> int:
    from edgefleet.heap import freeze_startup_heap, limit_heap_retention

    # Before onnxruntime, grpc and numpy are imported: their start-up allocations follow the threshold too
    # (measured: 152-158 MiB after serving mobilenet-bench when called after these imports).
    limit_heap_retention()
    from edge_runtime.agent.process import Agent

    freeze_startup_heap()  # what the imports made lives as long as the process: keep it out of the GC
    asyncio.run(Agent(config).run())
    return 0


def _probe_request(args: argparse.Namespace, **fields: object) -> PackageRequest:
    """The PackageRequest of the arguments `inspect` and `package` share (and `fields`)."""
    from edge_runtime.models.packaging import PackageRequest, parse_shape
    from edge_runtime.models.warmup import load_npz

    if args.max_batch_size is not None and not 1 <= args.max_batch_size <= 65536:
        raise PackageError(f"--max-batch-size must be in 1..65536, not {args.max_batch_size}")
    shapes: dict[str, tuple[int, ...]] = {}
    for text in args.shape:
        name, shape = parse_shape(text)
        if name in shapes:
            raise PackageError(f"--shape gives {name!r} twice")
        shapes[name] = shape
    return PackageRequest(
        model=args.model,
        max_batch_size=args.max_batch_size,
        batching=not args.no_batching,
        warmup_inputs=load_npz(args.warmup_inputs) if args.warmup_inputs else None,
        shapes=shapes,
        **fields,  # type: ignore[arg-type]
    )


def _inspect(args: argparse.Namespace) -> int:
    from edge_runtime.models.packaging import inspect_onnx

    found = inspect_onnx(_probe_request(args), lambda line: print(line, flush=True))
    print(f"`edge-agent package` would write max_batch_size {found.max_batch_size} (writing nothing now)")
    return 0


def _package(args: argparse.Namespace) -> int:
    from edge_runtime.models.packaging import package_model

    request = _probe_request(
        args,
        name=args.name,
        version=args.model_version,
        out=args.out or Path(f"{args.name}-{args.model_version}"),
        labels=_labels(args.labels) if args.labels else (),
        description=args.description,
        force=args.force,
    )
    result = package_model(request, lambda line: print(line, flush=True))
    m = result.package.manifest
    print(f"{m.ref} packaged: install it with `edge-agent install {result.package.directory}`")
    return 0


def _labels(path: Path) -> tuple[str, ...]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PackageError(f"cannot read --labels {path}: {getattr(exc, 'strerror', None) or exc}") from exc
    return tuple(line.strip() for line in text.splitlines() if line.strip())


def _install(config: AgentConfig, source: Path, activate: bool) -> int:
    from edge_runtime.models.checks import check_package
    from edge_runtime.models.package import read_package
    from edge_runtime.models.store import ModelStore

    package = read_package(source, verify=True)
    m = package.manifest
    # Checked before anything lands: a package that cannot serve never becomes installed, let alone active.
    try:
        report = check_package(
            package, runs=config.engine.warmup_inferences, intra_op_threads=config.engine.intra_op_threads
        )
    except EngineError as exc:
        raise PackageError(f"{m.ref} was not installed: {exc}") from exc
    store = ModelStore(config.data_dir / "models")
    store.install(source)
    if activate:
        store.set_active(m.name, m.version)
    state = "active" if activate else "installed"
    print(
        f"{m.name} version {m.version} {state} ({m.size} bytes, sha256 {m.sha256[:12]}…); loaded, matched its "
        f"manifest and passed {config.engine.warmup_inferences} warm-up inference(s) on {report.warmup_source} "
        f"in {report.seconds:.2f} s; a running agent serves it after its next start"
    )
    if report.guessed:
        print(f"note: warm-up guessed size 1 for {', '.join(report.guessed)}: the package has no warm-up data")
    return 0


def _models(config: AgentConfig, as_json: bool) -> int:
    from edge_runtime.models.store import ModelStore

    store = ModelStore(config.data_dir / "models")
    rows = []
    for name in store.names():
        pointer = store.active(name)
        for version in store.versions(name):
            active = bool(pointer and pointer.version == version)
            previous = bool(pointer and pointer.previous == version)
            rows.append({"name": name, "version": version, "active": active, "previous": previous})
    if as_json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        mark = "active" if row["active"] else ("previous" if row["previous"] else "")
        print(f"{row['name']}\t{row['version']}\t{mark}")
    return 0


def _status(config: AgentConfig, as_json: bool, timeout_s: float) -> int:
    from edge_runtime.agent.status import NotRunning, local_targets, query, render
    from edge_runtime.agent.status import as_json as status_json

    if timeout_s <= 0:
        raise ConfigError(f"--timeout must be positive, not {timeout_s}")
    try:
        status = query(local_targets(config), timeout_s)
    except NotRunning as exc:
        print(f"edge-agent: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(status_json(status), indent=2) if as_json else render(status))
    return 0


def _doctor(config_path: str, as_json: bool, timeout_s: float) -> int:
    from edge_runtime.agent.doctor import FAIL, render, run_checks

    if timeout_s <= 0:
        raise ConfigError(f"--timeout must be positive, not {timeout_s}")
    checks = run_checks(config_path, timeout_s=timeout_s)
    if as_json:
        print(json.dumps([check.as_dict() for check in checks], indent=2))
    else:
        print(render(checks))
    return 1 if any(check.result == FAIL for check in checks) else 0


def _enroll(args: argparse.Namespace) -> int:
    from edge_runtime.agent.enroll import EnrollmentRefused, enroll

    # The config (for the data dir and cloud.ca_file) may be absent when --data-dir is given.
    config = AgentConfig()
    if args.data_dir is None or Path(args.config).exists():
        config = load_config(args.config)
    data_dir = args.data_dir or config.data_dir
    try:
        identity = enroll(
            args.url, args.token, data_dir, ca_file=args.ca_file or config.cloud.ca_file, force=args.force
        )
    except EnrollmentRefused as exc:
        print(f"edge-agent: error: {exc}", file=sys.stderr)
        return 2
    labels = ",".join(f"{k}={v}" for k, v in sorted(identity.labels.items()))
    print(
        f"enrolled as {identity.device_id}{f' ({labels})' if labels else ''}: identity in {identity.directory}; "
        f"cloud-sync {identity.grpc_target}, broker {identity.mqtt_url or 'none (control over gRPC)'}"
    )
    return 0


def _check(config: AgentConfig) -> int:
    from edge_runtime.agent.preflight import preflight

    preflight(config)  # exactly what `run` checks before it opens anything
    docs = field_docs()
    values = {}
    for key in docs:
        section, name = key.split(".", 1)
        values[key] = getattr(getattr(config, section), name)
    print(json.dumps(values, indent=2))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command in ("inspect", "package"):
            configure_logging("warning", sys.stderr)
            return _inspect(args) if args.command == "inspect" else _package(args)
        if args.command == "enroll":
            configure_logging("warning", sys.stderr)
            return _enroll(args)
        if args.command == "doctor":
            configure_logging("error", sys.stderr)
            return _doctor(args.config, args.json, args.timeout)
        config = load_config(args.config)
        if args.command in ("run", "install", "models", "check-config"):
            config = apply_identity(config)
        if args.command == "run":
            configure_logging(config.agent.log_level)
            return _run(config)  # the Agent runs preflight() first, as check-config does
        configure_logging("warning", sys.stderr)
        if args.command == "install":
            return _install(config, args.package, not args.no_activate)
        if args.command == "models":
            return _models(config, args.json)
        if args.command == "status":
            return _status(config, args.json, args.timeout)
        return _check(config)
    except (ConfigError, PackageError) as exc:
        print(f"edge-agent: error: {exc}", file=sys.stderr)
        return 2
    except EdgeRuntimeError as exc:
        print(f"edge-agent: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # the data dir unwritable, a disk full: say what, without a traceback
        print(f"edge-agent: {exc}", file=sys.stderr)
        return 1
    except ModuleNotFoundError as exc:  # a base install without the device runtime
        print(
            f"edge-agent: {exc.name} is not installed: install the agent with pip install 'edgefleet[agent]'",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
