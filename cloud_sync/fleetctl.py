"""fleetctl: the operator's command line, over cloud-sync's admin HTTP API.

Exit codes: 0 success; 1 cloud-sync unreachable or failing; 2 bad input (arguments, or a request the API
refused as invalid: 4xx with its reason); 3 not authorised (missing or wrong admin token); 4 not found.
`--json` prints machine-readable output for scripts.
"""

from __future__ import annotations

import base64
import json
import struct
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from cloud_sync.cli import parse_labels
from cloud_sync.errors import InvalidArgument
from cloud_sync.fleetctl_audit import audit
from cloud_sync.fleetctl_compress import models_compress
from cloud_sync.fleetctl_enrollment import token_app
from cloud_sync.fleetctl_models import models_app
from cloud_sync.fleetctl_policies import policies_app
from cloud_sync.fleetctl_rollouts import rollouts_app
from cloud_sync.fleetctl_samples import samples_app
from cloud_sync.fleetctl_session import (
    Connection,
    JsonAfterCommands,
    Session,
    duration,
    err,
    fail,
    out,
    segment,
    session,
    when,
)
from cloud_sync.fleetctl_state import add_state_commands, print_device_state, state_cell
from cloud_sync.fleetctl_tokens import tokens_app, whoami
from edgefleet.proto.edgefleet.v1 import results_pb2

__all__ = ["app", "main"]

# Completion is typer's own: `fleetctl --install-completion` (bash, zsh, fish, PowerShell) or
# `--show-completion SHELL` to print the script.
app = typer.Typer(
    cls=JsonAfterCommands,
    help="Operate an Edgefleet fleet through cloud-sync's admin API.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
devices_app = typer.Typer(
    help="Devices: register, list, inspect, revoke, and what the cloud quarantined of theirs.", no_args_is_help=True
)
results_app = typer.Typer(help="Results devices uploaded.", no_args_is_help=True)
app.add_typer(devices_app, name="devices")
app.add_typer(results_app, name="results")
devices_app.add_typer(token_app, name="token")
app.add_typer(policies_app, name="policies")
app.add_typer(models_app, name="models")
add_state_commands(models_app)
models_app.command("compress")(models_compress)
app.add_typer(rollouts_app, name="rollouts")
app.add_typer(tokens_app, name="tokens")
app.add_typer(samples_app, name="samples")
app.command("whoami")(whoami)
app.command("audit")(audit)


@app.callback()
def _session(
    ctx: typer.Context,
    url: Annotated[str, typer.Option(envvar="FLEETCTL_URL", help="cloud-sync admin API")] = "http://127.0.0.1:8080",
    token: Annotated[str | None, typer.Option(envvar="FLEETCTL_TOKEN", help="admin token", show_default=False)] = None,
    token_file: Annotated[Path | None, typer.Option(envvar="FLEETCTL_TOKEN_FILE", help="file holding it")] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="machine-readable output (also accepted after the command)")
    ] = False,
) -> None:
    ctx.obj = Connection(url, token, token_file, as_json)


DeviceIdArgument = Annotated[str, typer.Argument(help="the device's id, e.g. cam-17")]


@devices_app.command("list")
def devices_list(ctx: typer.Context) -> None:
    """List registered devices."""
    s = session(ctx)
    devices = s.call("GET", "/v1/devices")["devices"]
    if s.as_json:
        out.print_json(data=devices)
        return
    table = Table("device", "labels", "presence", "last seen", "state", "created", "revoked")
    for d in devices:
        # One label a line: a narrow terminal folds a cell, and a label cut in two reads as two wrong ones.
        labels = "\n".join(f"{k}={v}" for k, v in sorted(d["labels"].items()))
        presence = {True: "online", False: "offline"}.get(d.get("online"), "-")
        # Text, not str: rich would read a label value such as "[/]" as markup (and fail on it).
        table.add_row(
            Text(d["device_id"]),
            Text(labels),
            presence,
            when(d.get("last_seen_ms")),
            state_cell(d),
            when(d["created_at_ms"]),
            "yes" if d["revoked"] else "",
        )
    out.print(table)


@devices_app.command("add")
def devices_add(
    ctx: typer.Context,
    device_id: Annotated[str, typer.Argument(help="unique device id, e.g. cam-17")],
    labels: Annotated[str, typer.Option(help="comma-separated key=value pairs")] = "",
) -> None:
    """Register a device and print its token (shown once: put it in the device's token_file)."""
    s = session(ctx)
    try:
        parsed = parse_labels(labels)
    except InvalidArgument as exc:
        fail(2, exc.message)
    created = s.call("POST", "/v1/devices", json={"device_id": device_id, "labels": parsed})
    if s.as_json:
        out.print_json(data=created)
    else:
        print(created["token"])


