"""Parsing the network addresses both programs take from their config: host:port and MQTT broker URLs.

Errors are AddressError (a ValueError) with the reason; each program wraps it in its own config error, which
names the key.
"""

from __future__ import annotations

import ipaddress
import urllib.parse
from dataclasses import dataclass

__all__ = ["AddressError", "BrokerAddress", "is_loopback", "parse_broker_url", "parse_host_port"]


class AddressError(ValueError):
    """An address that cannot be used; the message says why."""


def parse_host_port(address: str) -> tuple[str, int]:
    """`host:port` (IPv6 hosts in brackets) -> (host, port); the port 0..65535 (0: any free port)."""
    host, sep, port = address.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not (port.isascii() and port.isdigit()) or not 0 <= int(port) < 65536:
        raise AddressError(f"{address!r} must be host:port with a port of 0-65535")
    return host, int(port)


def is_loopback(host: str) -> bool:
    """Whether `host` names this machine only (localhost or a loopback IP)."""
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int
    tls: bool


def parse_broker_url(url: str) -> BrokerAddress:
    """`mqtt://host:port` (plaintext, port 1883 by default) or `mqtts://host:port` (TLS, 8883)."""
    try:
        parsed = urllib.parse.urlsplit(url)
        port = parsed.port
    except ValueError as exc:
        raise AddressError(f"{url!r} is not a valid URL: {exc}") from exc
    if parsed.scheme not in ("mqtt", "mqtts"):
        raise AddressError(f"{url!r} must start with mqtt:// or mqtts://")
    if not parsed.hostname:
        raise AddressError(f"{url!r} names no host (expected mqtt://host:port)")
    if parsed.path not in ("", "/") or parsed.query or parsed.fragment or parsed.username or parsed.password:
        raise AddressError(f"{url!r} must be only scheme, host and port (credentials are configured apart)")
    tls = parsed.scheme == "mqtts"
    return BrokerAddress(parsed.hostname, port if port is not None else (8883 if tls else 1883), tls)
