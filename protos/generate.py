"""Generate the Python code (and mypy stubs) for protos/ into edgefleet/proto/.

Run `python protos/generate.py` after changing a .proto; tests/test_proto_drift.py fails when the
checked-in code no longer matches. protoc names imports after the proto package (`from edgefleet.v1
import ...`); we rewrite them to live under `edgefleet.proto` (the package both sides share), so no generic
top-level `inference` package is installed (the rewrite is three regexes; protoletariat does the same but pins
old protoc plugins).
"""

from __future__ import annotations

import argparse
import filecmp
import re
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
TARGET = ROOT / "edgefleet" / "proto"
PACKAGE = "edgefleet.proto"
TOP_LEVEL = ("edgefleet", "inference")

_IMPORT_RES = [
    # from edgefleet.v1 import state_pb2 as ...
    (
        re.compile(rf"^(\s*)from ({'|'.join(TOP_LEVEL)})(\.[\w.]*)? import ", re.M),
        lambda m: f"{m.group(1)}from {PACKAGE}.{m.group(2)}{m.group(3) or ''} import ",
    ),
    # import edgefleet.v1.state_pb2 (as ...)
    (
        re.compile(rf"^(\s*)import ({'|'.join(TOP_LEVEL)})\.", re.M),
        lambda m: f"{m.group(1)}import {PACKAGE}.{m.group(2)}.",
    ),
]


def proto_files() -> list[Path]:
    return sorted(PROTO_ROOT.rglob("*.proto"))


def _plugin(name: str) -> str:
    exe = Path(sys.executable).parent / name
    found = exe if exe.exists() else shutil.which(name)
    if not found:
        raise SystemExit(f"{name} not found: install the dev extra (pip install -e '.[dev]')")
    return str(found)


def _protoc(args: list[str]) -> None:
    from grpc_tools import protoc  # build-time only: grpcio-tools is a dev dependency

    include = str(Path(protoc.__file__).parent / "_proto")
    code = protoc.main(["grpc_tools.protoc", f"-I{PROTO_ROOT}", f"-I{include}", *args])
    if code != 0:
        raise SystemExit(f"protoc failed with exit code {code}")


def generate(out: Path) -> None:
    """Write the generated package tree for every proto into `out`."""
    files = [str(p.relative_to(PROTO_ROOT)) for p in proto_files()]
    with_services = [f for f in files if re.search(r"^service ", (PROTO_ROOT / f).read_text(), re.M)]
    _protoc(
        [
            f"--plugin=protoc-gen-mypy={_plugin('protoc-gen-mypy')}",
            f"--python_out={out}",
            f"--mypy_out=quiet:{out}",
            *files,
        ]
    )
    _protoc(
        [
            f"--plugin=protoc-gen-mypy_grpc={_plugin('protoc-gen-mypy_grpc')}",
            f"--grpc_python_out={out}",
            f"--mypy_grpc_out=quiet:{out}",
            *with_services,
        ]
    )
    for path in sorted(out.rglob("*.py*")):
        text = path.read_text()
        for regex, repl in _IMPORT_RES:
            text = regex.sub(repl, text)
        path.write_text(text)
    for directory in [out, *(d for d in out.rglob("*") if d.is_dir())]:
        (directory / "__init__.py").touch()
    (out / "__init__.py").write_text(
        '"""Generated protobuf and gRPC code for protos/ (do not edit; run protos/generate.py)."""\n'
    )
    (out / "py.typed").touch()


def differences(expected: Path, actual: Path) -> list[str]:
    """Relative paths that differ between two generated trees (missing on either side included)."""

    def listing(root: Path) -> set[str]:
        return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts}

    left, right = listing(expected), listing(actual)
    changed = {p for p in left & right if not filecmp.cmp(expected / p, actual / p, shallow=False)}
    return sorted((left ^ right) | changed)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report drift; exit 1 if any")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp) / "proto"
        fresh.mkdir()
        generate(fresh)
        drift = differences(fresh, TARGET) if TARGET.exists() else ["(edgefleet/proto missing)"]
        if args.check:
            for path in drift:
                print(f"drift: {path}")
            return 1 if drift else 0
        if TARGET.exists():
            shutil.rmtree(TARGET)
        shutil.copytree(fresh, TARGET)
        print(f"generated {len(proto_files())} protos into {TARGET.relative_to(ROOT)} ({len(drift)} files changed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
