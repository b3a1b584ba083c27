"""fleetctl models: push model packages to the registry, list, show, sign again, delete.

`models push PATH` takes a package directory (manifest.json + model.onnx [+ warmup.npz], as `edge-agent
package` writes it) or a bare .onnx file, which it packages first with the device runtime's packager (needs
`pip install edgefleet[agent]`). Each file is uploaded once (a blob the registry holds is skipped), then the
manifest is registered and signed. Not for assigning versions to devices (fleetctl_state.py).
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import httpx
import structlog
import typer
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn
from rich.table import Table
from rich.text import Text

from cloud_sync.errors import InvalidArgument
from cloud_sync.fleetctl_session import Session, detail, err, fail, out, segment, session, when
from cloud_sync.selectors import format_selector, parse_selector

__all__ = ["models_app", "models_compare", "parse_duration"]

models_app = typer.Typer(help="Model registry: push packages, list, show, sign again, delete.", no_args_is_help=True)

MANIFEST_FILE = "manifest.json"
MODEL_FILE = "model.onnx"
WARMUP_FILE = "warmup.npz"
_READ_BYTES = 1024 * 1024
_DURATION = re.compile(r"^\s*(\d+)\s*([smhd]?)\s*$")
_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
# The API's range for expires_in_s (api_models.py), not imported so fleetctl stays light.
_MIN_EXPIRES_S, _MAX_EXPIRES_S = 60, 5 * 365 * 86400

NameArgument = Annotated[str, typer.Argument(help="model name, e.g. digits")]
VersionArgument = Annotated[int, typer.Argument(min=1, max=2**31 - 1, help="model version")]
ExpiresOption = Annotated[str, typer.Option("--expires", help="how long the signature is valid: 30d, 12h, 90m, 3600s")]


def parse_duration(text: str) -> int:
    """Seconds in "30d", "12h", "90m", "3600s" or "3600"; ValueError otherwise."""
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f"{text!r} is not a duration such as 30d, 12h, 90m or 3600s")
    seconds = int(match.group(1)) * _UNIT_S[match.group(2)]
    if not _MIN_EXPIRES_S <= seconds <= _MAX_EXPIRES_S:
        raise ValueError(f"{text!r} is outside 60s..{_MAX_EXPIRES_S // 86400}d")
    return seconds


def _expires(text: str) -> int:
    try:
        return parse_duration(text)
    except ValueError as exc:
        fail(2, f"--expires: {exc}")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(_READ_BYTES):
            digest.update(block)
    return digest.hexdigest()


def _package_files(directory: Path) -> tuple[dict[str, Any], dict[str, Path]]:
    """(manifest, {sha256: file}) of a package directory, each file checked against the manifest."""
    try:
        manifest = json.loads((directory / MANIFEST_FILE).read_bytes())
    except FileNotFoundError:
        fail(2, f"{directory} has no {MANIFEST_FILE}: give a package directory (edge-agent package) or a .onnx")
    except (OSError, ValueError) as exc:
        fail(2, f"cannot read {directory / MANIFEST_FILE}: {exc}")
    if not isinstance(manifest, dict):
        fail(2, f"{directory / MANIFEST_FILE} is not a JSON object")
    wanted = [(MODEL_FILE, manifest.get("sha256"), manifest.get("size"))]
    warmup = manifest.get("warmup")
    if isinstance(warmup, dict) and warmup.get("file"):
        wanted.append((WARMUP_FILE, warmup.get("sha256"), warmup.get("size")))
    files: dict[str, Path] = {}
    for name, sha, size in wanted:
        path = directory / name
        if not path.is_file():
            fail(2, f"{path} is missing: the manifest names it")
        found = _sha256(path)
        if found != sha or path.stat().st_size != size:
            fail(
                2, f"{path} does not match {MANIFEST_FILE} (sha256 {found}, {path.stat().st_size} bytes): repackage it"
            )
        files[found] = path
    return manifest, files


def _package_onnx(path: Path, name: str, version: int, out: Path) -> Path:
    """A package of the bare ONNX file `path`, made by the device runtime's packager in `out`."""
    try:
        from edge_runtime.errors import EdgeRuntimeError
        from edge_runtime.models.packaging import PackageRequest, package_model
    except ImportError:
        fail(
            2,
            f"{path} is a bare .onnx: packaging it needs the device runtime (pip install edgefleet[agent]); "
            "or push a package directory made by `edge-agent package`",
        )
    if not name or not version:
        fail(2, "a bare .onnx needs --name and --version")
    # The runtime logs (engine.loaded) go to stderr: stdout is the command's output (--json).
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    try:
        result = package_model(PackageRequest(model=path, name=name, version=version, out=out))
    except EdgeRuntimeError as exc:
        fail(2, f"cannot package {path}: {exc}")
    return result.package.directory