@devices_app.command("show")
def devices_show(ctx: typer.Context, device_id: DeviceIdArgument) -> None:
    """A device, its labels and its upload counters (stored + evicted + rejected = produced)."""
    s = session(ctx)
    device = s.call("GET", f"/v1/devices/{segment(device_id)}")
    if s.as_json:
        out.print_json(data=device)
        return
    up = device["uplink"]
    labels = ",".join(f"{k}={v}" for k, v in sorted(device["labels"].items()))
    heading = Text(device["device_id"], style="bold")
    heading.append(f" {labels}" + (" REVOKED" if device["revoked"] else ""))
    out.print(heading)
    out.print(
        f"acked seq {up['acked_seq']}: stored {up['stored']}, evicted {up['evicted']}, rejected {up['rejected']} "
        f"(device reports produced {up['device_produced']}, evicted {up['device_evicted']}, rejected "
        f"{up['device_rejected']}); duplicates ignored {up['duplicates_total']}; "
        f"last upload {when(up['last_upload_at_ms'])}"
    )
    if up["clock_skewed_total"]:
        out.print(
            f"clock: {up['clock_skewed_total']} records stamped ahead of the cloud's clock, by up to "
            f"{duration(up['max_clock_skew_ms'])} (stored as stamped; check the device's time sync)"
        )
    if device.get("online") is not None:
        out.print(f"{'online' if device['online'] else 'offline'}, last seen {when(device['last_seen_ms'])}")
    if "state" in device:
        print_device_state(out, device["state"])
    telemetry = device.get("telemetry")
    if telemetry:
        system, outbox = telemetry.get("system", {}), telemetry.get("outbox", {})
        out.print(
            f"telemetry {when(int(telemetry['timestamp_ms']))}: cpu {system.get('cpu_percent', 0):.0f}%, outbox "
            f"{outbox.get('depth', 0)} records, upload lag {outbox.get('upload_lag_s', 0):.1f} s"
        )
    for w in device.get("recent_models", []):
        out.print(
            Text(
                f"  {w['model']}:{w['version']} last {w['window_s'] // 60} min: {w['requests']} requests "
                f"({w['requests_per_s']:.1f}/s), error rate {w['error_rate']:.2%}, p99 {w['p99_ms']:.2f} ms, "
                f"mean batch {w['mean_batch_size']:.1f}"
            )
        )


@devices_app.command("revoke")
def devices_revoke(ctx: typer.Context, device_id: DeviceIdArgument) -> None:
    """Cut a device off: its token stops working."""
    s = session(ctx)
    device = s.call("POST", f"/v1/devices/{segment(device_id)}/revoke")
    out.print_json(data=device) if s.as_json else out.print(f"{device_id} revoked")


# Entries per API request: the API's own cap (MAX_QUARANTINE_PAGE), not imported so fleetctl stays light.
_QUARANTINE_PAGE = 1000


def _quarantined(s: Session, device_id: str, after: int, count: int) -> Iterator[dict[str, Any]]:
    """The device's quarantine entries past seq `after`, ascending, at most `count`, a page at a time."""
    path = f"/v1/devices/{segment(device_id)}/quarantine"
    while count:
        want = min(count, _QUARANTINE_PAGE)
        page = s.call("GET", path, params={"after_seq": after, "limit": want})["quarantine"]
        yield from page
        if len(page) < want:
            return
        count -= want
        after = page[-1]["seq"]


def _printable(text: str) -> str:
    """`text` on one line with no terminal control: a device chooses the reasons it declares, and one holding
    a newline or an escape sequence must not forge lines or drive the operator's terminal."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def _quarantine_line(entry: dict[str, Any]) -> str:
    if entry["record"] is None:
        size = "not sent"
    elif entry["record_bytes"] < entry["record_size"]:
        size = f"{entry['record_size']} bytes (first {entry['record_bytes']} kept)"
    else:
        size = f"{entry['record_size']} bytes"
    return f"#{entry['seq']} {entry['source']} {when(entry['received_at_ms'])} {size}: {_printable(entry['reason'])}"


@devices_app.command("quarantine")
def devices_quarantine(
    ctx: typer.Context,
    device_id: DeviceIdArgument,
    limit: Annotated[int, typer.Option(min=1, max=1_000_000, help="print at most N entries")] = 100,
    after: Annotated[int, typer.Option(min=0, max=2**63 - 1, help="start after this seq")] = 0,
) -> None:
    """Records of a device the cloud will never store as results (quarantined), and why; oldest first."""
    s = session(ctx)
    shown, last = 0, after
    # One entry past the limit tells whether more remain.
    for entry in _quarantined(s, device_id, after, limit + 1):
        if shown == limit:
            # On stderr: stdout stays one line (or JSON object) per entry.
            err.print(f"more entries after seq {last}: continue with --after {last}", markup=False, highlight=False)
            break
        if s.as_json:
            print(json.dumps(entry), flush=True)
        else:
            # print, not rich: rich would still turn ":smile:" in a reason into an emoji.
            print(_quarantine_line(entry), flush=True)
        shown, last = shown + 1, entry["seq"]
    if not shown and not s.as_json:
        print(f"no quarantined records after seq {after}" if after else "no quarantined records")


# KServe datatypes the summary reads, as struct format characters (little-endian, as raw contents are).
_STRUCT_FORMATS = {
    "FP32": "f",
    "FP64": "d",
    "FP16": "e",
    "INT8": "b",
    "INT16": "h",
    "INT32": "i",
    "INT64": "q",
    "UINT8": "B",
    "UINT16": "H",
    "UINT32": "I",
    "UINT64": "Q",
}


def _summary(result: dict[str, Any]) -> str:
    """What a record says, for a human: the top class of a kept inference result.

    Read with the standard library (struct), not numpy: fleetctl installs without the device runtime.
    """
    if result["payload_type"] != "inference.ModelInferResponse":
        return f"{result['payload_bytes']} bytes of {result['payload_type']}"
    from edgefleet.proto.inference import grpc_service_pb2

    try:
        response = grpc_service_pb2.ModelInferResponse.FromString(base64.b64decode(result["payload"]))
        parts = [_output_summary(t, response.raw_output_contents[i]) for i, t in enumerate(response.outputs)]
    except Exception:
        return f"{result['payload_bytes']} bytes (not a readable ModelInferResponse)"
    return "; ".join(parts)


def _output_summary(tensor: Any, raw: bytes) -> str:
    shape = list(tensor.shape)
    code = _STRUCT_FORMATS.get(tensor.datatype)
    count = 1
    for dim in shape:
        count *= dim
    if code is None or len(shape) != 2 or shape[0] != 1 or not 0 < shape[1] <= 1000:
        return f"{tensor.name}: {tensor.datatype}{shape}"
    values = struct.unpack(f"<{count}{code}", raw)  # raises on a size mismatch: "not readable"
    best = max(range(count), key=values.__getitem__)
    return f"{tensor.name}: argmax {best} ({float(values[best]):.3f})"


def _pages(s: Session, device: str | None, after: int, follow: bool, interval: float) -> Iterator[Any]:
    while True:
        # Following, stay 2 s behind the newest: on PostgreSQL a lower id can still be committing.
        params: dict[str, Any] = {"after_id": after, "limit": 1000, "settle_ms": 2000 if follow else 0}
        if device:
            params["device_id"] = device
        page = s.call("GET", "/v1/results", params=params)
        yield from page["results"]
        after = page["next_after_id"]
        if not page["results"]:
            if not follow:
                return
            time.sleep(interval)  # polling the API: there is nothing local to wait on


@results_app.command("tail")
def results_tail(
    ctx: typer.Context,
    device: Annotated[str | None, typer.Option(help="only this device")] = None,
    last: Annotated[int, typer.Option(min=0, max=10_000, help="start with the newest N; 0: from the first")] = 20,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="keep printing new results")] = False,
    interval: Annotated[float, typer.Option(min=0.05, max=60, help="poll interval with --follow (s)")] = 1.0,
) -> None:
    """Print stored results, oldest first; with --follow, keep printing as devices upload."""
    s = session(ctx)
    if device is not None:
        # A mistyped id would otherwise print nothing (and, following, wait forever): say it is unknown (exit 4).
        s.call("GET", f"/v1/devices/{segment(device)}")
    after = 0
    if last:
        params: dict[str, Any] = {"last": last, **({"device_id": device} if device else {})}
        after = s.call("GET", "/v1/results/cursor", params=params)["after_id"]
    for result in _pages(s, device, after, follow, interval):
        _print_result(s, result)


def _print_result(s: Session, result: dict[str, Any]) -> None:
    if s.as_json:
        print(json.dumps(result), flush=True)
        return
    kind = results_pb2.RecordKind.Name(result["kind"]).removeprefix("RECORD_KIND_").lower()
    out.print(
        f"{when(result['created_at_ms'])} {result['device_id']} #{result['seq']} {result['model']}:"
        f"{result['version']} {kind} {_summary(result)}",
        markup=False,
        highlight=False,
    )


def main() -> None:
    # "fleetctl" also under `python -m cloud_sync.fleetctl`: completion scripts are named after the program.
    sys.exit(app(prog_name="fleetctl", standalone_mode=True))


if __name__ == "__main__":
    main()
