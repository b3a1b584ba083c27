"""Requests and responses of the inference API, as the in-process API and the gRPC edge both see them."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["InferRequest", "InferResponse", "PreparedRequest"]

Array = np.ndarray[Any, Any]


@dataclass
class InferRequest:
    """One inference call. `inputs` maps input names to numpy arrays of the model's exact dtypes."""

    model_name: str
    inputs: Mapping[str, Array]
    # "" = the active version.
    model_version: str = ""
    id: str = ""
    # Outputs to return; None = all of them.
    outputs: tuple[str, ...] | None = None
    # 1 = highest; 0 = the model's default (inference.default_priority).
    priority: int = 0
    # Longest the request may wait in the queue; None = inference.default_timeout_ms.
    timeout_s: float | None = None
    parameters: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class InferResponse:
    model_name: str
    model_version: str
    outputs: dict[str, Array]
    id: str = ""
    parameters: dict[str, Any] = field(default_factory=dict)
    # For a kept result: resolves (with the record's seq) once it is committed to the outbox. The APIs
    # wait for it before answering unless the request set edgefleet.keep_async.
    kept: Future[int] | None = field(default=None, repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class PreparedRequest:
    """A request validated against one model version, ready to join a batch."""

    inputs: dict[str, Array]
    rows: int
    priority: int
    deadline: float | None
    group: Hashable
    outputs: tuple[str, ...] | None
    id: str
    # What to keep of this request in the outbox (keeping.NONE / RESULT / SAMPLE), and its parameters.
    keep: int = 0
    parameters: Mapping[str, Any] = field(default_factory=dict)
