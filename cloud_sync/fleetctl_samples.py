"""fleetctl samples: the inputs devices kept (random samples and hard examples), listed and exported.

`samples list --model digits:1 --reason uncertain --since 24h` shows who kept what and why; `samples export ...
--format npz|parquet --out DIR` writes DIR/samples.<ext> and DIR/manifest.json for labelling and retraining.
Over GET /v1/samples and /v1/samples/export (cloud_sync/api_samples.py). Needs neither numpy nor pyarrow,
except pyarrow to read a Parquet export's manifest.
"""

from __future__ import annotations

import json
import os
import re
import zipfile
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn
from rich.table import Table
from rich.text import Text

from cloud_sync.fleetctl_models import _seconds
from cloud_sync.fleetctl_session import Session, detail, err, fail, out, session, when

__all__ = ["samples_app"]

samples_app = typer.Typer(
    help="Samples devices kept (random and hard examples): list them, export them for labelling.",
    no_args_is_help=True,
)

REASONS = ("random", "uncertain", "disagreement")
FORMATS = ("npz", "parquet")
# The API's bounds (api_samples.py), not imported so fleetctl stays light.
MAX_LIST, MAX_EXPORT = 1000, 10_000
_MODEL = re.compile(r"^([a-z0-9][a-z0-9._-]{0,62})(?::([0-9]{1,10}))?$")
_READ_BYTES = 1024 * 1024

ModelOption = Annotated[str, typer.Option("--model", help="name or name:version, e.g. digits or digits:1")]
ReasonOption = Annotated[str | None, typer.Option("--reason", help="random, uncertain or disagreement")]
SinceOption = Annotated[str | None, typer.Option("--since", help="kept in the last: 24h, 90m, 7d")]
DeviceOption = Annotated[str | None, typer.Option("--device", help="only this device's")]
EngineOption = Annotated[str | None, typer.Option("--engine", help="only answers of this engine")]
AfterOption = Annotated[int, typer.Option("--after", min=0, help="samples with a larger id (the cursor)")]


def _filters(
    model: str, reason: str | None, since: str | None, device: str | None, engine: str | None
) -> dict[str, Any]:
    """The query parameters, or exit 2 naming the bad option."""
    match = _MODEL.match(model)
    if not match:
        fail(2, f"--model {model!r} is not a model name or name:version, such as digits or digits:1")
    params: dict[str, Any] = {"model": match.group(1)}
    if match.group(2) is not None:
        version = int(match.group(2))
        if not 1 <= version < 2**32:
            fail(2, f"--model {model!r}: the version must be 1..{2**32 - 1}")
        params["version"] = version
    if reason is not None:
        if reason not in REASONS:
            fail(2, f"--reason {reason!r} is not one of {', '.join(REASONS)}")
        params["reason"] = reason
    if since is not None:
        params["since_s"] = _seconds("--since", since, 1, 365 * 86400, "1s..365d", "24h, 90m or 7d")
    if device is not None:
        params["device"] = device
    if engine is not None:
        params["engine"] = engine
    return params


def _limit(limit: int, most: int) -> int:
    if not 1 <= limit <= most:
        fail(2, f"--limit {limit} is outside 1..{most}")
    return limit


@samples_app.command("list")
def samples_list(
    ctx: typer.Context,
    model: ModelOption,
    reason: ReasonOption = None,
    since: SinceOption = None,
    device: DeviceOption = None,
    engine: EngineOption = None,
    limit: Annotated[int, typer.Option("--limit", help=f"samples at most (1..{MAX_LIST})")] = 50,
    after: AfterOption = 0,
) -> None:
    """Samples of a model, oldest first: device, seq, version, why kept (measure, score), engine, when."""
    params = {**_filters(model, reason, since, device, engine), "limit": _limit(limit, MAX_LIST), "after_id": after}
    s = session(ctx)
    page = s.call("GET", "/v1/samples", params=params)
    if s.as_json:
        out.print_json(data=page)
        return
    table = Table("id", "device", "seq", "version", "reason", "measure", "score", "engine", "precision", "created")
    for row in page["samples"]:
        table.add_row(
            str(row["id"]),
            Text(row["device_id"]),
            str(row["seq"]),
            str(row["version"]),
            row["reason"],
            Text(row["measure"]),
            f"{row['score']:.4g}" if row["measure"] else "",
            Text(row["engine"]),
            Text(row["precision"]),
            when(row["created_at_ms"]),
        )
    out.print(table)
    if page["more"]:
        out.print(Text(f"more: go on with --after {page['next_after_id']}"))