def _upload(s: Session, sha: str, path: Path) -> bool:
    """Upload `path` as blob `sha` unless the registry has it; whether it was sent."""
    url = f"{s.url}/v1/blobs/{sha}"
    headers = {"Authorization": f"Bearer {s.token}"}
    try:
        if httpx.head(url, headers=headers, timeout=30).status_code == 200:
            return False
        size = path.stat().st_size
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            console=err,
            disable=s.as_json,
        ) as progress:
            task = progress.add_task(f"uploading {path.name}", total=size)

            def body() -> Iterator[bytes]:
                with path.open("rb") as f:
                    while block := f.read(_READ_BYTES):
                        progress.advance(task, len(block))
                        yield block

            headers["Content-Length"] = str(size)
            response = httpx.put(url, content=body(), headers=headers, timeout=300)
    except httpx.HTTPError as exc:
        fail(1, f"cannot reach cloud-sync at {s.url} ({exc}); is it running? (--url / FLEETCTL_URL)")
    if response.status_code >= 400:
        code = {401: 3, 403: 3}.get(response.status_code, 2 if response.status_code < 500 else 1)
        fail(code, f"cloud-sync refused {path.name} ({response.status_code}): {detail(response)}")
    return True


def _lineage(manifest: dict[str, Any]) -> tuple[str, str, str]:
    """(parent, method, precision) of a compressed variant's manifest, as printed; ("-", "-", "-") for a
    version made as built. Read leniently: the registry checks only the fields it relies on."""
    lineage = manifest.get("lineage")
    if lineage is None:
        return "-", "-", "-"
    lineage = lineage if isinstance(lineage, dict) else {}
    parent = lineage.get("parent")
    version = parent.get("version") if isinstance(parent, dict) else None
    shown = f"{manifest.get('name', '?')}:{version}" if isinstance(version, int) else "?"
    return shown, str(lineage.get("method") or "?"), str(lineage.get("precision") or "?")


def _print_version(version: dict[str, Any]) -> None:
    files = ", ".join(f"{name} {f['size']} bytes" for name, f in version["files"].items())
    out.print(Text(f"{version['name']}:{version['version']}", style="bold"))
    out.print(Text(f"  sha256 {version['sha256']}; {files}"))
    if version["manifest"].get("lineage") is not None:
        parent, method, precision = _lineage(version["manifest"])
        out.print(Text(f"  variant of {parent}: {method}, computes in {precision}"))
    out.print(
        Text(
            f"  signed by {version['key_id']} serial {version['serial']} at {when(version['signed_at_ms'])}, "
            f"expires {when(version['expires_at_ms'])}"
        )
    )


@models_app.command("push")
def models_push(
    ctx: typer.Context,
    path: Annotated[Path, typer.Argument(help="a package directory, or a bare .onnx file (packaged first)")],
    name: Annotated[str, typer.Option(help="model name (a bare .onnx; a package names its own)")] = "",
    version: Annotated[int, typer.Option(min=0, max=2**31 - 1, help="model version (a bare .onnx)")] = 0,
    expires: ExpiresOption = "30d",
) -> None:
    """Upload a model package's files and register (sign) the version."""
    s = session(ctx)
    expires_in_s = _expires(expires)
    with tempfile.TemporaryDirectory(prefix="fleetctl-push-") as tmp:
        if path.is_file() and path.suffix == ".onnx":
            directory = _package_onnx(path, name, version, Path(tmp) / "package")
        elif path.is_dir():
            directory = path
        else:
            fail(2, f"{path} is neither a package directory nor a .onnx file")
        manifest, files = _package_files(directory)
        for key, given in (("name", name), ("version", version)):
            if given and manifest.get(key) != given:
                fail(2, f"--{key} {given} differs from the package's {key} {manifest.get(key)!r}")
        sent = [p.name for sha, p in files.items() if _upload(s, sha, p)]
    created = s.call("POST", "/v1/models", json={"manifest": manifest, "expires_in_s": expires_in_s})
    if s.as_json:
        out.print_json(data=created)
        return
    skipped = len(files) - len(sent)
    out.print(
        Text(
            f"pushed {created['name']}:{created['version']} (uploaded {', '.join(sent) or 'nothing'}"
            f"{f', {skipped} file(s) already there' if skipped else ''}; serial {created['serial']}, expires "
            f"{when(created['expires_at_ms'])})"
        )
    )


