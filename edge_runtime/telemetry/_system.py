"""The device's system figures for telemetry: CPU, memory, temperature, GPU load and board power.

What a board lacks (thermal zones, a Jetson GPU, an INA3221 power monitor) reads as 0, never an error.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import psutil

from edgefleet.proto.edgefleet.v1.telemetry_pb2 import SystemTelemetry

__all__ = ["SystemProbe", "deferred_probe"]

# Jetson GPU load in per-mille: Nano/TX2/Xavier, then Orin (JetPack 5 and 6 place it under platform/).
_GPU_LOAD_GLOBS = (
    "sys/devices/gpu.0/load",
    "sys/devices/platform/gpu.0/load",
    "sys/devices/platform/bus@0/*.gpu/load",
    "sys/devices/platform/*.gpu/load",
)
# Rails that measure the whole module's input; when one is present it alone is the board's power, since the
# other rails are parts of it (CPU/GPU/SOC). Names differ by board and JetPack release.
_TOTAL_RAILS = ("VDD_IN", "POM_5V_IN", "5V_IN", "VIN_SYS_5V0")
# Thermal zones outside this range (°C) are sensors that are off or placeholders (Orin reports -256 °C for
# a powered-down zone).
_SANE_TEMPERATURE_C = (-40.0, 150.0)
# Jetson's PMIC-Die zone is not a real sensor: it reports a fixed 100 °C on several boards.
_IGNORED_ZONES = {"PMIC-Die"}
_NUMBER = re.compile(r"(\d+)")


def _read_number(path: Path) -> float | None:
    try:
        return float(path.read_text().strip())
    except (OSError, ValueError):
        return None


Rail = tuple[str, Callable[[], float | None]]  # (label, read watts)


class SystemProbe:
    """Finds the board's sensor files once (at construction), then reads them on each `read()`.

    One `read()` is a few small sysfs reads plus two psutil calls (tens of microseconds here, but an INA3221
    read goes over i2c on a Jetson and can wait behind the bus): the agent calls it on a thread of its own,
    never on the loop (TelemetryCollector.run). tegrastats is not run: it is a process per sample, and sysfs
    holds the same figures. `root` is where sysfs is mounted relative to (tests point it at a tree of their
    own).
    """

    def __init__(self, root: Path = Path("/")) -> None:
        self.root = root
        self.thermal_zones = self._thermal_zones()
        self.gpu_load = next((p for pattern in _GPU_LOAD_GLOBS for p in sorted(root.glob(pattern))), None)
        self.rails: list[Rail] = [*self._hwmon_rails(), *self._iio_rails()]
        # psutil's cpu_percent(None) measures since its previous call: this first one starts the window.
        psutil.cpu_percent(interval=None)

    def read(self) -> SystemTelemetry:
        memory = psutil.virtual_memory()
        return SystemTelemetry(
            cpu_percent=psutil.cpu_percent(interval=None),
            memory_used_bytes=memory.total - memory.available,
            memory_total_bytes=memory.total,
            gpu_percent=self.read_gpu_percent(),
            temperature_c=self.read_temperature_c(),
            power_w=self.read_power_w(),
        )

    def read_temperature_c(self) -> float:
        """The hottest thermal zone, °C (0 without any)."""
        low, high = _SANE_TEMPERATURE_C
        values = [v / 1000 for p in self.thermal_zones if (v := _read_number(p)) is not None]
        sane = [v for v in values if low <= v <= high]
        return max(sane, default=0.0)

    def read_gpu_percent(self) -> float:
        value = _read_number(self.gpu_load) if self.gpu_load is not None else None
        return min(100.0, max(0.0, value / 10)) if value is not None else 0.0

    def read_power_w(self) -> float:
        """The board's input power, watts: the total rail where there is one, else the sum of the rails."""
        readings = {label: watts for label, read in self.rails if (watts := read()) is not None}
        for label in _TOTAL_RAILS:
            if label in readings:
                return readings[label]
        return sum(readings.values())

    # -- discovery ----------------------------------------------------------------------------------------

    def _thermal_zones(self) -> list[Path]:
        zones = []
        for zone in sorted(self.root.glob("sys/class/thermal/thermal_zone*")):
            try:
                kind = (zone / "type").read_text().strip()
            except OSError:
                kind = ""
            if kind not in _IGNORED_ZONES and (zone / "temp").exists():
                zones.append(zone / "temp")
        return zones

    def _hwmon_rails(self) -> list[Rail]:
        """JetPack 5/6: the ina3221 hwmon driver, in{N}_label + in{N}_input (mV) + curr{N}_input (mA)."""
        rails: list[Rail] = []
        for hwmon in sorted(self.root.glob("sys/bus/i2c/drivers/ina3221/*/hwmon/hwmon*")):
            for label_file in sorted(hwmon.glob("in*_label")):
                match = _NUMBER.search(label_file.name)
                if match is None:
                    continue
                n = match.group(1)
                volts, amps = hwmon / f"in{n}_input", hwmon / f"curr{n}_input"
                if volts.exists() and amps.exists():
                    rails.append((_label(label_file), _product(volts, amps)))
        return rails

    def _iio_rails(self) -> list[Rail]:
        """JetPack 4: the ina3221x iio driver, rail_name_{N} + in_power{N}_input (mW)."""
        rails: list[Rail] = []
        for device in sorted(self.root.glob("sys/bus/i2c/drivers/ina3221x/*/iio:device*")):
            for name_file in sorted(device.glob("rail_name_*")):
                n = name_file.name.rsplit("_", 1)[1]
                power = device / f"in_power{n}_input"
                if power.exists():
                    rails.append((_label(name_file), _milli(power)))
        return rails


def deferred_probe(root: Path = Path("/")) -> Callable[[], SystemTelemetry]:
    """`SystemProbe(root).read`, the probe made on the first call: its discovery globs sysfs, so it happens on
    the thread that reads (the collector's probe thread), not on the loop that sets telemetry up."""
    probe: SystemProbe | None = None

    def read() -> SystemTelemetry:
        nonlocal probe
        if probe is None:
            probe = SystemProbe(root)
        return probe.read()

    return read


def _label(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return path.name


def _product(millivolts: Path, milliamps: Path) -> Callable[[], float | None]:
    def read() -> float | None:
        mv, ma = _read_number(millivolts), _read_number(milliamps)
        return mv * ma / 1e6 if mv is not None and ma is not None else None

    return read


def _milli(path: Path) -> Callable[[], float | None]:
    def read() -> float | None:
        value = _read_number(path)
        return value / 1e3 if value is not None else None

    return read
