"""sd_notify: the agent's READY / WATCHDOG / STOPPING datagrams on a real socket, and the notifier's parsing."""

from __future__ import annotations

import os
import signal
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from edge_runtime.agent.systemd import SystemdNotifier
from tests.edge_runtime.agent.conftest import NotifyListener
from tests.processes import AgentProcess, install
from tests.waiting import wait_for

WATCHDOG_USEC = 200_000  # systemd's WatchdogSec=0.2: the agent pings every 0.1 s


@pytest.fixture
def listeners(short_dir: Path) -> Iterator[Callable[[str], NotifyListener]]:
    """listen("path" | "abstract") -> a NotifyListener on a fresh address of that kind."""
    made: list[NotifyListener] = []

    def listen(kind: str) -> NotifyListener:
        name = uuid.uuid4().hex[:12]
        address = f"@edgefleet-test-{name}" if kind == "abstract" else str(short_dir / f"notify-{name}")
        made.append(NotifyListener(address))
        return made[-1]

    yield listen
    for listener in made:
        listener.close()


def _env(listener: NotifyListener) -> dict[str, str]:
    return {"NOTIFY_SOCKET": listener.env_address, "WATCHDOG_USEC": str(WATCHDOG_USEC)}


@pytest.mark.parametrize("kind", ["path", "abstract"])
def test_agent_notifies_ready_watchdog_and_stopping(
    kind: str,
    listeners: Callable[[str], NotifyListener],
    config_data: dict[str, Any],
    write_config: Callable[..., Path],
    agent_processes: Callable[..., AgentProcess],
    model_packages: dict[str, Path],
) -> None:
    install(config_data, model_packages["digits:1"])
    listener = listeners(kind)
    agent = agent_processes(write_config(config_data), env=_env(listener))
    wait_for(lambda: listener.count("READY"), 30, "READY=1")
    wait_for(lambda: listener.count("WATCHDOG", after="READY") >= 3, 10, "3 watchdog pings after READY")
    agent.signal(signal.SIGTERM)
    wait_for(lambda: listener.count("STOPPING"), 15, "STOPPING=1")
    assert agent.finish(15) == 0
    assert listener.index("READY") < listener.index("STOPPING")
    assert listener.count("READY") == 1 and listener.count("STOPPING") == 1
    statuses = [m["STATUS"] for m in listener.receive() if "STATUS" in m]
    assert statuses[0] == "listening; loading models"
    assert "serving 1 model(s)" in statuses
    assert statuses[-1] == "draining"


def test_watchdog_off_in_config_sends_no_pings(
    listeners: Callable[[str], NotifyListener],
    config_data: dict[str, Any],
    write_config: Callable[..., Path],
    agent_processes: Callable[..., AgentProcess],
) -> None:
    # Caught a bug: agent.watchdog = false was ignored. A second agent with the watchdog on, under the same
    # WATCHDOG_USEC, is the clock: by the time it has pinged 3 times, the other one would have too.
    pinging, silent = listeners("path"), listeners("path")
    on = {
        **config_data,
        # One agent per data dir: the outbox is locked by its agent.
        "agent": {**config_data["agent"], "data_dir": str(Path(config_data["agent"]["data_dir"]) / "on")},
        "server": {
            **config_data["server"],
            "unix_socket": str(Path(config_data["server"]["unix_socket"]).with_name("on.sock")),
        },
    }
    off = {**config_data, "agent": {**config_data["agent"], "watchdog": False}}
    clock = agent_processes(write_config(on, "on.toml"), env=_env(pinging))
    agent = agent_processes(write_config(off, "off.toml"), env=_env(silent))
    wait_for(lambda: silent.count("READY") and pinging.count("READY"), 30, "READY=1 from both agents")
    # Pings counted from now on: both are READY, so both would be pinging.
    before = pinging.count("WATCHDOG")
    wait_for(lambda: pinging.count("WATCHDOG") >= before + 3, 10, "3 pings from the agent with the watchdog on")
    for process in (agent, clock):
        process.signal(signal.SIGTERM)
        assert process.finish(15) == 0
    assert silent.count("WATCHDOG") == 0
    assert silent.count("STOPPING") == 1


# --- the notifier's own parsing, against real sockets ------------------------------------------------


def test_without_notify_socket_the_notifier_does_nothing() -> None:
    notifier = SystemdNotifier({})
    assert not notifier.enabled
    assert notifier.notify(READY="1") is False
    assert notifier.watchdog_interval_s is None
    notifier.close()


@pytest.mark.parametrize("kind", ["path", "abstract"])
def test_notify_sends_one_datagram_of_fields(kind: str, listeners: Callable[[str], NotifyListener]) -> None:
    listener = listeners(kind)
    notifier = SystemdNotifier({"NOTIFY_SOCKET": listener.env_address})
    assert notifier.enabled
    assert notifier.notify(READY="1", STATUS="serving 2 model(s)") is True
    assert wait_for(listener.receive, 5, "the datagram") == [{"READY": "1", "STATUS": "serving 2 model(s)"}]
    notifier.close()
    assert notifier.notify(STOPPING="1") is False  # closed: nothing sent, nothing raised


def test_notify_to_a_vanished_socket_returns_false(short_dir: Path) -> None:
    notifier = SystemdNotifier({"NOTIFY_SOCKET": str(short_dir / "gone")})
    assert notifier.enabled
    assert notifier.notify(READY="1") is False
    notifier.close()


@pytest.mark.parametrize(
    ("env", "interval"),
    [
        ({"WATCHDOG_USEC": "200000"}, 0.1),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
        ({"WATCHDOG_USEC": "200000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),  # meant for another process
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({"WATCHDOG_USEC": ""}, None),
        ({}, None),
    ],
)
def test_watchdog_interval_is_half_of_watchdog_usec(
    env: dict[str, str], interval: float | None, listeners: Callable[[str], NotifyListener]
) -> None:
    notifier = SystemdNotifier({"NOTIFY_SOCKET": listeners("path").env_address, **env})
    assert notifier.watchdog_interval_s == interval
    notifier.close()
