"""fleetctl models compress: make a compressed variant of a version in the cloud, and roll it out gated.

`fleetctl models compress digits:2 --to int8 [--calibration fleet|warmup|PATH.npz] [--selector accel=none]`
asks cloud-sync (POST /v1/models/{name}/{version}/compress) for the variant, prints it beside its parent
(size, agreement, latency) and, with --selector, starts a rollout of it whose stages begin in shadow: a variant
reaches devices only after the fleet measured it against its parent. Not the compression itself (compress.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import zipfile
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.table import Table
from rich.text import Text

from cloud_sync.errors import InvalidArgument
from cloud_sync.fleetctl_models import _upload
from cloud_sync.fleetctl_session import Session, detail, err, fail, out, segment, session
from cloud_sync.rollouts.plan import parse_gates, parse_stages
from cloud_sync.selectors import parse_selector

__all__ = ["DEFAULT_GATES", "DEFAULT_STAGES", "models_compress"]

DEFAULT_STAGES = "shadow:100%:10m,active:10%:10m,active:100%"
# A variant's point is to answer as its parent does: the shadow stage must show it (and no new errors).
DEFAULT_GATES = "min_shadow_agreement=0.95,max_error_rate=0.01"
TARGETS = ("fp16", "int8", "int8-dynamic")
_REF = re.compile(r"^([a-z0-9][a-z0-9._-]{0,62}):([1-9][0-9]{0,9})$")
_DURATION = re.compile(r"^\s*(\d+)\s*([smhd]?)\s*$")
_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_MAX_SINCE_S = 365 * 86400  # api_compress.py's MAX_SINCE_S, not imported so fleetctl stays light
# Static int8 of a mobilenet-sized model takes tens of seconds on a busy cloud-sync.
_COMPRESS_TIMEOUT_S = 900.0


def _ref(text: str) -> tuple[str, int]:
    found = _REF.match(text)
    if found is None or int(found.group(2)) >= 2**31:
        fail(2, f"{text!r} is not name:version, e.g. digits:2")
    return found.group(1), int(found.group(2))


def _since(text: str) -> int:
    found = _DURATION.match(text)
    seconds = int(found.group(1)) * _UNIT_S[found.group(2)] if found else 0
    if not 1 <= seconds <= _MAX_SINCE_S:
        fail(2, f"--since {text!r} is not a duration in 1s..365d, such as 24h, 90m or 7d")
    return seconds


def _npz(path: Path) -> Path:
    if not path.is_file():
        fail(2, f"--calibration {path}: no such file (give fleet, warmup or an .npz of inputs)")
    if path.suffix != ".npz" or not zipfile.is_zipfile(path):
        fail(2, f"--calibration {path} is not an .npz (numpy.savez: an array per model input, rows along axis 0)")
    return path


def _calibration(calibration: str, limit: int | None, since: str | None) -> dict[str, Any] | Path | None:
    """The request's calibration object, or the local .npz to upload first; exit 2 on a bad combination."""
    if calibration != "fleet" and (limit is not None or since is not None):
        fail(2, "--calibration-limit and --since choose the fleet's samples: give them with --calibration fleet")
    if calibration == "":
        return None
    if calibration == "fleet":
        found: dict[str, Any] = {"source": "fleet-samples"}
        if limit is not None:
            found["limit"] = limit
        if since is not None:
            found["since_s"] = _since(since)
        return found
    if calibration == "warmup":
        return {"source": "warmup"}
    return _npz(Path(calibration))


def _rollout_plan(selector: str | None, stages: str, gates: str) -> dict[str, Any] | None:
    """The rollout's selector, stages and gates, checked here (exit 2) so a bad plan is refused before the
    variant is made; None without --selector."""
    if selector is None:
        return None
    try:
        chosen = parse_selector("" if selector == "*" else selector)
    except InvalidArgument as exc:
        fail(2, f"--selector: {exc.message}")
    try:
        planned = parse_stages(stages)
    except InvalidArgument as exc:
        fail(2, f"--stages: {exc.message}")
    if planned[0].mode != "shadow":
        fail(2, f"--stages {stages!r}: a variant's rollout starts with a shadow stage (e.g. {DEFAULT_STAGES})")
    try:
        judged = parse_gates(gates)
    except InvalidArgument as exc:
        fail(2, f"--gates: {exc.message}")
    if judged.min_shadow_agreement is None:
        fail(2, f"--gates {gates!r}: the shadow stage must be judged by agreement, e.g. {DEFAULT_GATES}")
    return {"selector": chosen, "stages": stages, "gates": gates}


