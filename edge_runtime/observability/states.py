"""Model states as a Prometheus enum gauge: `edgefleet_model_state{model,version,state}` is 1 for the state a
version is in and 0 for the others, so `edgefleet_model_state{state="FAILED"} == 1` finds failed versions.

The states are the control plane's (DOWNLOADING ... FAILED, as the reported state carries them); where they
come from is the caller's business (the converger's reported state).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Protocol

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from edgefleet.proto.edgefleet.v1 import state_pb2

__all__ = ["MODEL_STATES", "ModelStateCollector", "ModelStateFigure"]

_PREFIX = "MODEL_STATE_"
# {proto value: label} without UNSPECIFIED: DOWNLOADING, VERIFYING, BUILDING, READY, ACTIVE, FAILED.
MODEL_STATES = {value: name.removeprefix(_PREFIX) for name, value in state_pb2.ModelState.items() if value != 0}


class ModelStateFigure(Protocol):
    """One model version's state (state_pb2.ModelStatus has these fields)."""

    @property
    def name(self) -> str: ...
    @property
    def version(self) -> int: ...
    @property
    def state(self) -> int: ...


class ModelStateCollector(Collector):
    def __init__(self, states: Callable[[], Iterable[ModelStateFigure]]) -> None:
        self._states = states

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "edgefleet_model_state",
            "1 for the state a model version is in (DOWNLOADING, VERIFYING, BUILDING, READY, ACTIVE, FAILED)",
            labels=["model", "version", "state"],
        )
        seen: set[tuple[str, int]] = set()
        for figure in self._states():
            key = (figure.name, figure.version)
            if key in seen or figure.state not in MODEL_STATES:  # one series set per version; UNSPECIFIED: none
                continue
            seen.add(key)
            for value, label in MODEL_STATES.items():
                family.add_metric([figure.name, str(figure.version), label], float(value == figure.state))
        yield family
