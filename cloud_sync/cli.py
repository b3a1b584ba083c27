"""The cloud-sync command line: run the aggregator, and the few things done on its host directly.

Exit codes: 0 success, 1 a runtime failure (database unreachable...), 2 bad input (arguments, config).
Everything an operator does day to day goes through the admin API with fleetctl instead.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from cloud_sync.errors import AlreadyExists, CloudSyncError, InvalidArgument

if TYPE_CHECKING:
    from cloud_sync.config import CloudSyncConfig

__all__ = ["main"]


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("edgefleet")
    except PackageNotFoundError:  # a source tree that was never installed
        return "unknown"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cloud-sync", description="Edgefleet's cloud aggregator.")
    parser.add_argument("--version", action="version", version=f"cloud-sync {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = commands.add_parser("run", help="serve devices (gRPC) and operators (admin API)")
    run.add_argument("--config", help="TOML config file (default: built-in defaults)")
    token = commands.add_parser("admin-token", help="print the admin API token (made by the first run)")
    token.add_argument("--config", help="TOML config file (for the data dir)")
    token.add_argument(
        "--create",
        action="store_true",
        help="make the token (and the data dir) when there is none yet, before the first run",
    )
    add = commands.add_parser("add-device", help="register a device and print its token (shown once)")
    add.add_argument("device_id", help="unique device id, e.g. cam-17")
    add.add_argument("--labels", default="", help="comma-separated key=value pairs, e.g. site=lab,cam=front")
    add.add_argument("--config", help="TOML config file (for the database)")
    check = commands.add_parser("check-config", help="validate a config file and print the effective values")
    check.add_argument("config", help="the TOML file to check (the same checks `run` makes before it starts)")
    return parser


def parse_labels(text: str) -> dict[str, str]:
    """'site=lab,cam=front' -> {'site': 'lab', 'cam': 'front'}; InvalidArgument names a bad pair."""
    labels: dict[str, str] = {}
    for pair in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise InvalidArgument(f"label {pair!r} is not key=value")
        try:
            pair.encode("utf-8")
        except UnicodeEncodeError:
            # A command-line argument that was not UTF-8 arrives with surrogate escapes.
            raise InvalidArgument(f"label {pair!r} is not valid UTF-8") from None
        labels[key.strip()] = value.strip()
    return labels


def _run(config: CloudSyncConfig) -> int:
    from cloud_sync.process import CloudSync
    from edgefleet.heap import freeze_startup_heap
    from edgefleet.logs import configure_logging

    configure_logging(config.server.log_level)
    freeze_startup_heap()  # as edge-agent: the imports' objects live as long as the process
    asyncio.run(CloudSync(config).run())
    return 0


def _add_device(config: CloudSyncConfig, device_id: str, labels: str) -> int:
    parsed = parse_labels(labels)
    from cloud_sync.store import DeviceRegistry, open_database

    config.data_dir.mkdir(parents=True, exist_ok=True)  # the SQLite file's home, as `run` makes it
    db = open_database(config.database_url)
    try:
        token = DeviceRegistry(db).add_device(device_id, parsed)
    finally:
        db.close()
    print(token)
    return 0


def _admin_token(config: CloudSyncConfig, config_path: str | None, *, create: bool) -> int:
    """Print the token; without --create only one that exists: a wrong --config (another data dir) must never
    mint a token the running server does not know, which every later call would then fail with (401)."""
    from cloud_sync.admin_token import ADMIN_TOKEN_FILE, admin_token

    if not create and not (config.data_dir / ADMIN_TOKEN_FILE).exists():
        run = f"cloud-sync run --config {config_path}" if config_path else "cloud-sync run"
        raise InvalidArgument(
            f"no admin token in {config.data_dir.resolve()} (server.data_dir): is this the config cloud-sync runs "
            f"with? `{run}` makes the token on its first start; pass --create to make it before that"
        )
    config.data_dir.mkdir(parents=True, exist_ok=True)
    print(admin_token(config.data_dir))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # Imported here: fleetctl imports this module for parse_labels and need not pay for pydantic at start-up.
    from cloud_sync.config import load_config

    try:
        config = load_config(args.config)
        if args.command == "run":
            return _run(config)
        if args.command == "admin-token":
            return _admin_token(config, args.config, create=args.create)
        if args.command == "add-device":
            return _add_device(config, args.device_id, args.labels)
        print(json.dumps(config.model_dump(), indent=2))
        return 0
    except (InvalidArgument, AlreadyExists) as exc:
        print(f"cloud-sync: error: {exc.message}", file=sys.stderr)
        return 2
    except CloudSyncError as exc:
        print(f"cloud-sync: {exc.message}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"cloud-sync: {exc}", file=sys.stderr)
        return 1
    except ModuleNotFoundError as exc:  # a base or fleetctl-only install
        print(
            f"cloud-sync: {exc.name} is not installed: install it with pip install 'edgefleet[cloud]'", file=sys.stderr
        )
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
