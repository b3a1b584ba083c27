"""HTTP plumbing under the KServe REST app (http_app.py): headers, bodies read with a limit, Content-Encoding
both ways, JSON parsing, and the field checks of small JSON documents. Nothing here knows KServe.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import zlib
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from collections.abc import Set as AbstractSet
from typing import Any

from edge_runtime.errors import InvalidInput, RequestTooLarge

__all__ = [
    "WBITS",
    "ClientGone",
    "Receive",
    "Scope",
    "Send",
    "accepted_coding",
    "check_keys",
    "compress",
    "count_field",
    "decompress",
    "hang_up",
    "headers_of",
    "parse_json",
    "parse_json_length",
    "raw_handle",
    "read_body",
]

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

WBITS = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


class ClientGone(Exception):
    """The client hung up while its request waited: nobody to answer."""


async def hang_up(receive: Receive, waiter: asyncio.Future[Any]) -> None:
    message = await receive()  # after the body: returns only when the client disconnects (or we answered)
    if message["type"] == "http.disconnect" and not waiter.done():
        waiter.cancel()


def headers_of(scope: Scope) -> dict[bytes, bytes]:
    cached: dict[bytes, bytes] | None = scope.get("edgefleet.headers")
    if cached is None:
        cached = scope["edgefleet.headers"] = dict(scope["headers"])
    return cached


def parse_json_length(value: bytes | None) -> int | None:
    if value is None:
        return None
    if not value.isdigit() or len(value) > 12:
        raise InvalidInput(
            f"Inference-Header-Content-Length {value.decode('latin-1')!r} is not a byte count of the JSON part"
        )
    return int(value)


def parse_json(body: bytes | bytearray) -> Any:
    try:
        return json.loads(body)
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidInput(f"request body is not valid JSON: {exc}") from None


async def read_body(receive: Receive, limit: int) -> bytes | bytearray:
    first = await receive()
    if first["type"] == "http.disconnect":
        raise ClientGone()
    body: bytes | bytearray = first.get("body", b"")
    if not first.get("more_body", False):
        return body
    buffer = bytearray(body)
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone()
        buffer += message.get("body", b"")
        if len(buffer) > limit:  # a chunked body has no Content-Length to refuse up front
            raise RequestTooLarge(f"request body is past the limit of {limit} bytes (server.max_request_bytes)")
        if not message.get("more_body", False):
            return buffer


def decompress(body: bytes | bytearray, encoding: str, limit: int) -> bytes:
    """`body` inflated, refused once it passes `limit` bytes (a small bomb must not fill the memory)."""
    inflater = zlib.decompressobj(WBITS[encoding])
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise InvalidInput(f"request body is not valid {encoding}: {exc}") from None
    if len(out) > limit:
        raise RequestTooLarge(f"request body inflates past the limit of {limit} bytes (server.max_request_bytes)")
    if not inflater.eof or inflater.unused_data:
        raise InvalidInput(f"request body is not one complete {encoding} stream")
    return out


def accepted_coding(value: bytes) -> str | None:
    """gzip or deflate when Accept-Encoding names one (q=0 refuses it), else None."""
    offered = {}
    for item in value.decode("latin-1").lower().split(","):
        name, _, q = item.strip().partition(";")
        offered[name.strip()] = q.strip() not in ("q=0", "q=0.0", "q=0.00", "q=0.000")
    for coding in ("gzip", "deflate"):
        if offered.get(coding):
            return coding
    return None


def compress(body: bytes, coding: str) -> bytes:
    packer = zlib.compressobj(1, zlib.DEFLATED, WBITS[coding])  # level 1: the link is local, the CPU is not
    return packer.compress(body) + packer.flush()


def check_keys(doc: Any, what: str, allowed: set[str], required: AbstractSet[str] = frozenset()) -> dict[str, Any]:
    """`doc` when it is a JSON object of only `allowed` keys, `required` among them; InvalidInput else."""
    if not isinstance(doc, dict):
        raise InvalidInput(f"{what} must be a JSON object")
    unknown = sorted(set(doc) - allowed)
    if unknown:
        raise InvalidInput(f"{what} has unknown key {unknown[0]!r}; allowed: {', '.join(sorted(allowed))}")
    missing = sorted(required - set(doc))
    if missing:
        raise InvalidInput(f"{what} has no {missing[0]!r} field")
    return doc


def count_field(doc: Mapping[str, Any], key: str, what: str) -> int:
    value = doc[key]
    if type(value) is not int or value < 0:
        raise InvalidInput(f"{key!r} of {what} must be a non-negative integer, not {value!r}")
    return value


def raw_handle(value: Any) -> bytes:
    """A cudaIpcMemHandle_t as tritonclient sends it: {"b64": base64 of its bytes}."""
    b64 = value.get("b64") if isinstance(value, dict) and set(value) == {"b64"} else None
    if not isinstance(b64, str):
        raise InvalidInput("'raw_handle' must be {\"b64\": base64 of a cudaIpcMemHandle_t}")
    try:
        return base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput("'raw_handle' must be a valid base64 encoded cudaIpcMemHandle_t") from None