def _post_compress(s: Session, path: str, body: dict[str, Any]) -> dict[str, Any]:
    """The compress call (Session.call's 30 s timeout is too short for it), its errors mapped as Session's."""
    try:
        spinner = err.status(f"compressing to {body['to']}...") if not s.as_json else contextlib.nullcontext()
        with spinner:
            response = httpx.post(
                f"{s.url}{path}",
                json=body,
                headers={"Authorization": f"Bearer {s.token}"},
                timeout=_COMPRESS_TIMEOUT_S,
            )
    except httpx.HTTPError as exc:
        fail(1, f"cannot reach cloud-sync at {s.url} ({exc}); is it running? (--url / FLEETCTL_URL)")
    if response.status_code >= 400:
        code = {401: 3, 403: 3, 404: 4}.get(response.status_code, 2 if response.status_code < 500 else 1)
        fail(code, f"cloud-sync refused ({response.status_code}): {detail(response)}")
    found: dict[str, Any] = response.json()
    return found


def _print_variant(parent: str, found: dict[str, Any]) -> None:
    report, lineage = found["report"], found["manifest"]["lineage"]
    variant = f"{found['name']}:{found['version']}"
    out.print(
        Text(
            f"registered {variant}: {report['method']} variant of {parent} (serial {found['serial']}; {report['tool']})"
        )
    )
    calibration = lineage.get("calibration")
    if calibration:
        out.print(Text(f"  calibrated on {calibration['samples']} rows from {calibration['source']}"))
    table = Table("figure")
    for header in (Text(parent), Text(variant), Text("variant / parent")):
        table.add_column(header)
    table.add_row(
        "size (bytes)", str(report["parent_bytes"]), str(report["variant_bytes"]), f"{report['size_ratio']:.2f}x"
    )
    table.add_row(
        "CPU latency, 1 row, 1 thread (ms)",
        f"{report['parent_latency_ms']:.3g}",
        f"{report['variant_latency_ms']:.3g}",
        f"{report['latency_ratio']:.2f}x",
    )
    table.add_row(
        f"agreement ({report['rule']}, {report['evaluated_on']} inputs)",
        "-",
        f"{report['agreement']:.2%} of {report['compared']}",
        "-",
    )
    out.print(table)


def models_compress(
    ctx: typer.Context,
    ref: Annotated[str, typer.Argument(help="the parent version, name:version, e.g. digits:2")],
    to: Annotated[str, typer.Option("--to", help="fp16, int8 (static, QDQ: TensorRT-ready) or int8-dynamic (CPU)")],
    calibration: Annotated[
        str,
        typer.Option(
            help="fleet (samples the devices kept), warmup (the parent's), or a local .npz (uploaded first); "
            "default: fleet when there are samples, else warmup"
        ),
    ] = "",
    calibration_limit: Annotated[
        int | None, typer.Option(min=1, max=10_000, help="with --calibration fleet: newest samples used (512)")
    ] = None,
    since: Annotated[str | None, typer.Option(help="with --calibration fleet: samples of the last 24h, 7d...")] = None,
    version: Annotated[
        int | None, typer.Option(min=1, max=2**31 - 1, help="the variant's version (default: the next free)")
    ] = None,
    description: Annotated[str, typer.Option(help="the variant's description (default: says what it is)")] = "",
    selector: Annotated[
        str | None, typer.Option(help="then roll the variant out to these devices: key=value,...; '*' for all")
    ] = None,
    stages: Annotated[str, typer.Option(help="the rollout's stages; the first is a shadow stage")] = DEFAULT_STAGES,
    gates: Annotated[str, typer.Option(help="the rollout's gates")] = DEFAULT_GATES,
    shadow_sample: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="share of requests mirrored to the variant in shadow stages")
    ] = 0.1,
) -> None:
    """Make a compressed variant of a version (a new signed version with its lineage); with --selector, roll it
    out through a shadow stage."""
    name, parent_version = _ref(ref)
    if to not in TARGETS:
        fail(2, f"--to {to!r} is not one of {', '.join(TARGETS)}")
    if len(description) > 500:
        fail(2, "--description: at most 500 characters")
    chosen = _calibration(calibration, calibration_limit, since)
    plan = _rollout_plan(selector, stages, gates)
    s = session(ctx)
    if isinstance(chosen, Path):
        sha = hashlib.sha256(chosen.read_bytes()).hexdigest()
        _upload(s, sha, chosen)
        chosen = {"source": "upload", "sha256": sha}
    body: dict[str, Any] = {"to": to}
    for key, value in (("calibration", chosen), ("version", version), ("description", description)):
        if value:
            body[key] = value
    found = _post_compress(s, f"/v1/models/{segment(name)}/{parent_version}/compress", body)
    rollout = None
    if plan is not None:
        if not s.as_json:
            err.print(f"starting the rollout of {name}:{found['version']}", markup=False, highlight=False)
        rollout = s.call(
            "POST",
            "/v1/rollouts",
            json={"model": name, "to_version": found["version"], "shadow_sample_rate": shadow_sample, **plan},
        )
    if s.as_json:
        out.print_json(data={"variant": found, "rollout": rollout})
        return
    _print_variant(ref, found)
    if rollout is not None:
        out.print(Text(f"rollout {rollout['id']} started: {stages} (gates {gates or 'defaults'})"))
