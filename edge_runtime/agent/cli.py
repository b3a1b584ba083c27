"""The edge-agent command line: run the agent, install a model package, check a config.

Exit codes: 0 success, 1 a runtime failure, 2 bad input (arguments, config file, model package).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from edge_runtime import __version__
from edge_runtime.config import AgentConfig, field_docs, load_config
from edge_runtime.errors import ConfigError, EdgeRuntimeError, PackageError
from edgefleet.logs import configure_logging

__all__ = ["main"]

DEFAULT_CONFIG = "/etc/edgefleet/edge-agent.toml"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edge-agent", description="Edgefleet's device agent.")
    parser.add_argument("--version", action="version", version=f"edge-agent {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="serve inference (what the systemd unit runs)")
    run.add_argument("--config", default=DEFAULT_CONFIG, help=f"TOML config file (default {DEFAULT_CONFIG})")

    install = commands.add_parser("install", help="verify and install a model package into the data dir")
    install.add_argument("package", type=Path, help="directory holding model.onnx and manifest.json")
    install.add_argument("--config", default=DEFAULT_CONFIG, help="TOML config file (for the data dir)")
    install.add_argument("--no-activate", action="store_true", help="install only; keep serving the current version")

    models = commands.add_parser("models", help="list installed model versions and which is active")
    models.add_argument("--config", default=DEFAULT_CONFIG, help="TOML config file (for the data dir)")

    check = commands.add_parser("check-config", help="validate a config file and print the effective values")
    check.add_argument("config", help="TOML config file")
    return parser


def _run(config: AgentConfig) -> int:
    from edgefleet.heap import freeze_startup_heap, limit_heap_retention

    # Before onnxruntime, grpc and numpy are imported: their start-up allocations follow the threshold too
    # (measured: 152-158 MiB after serving mobilenet-bench when called after these imports).
    limit_heap_retention()
    from edge_runtime.agent.process import Agent

    freeze_startup_heap()  # what the imports made lives as long as the process: keep it out of the GC
    asyncio.run(Agent(config).run())
    return 0


def _install(config: AgentConfig, package: Path, activate: bool) -> int:
    from edge_runtime.models.store import ModelStore

    store = ModelStore(config.data_dir / "models")
    installed = store.install(package)
    m = installed.manifest
    if activate:
        store.set_active(m.name, m.version)
    state = "active" if activate else "installed"
    print(
        f"{m.name} version {m.version} {state} ({m.size} bytes, sha256 {m.sha256[:12]}…); "
        "a running agent serves it after its next start"
    )
    return 0


def _models(config: AgentConfig) -> int:
    from edge_runtime.models.store import ModelStore

    store = ModelStore(config.data_dir / "models")
    for name in store.names():
        pointer = store.active(name)
        for version in store.versions(name):
            mark = (
                "active"
                if pointer and pointer.version == version
                else ("previous" if pointer and pointer.previous == version else "")
            )
            print(f"{name}\t{version}\t{mark}")
    return 0


def _check(config: AgentConfig) -> int:
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
        config = load_config(args.config)
        if args.command == "run":
            configure_logging(config.agent.log_level)
            return _run(config)
        configure_logging("warning", sys.stderr)
        if args.command == "install":
            return _install(config, args.package, not args.no_activate)
        if args.command == "models":
            return _models(config)
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