@models_app.command("list")
def models_list(
    ctx: typer.Context, name: Annotated[str | None, typer.Option(help="only this model's versions")] = None
) -> None:
    """Registered model versions."""
    s = session(ctx)
    versions = s.call("GET", "/v1/models", params={"name": name} if name else None)["models"]
    if s.as_json:
        out.print_json(data=versions)
        return
    table = Table("model", "version", "size", "sha256", "variant of", "method", "precision", "serial", "expires")
    for v in versions:
        parent, method, precision = _lineage(v["manifest"])
        table.add_row(
            Text(v["name"]),
            str(v["version"]),
            str(v["size"]),
            v["sha256"][:16],
            Text(parent),
            Text(method),
            Text(precision),
            str(v["serial"]),
            when(v["expires_at_ms"]),
        )
    out.print(table)


@models_app.command("show")
def models_show(ctx: typer.Context, name: NameArgument, version: VersionArgument) -> None:
    """A version: its files, signature and manifest."""
    s = session(ctx)
    found = s.call("GET", f"/v1/models/{segment(name)}/{version}")
    if s.as_json:
        out.print_json(data=found)
        return
    _print_version(found)
    out.print_json(data=found["manifest"])


@models_app.command("sign")
def models_sign(
    ctx: typer.Context, name: NameArgument, version: VersionArgument, expires: ExpiresOption = "30d"
) -> None:
    """Sign a version again (a new expiry, a new serial): devices then refuse the older envelope."""
    s = session(ctx)
    body = {"expires_in_s": _expires(expires)}
    found = s.call("POST", f"/v1/models/{segment(name)}/{version}/sign", json=body)
    if s.as_json:
        out.print_json(data=found)
        return
    _print_version(found)


@models_app.command("delete")
def models_delete(ctx: typer.Context, name: NameArgument, version: VersionArgument) -> None:
    """Delete a version no device is assigned (refused, naming them, otherwise), and its unshared files."""
    s = session(ctx)
    found = s.call("DELETE", f"/v1/models/{segment(name)}/{version}")
    if s.as_json:
        out.print_json(data=found)
        return
    out.print(Text(f"deleted {found['name']}:{found['version']}"))


# The compare table's rows: (figure, label, how to print a value).
_COMPARED = (
    ("p50_ms", "latency p50 (ms)", "{:.3g}"),
    ("p95_ms", "latency p95 (ms)", "{:.3g}"),
    ("p99_ms", "latency p99 (ms)", "{:.3g}"),
    ("requests_per_s", "throughput (requests/s)", "{:.4g}"),
    ("error_rate", "error rate", "{:.2%}"),
    ("cpu_seconds_per_inference", "CPU-seconds / inference", "{:.3g}"),
    ("joules_per_inference", "joules / inference", "{:.3g}"),
    ("size_bytes", "model.onnx size (bytes)", "{}"),
    ("shadow_role_agreement", "agreement as a shadow", "{:.2%}"),
    ("shadow_role_compared", "rows compared as a shadow", "{}"),
    ("devices", "devices reporting", "{}"),
    ("requests", "requests", "{}"),
)


def _made(figures: dict[str, Any]) -> str:
    """The compare table's precision cell: a variant's precision and lineage, else "as built"."""
    lineage = figures.get("lineage")
    if lineage is None:
        return "as built" if figures.get("registered") else "not registered"
    parent = lineage["parent"]
    return f"{lineage['precision'] or '?'} ({lineage['method'] or '?'} of {parent['name']}:{parent['version']})"


def _seconds(option: str, text: str, low_s: int, high_s: int, bounds: str, examples: str) -> int:
    """The seconds of a duration option ("90m"), or exit 2 naming the option, its bounds and examples."""
    match = _DURATION.match(text)
    seconds = int(match.group(1)) * _UNIT_S[match.group(2)] if match else 0
    if not low_s <= seconds <= high_s:
        fail(2, f"{option} {text!r} is not a duration in {bounds}, such as {examples}")
    return seconds


