"""What ``/api/v1/status`` and ``/metrics`` say about the data-plane processes."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import Literal, NamedTuple, TypedDict

from tdproxy.routing.state import BackendState

WorkerPhase = Literal["starting", "running", "stopping", "restarting"]

_STARTED = time.time()


class WorkerStatus(TypedDict):
    index: int  # the worker's slot, 0..N-1; a replacement takes the slot of the one it replaces
    pid: int | None  # None while the slot waits to restart
    state: WorkerPhase
    started_at: float | None  # epoch seconds
    generation: int  # the config generation it serves
    requests: int  # requests its backends answered since it started
    connections_active: int
    restarts: int  # times this slot's process was replaced


class WorkersStatus(TypedDict):
    """The status document's ``workers`` section."""

    configured: int
    live: int
    restarts: int
    processes: list[WorkerStatus]


class WorkersReport(NamedTuple):
    configured: int  # the process count asked for (``workers``, ``auto`` resolved)
    live: int  # processes serving now (``tdproxy_workers``)
    restarts: int  # processes replaced after they died (``tdproxy_worker_restarts_total``)
    processes: list[WorkerStatus]
    dropped_log_lines: int  # by worker processes; the supervisor counts its own itself

    def to_json(self) -> WorkersStatus:
        return {
            "configured": self.configured,
            "live": self.live,
            "restarts": self.restarts,
            "processes": self.processes,
        }


def single_process_report(
    states: Mapping[str, BackendState], connections: int, generation: int
) -> WorkersReport:
    """``workers: 1``: this process is the one data-plane process."""
    requests = sum(state.total_requests() for state in states.values())
    process: WorkerStatus = {
        "index": 0,
        "pid": os.getpid(),
        "state": "running",
        "started_at": _STARTED,
        "generation": generation,
        "requests": requests,
        "connections_active": connections,
        "restarts": 0,
    }
    return WorkersReport(1, 1, 0, [process], 0)
