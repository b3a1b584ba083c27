"""Reading the shipped systemd units and configs in tests/deploy: their paths, and a unit file as data."""

from __future__ import annotations

from pathlib import Path

__all__ = ["CLOUD", "DEPLOY", "JETSON", "MOSQUITTO", "read_unit"]

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
JETSON = DEPLOY / "jetson"
CLOUD = DEPLOY / "cloud"
MOSQUITTO = DEPLOY / "mosquitto"


def read_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """{section: {key: [values in order]}}; comments and blank lines left out (keys may repeat in a unit)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path}: not Key=Value: {raw!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections
