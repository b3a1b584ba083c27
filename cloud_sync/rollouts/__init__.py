"""Rollouts of a model version in stages gated on how it behaves on the devices (DESIGN.md "Rollouts").

plan.py: stages, gates, device order (pure); gates.py: the verdict on a stage (pure); store.py: the tables;
service.py: the transitions operators and the controller make; controller.py: the gate loop and its leader.
The names below are imported on first use: cloud_sync.desired (which service.py uses) imports plan.py.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "DeviceMetrics",
    "Gates",
    "Rollout",
    "RolloutController",
    "RolloutEvent",
    "RolloutService",
    "Stage",
    "Verdict",
    "VersionMetrics",
    "evaluate",
    "parse_gates",
    "parse_stages",
    "stage_devices",
]

_HOMES = {
    "DeviceMetrics": "gates",
    "Verdict": "gates",
    "VersionMetrics": "gates",
    "evaluate": "gates",
    "Gates": "plan",
    "Rollout": "plan",
    "RolloutEvent": "plan",
    "Stage": "plan",
    "parse_gates": "plan",
    "parse_stages": "plan",
    "stage_devices": "plan",
    "RolloutController": "controller",
    "RolloutService": "service",
}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