def _download(s: Session, params: dict[str, Any], target: Path) -> None:
    """The export into `target` (through a .part file), with a progress bar on stderr; exit on refusal."""
    partial = target.with_name(target.name + ".part")
    try:
        with httpx.stream(
            "GET",
            f"{s.url}/v1/samples/export",
            params=params,
            headers={"Authorization": f"Bearer {s.token}"},
            timeout=300,
        ) as response:
            if response.status_code >= 400:
                response.read()
                code = {401: 3, 403: 3, 404: 4}.get(response.status_code, 2 if response.status_code < 500 else 1)
                fail(code, f"cloud-sync refused ({response.status_code}): {detail(response)}")
            total = int(response.headers.get("content-length", 0)) or None
            columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn())
            with Progress(*columns, console=err, transient=True) as progress, partial.open("wb") as f:
                task = progress.add_task(target.name, total=total)
                for block in response.iter_bytes(_READ_BYTES):
                    f.write(block)
                    progress.advance(task, len(block))
    except httpx.HTTPError as exc:
        partial.unlink(missing_ok=True)
        fail(1, f"cannot reach cloud-sync at {s.url} ({exc}); is it running? (--url / FLEETCTL_URL)")
    os.replace(partial, target)


def _manifest(path: Path, fmt: str) -> dict[str, Any]:
    if fmt == "npz":
        with zipfile.ZipFile(path) as zf:
            found: dict[str, Any] = json.loads(zf.read("manifest.json"))
            return found
    import pyarrow.parquet as pq  # checked before the download

    metadata = pq.read_schema(path).metadata or {}
    found = json.loads(metadata[b"edgefleet.manifest"])
    return found


@samples_app.command("export")
def samples_export(
    ctx: typer.Context,
    model: ModelOption,
    out_dir: Annotated[Path, typer.Option("--out", help="directory for samples.<ext> and manifest.json")],
    fmt: Annotated[str, typer.Option("--format", help="npz or parquet")] = "npz",
    reason: ReasonOption = None,
    since: SinceOption = None,
    device: DeviceOption = None,
    engine: EngineOption = None,
    limit: Annotated[int, typer.Option("--limit", help=f"samples at most (1..{MAX_EXPORT})")] = 1000,
    after: AfterOption = 0,
) -> None:
    """Export samples (inputs, outputs, who and why) to DIR/samples.<npz|parquet> and DIR/manifest.json."""
    params = {**_filters(model, reason, since, device, engine), "limit": _limit(limit, MAX_EXPORT), "after_id": after}
    if fmt not in FORMATS:
        fail(2, f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    params["format"] = fmt
    if fmt == "parquet":
        try:
            import pyarrow.parquet  # noqa: F401  # the manifest is read from the file's schema
        except ImportError:
            fail(2, "--format parquet needs pyarrow here to read the file's manifest (pip install pyarrow), or use npz")
    if out_dir.exists() and not out_dir.is_dir():
        fail(2, f"--out {out_dir} is not a directory")
    s = session(ctx)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        fail(2, f"--out {out_dir}: {exc.strerror or exc}")
    target = out_dir / f"samples.{fmt}"
    _download(s, params, target)
    info = _manifest(target, fmt)
    manifest_path = out_dir / "manifest.json"
    manifest_path.write_text(json.dumps(info, indent=1) + "\n")
    if s.as_json:
        out.print_json(data={"file": str(target), "manifest": str(manifest_path), **info})
        return
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(info["counts"]["reason"].items())) or "none"
    out.print(
        Text(f"wrote {target} ({target.stat().st_size} bytes, {info['count']} samples: {reasons}) and {manifest_path}")
    )
    if info.get("more"):
        out.print(Text(f"more: go on with --after {info['next_after_id']}"))
