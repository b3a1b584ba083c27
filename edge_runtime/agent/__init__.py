"""The edge-agent process: CLI, lifecycle (start, serve, drain on SIGTERM) and systemd integration."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edge_runtime.agent.process import Agent

__all__ = ["Agent"]


def __getattr__(name: str) -> Any:
    # Lazy: `edge-agent check-config` and `--help` need neither grpc nor the server (~60 ms of start-up).
    if name == "Agent":
        from edge_runtime.agent.process import Agent

        return Agent
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