def _since(text: str) -> int:
    return _seconds("--since", text, 1, 30 * 86400, "1s..30d", "1h, 90m or 3600s")


@models_app.command("compare")
def models_compare(
    ctx: typer.Context,
    a: Annotated[str, typer.Argument(help="version A, name:version, e.g. digits:1")],
    b: Annotated[str, typer.Argument(help="version B, name:version, e.g. digits:2")],
    selector: Annotated[str, typer.Option(help="only devices it matches: key=value,...; '*' or '' for all")] = "",
    since: Annotated[str, typer.Option(help="the window: the last 1h, 90m, 3600s, 1d")] = "1h",
) -> None:
    """Two versions on the same devices: latency, throughput, errors, cost per inference, size, precision and
    lineage, agreement as a shadow."""
    for what, ref in (("A", a), ("B", b)):
        name, sep, version = ref.partition(":")
        if not name or not sep or not version.isdigit():
            fail(2, f"{what} {ref!r} is not name:version, e.g. digits:2")
    try:
        # As the API takes it: key=value,... with no spaces.
        selector = format_selector(parse_selector(selector))
    except InvalidArgument as exc:
        fail(2, f"--selector: {exc.message}")
    params = {"a": a, "b": b, "selector": "" if selector == "*" else selector, "since_s": _since(since)}
    s = session(ctx)
    found = s.call("GET", "/v1/models/compare", params=params)
    if s.as_json:
        out.print_json(data=found)
        return
    first, second, ratio = found["a"], found["b"], found["relative"]
    out.print(
        Text(
            f"{a} vs {b} on {found['selector_text']} ({found['devices_selected']} devices), "
            f"the last {found['since_s']} s"
        )
    )
    table = Table("figure")
    for header in (Text(a), Text(b), Text("B / A")):
        table.add_column(header)
    table.add_row("precision (lineage)", Text(_made(first)), Text(_made(second)), "")
    for key, label, shape in _COMPARED:
        x, y = first.get(key), second.get(key)
        table.add_row(
            label,
            shape.format(x) if x is not None else "-",
            shape.format(y) if y is not None else "-",
            f"{ratio[key]:.2f}x" if ratio.get(key) is not None else "-",
        )
    out.print(table)


@models_app.command("series")
def models_series(
    ctx: typer.Context,
    name: NameArgument,
    selector: Annotated[str, typer.Option(help="only devices it matches: key=value,...; '*' or '' for all")] = "",
    since: Annotated[str, typer.Option(help="how far back: 15m, 1h, 1d (at most 7d)")] = "15m",
    step: Annotated[str, typer.Option(help="one point per step: 10s..1h")] = "1m",
) -> None:
    """A model's versions over time, a point per step: latency p50/p99, throughput, error rate (the dashboard's
    charts, as a table)."""
    since_s = _seconds("--since", since, 60, 7 * 86400, "1m..7d", "15m, 1h or 1d")
    step_s = _seconds("--step", step, 10, 3600, "10s..1h", "1m or 30s")
    try:
        selector = format_selector(parse_selector(selector))
    except InvalidArgument as exc:
        fail(2, f"--selector: {exc.message}")
    params: dict[str, Any] = {"model": name, "since_s": since_s, "step_s": step_s}
    if selector not in ("", "*"):
        params["selector"] = selector
    s = session(ctx)
    found = s.call("GET", "/v1/models/series", params=params)
    if s.as_json:
        out.print_json(data=found)
        return
    if not any(v["points"] for v in found["versions"]):
        out.print(Text(f"no telemetry of {name} in the last {since_s} s"))
        return
    table = Table("version", "from", "p50 ms", "p99 ms", "requests/s", "error rate")
    for entry in found["versions"]:
        for point in entry["points"]:
            table.add_row(
                f"{name}:{entry['version']}",
                when(point["t_ms"]),
                "-" if point["p50_ms"] is None else f"{point['p50_ms']:.3g}",
                "-" if point["p99_ms"] is None else f"{point['p99_ms']:.3g}",
                f"{point['requests_per_s']:.4g}",
                "-" if point["error_rate"] is None else f"{point['error_rate']:.2%}",
            )
    out.print(table)
