"""Counters across workers: a worker's snapshot, their sum, and what survives a dead worker.

A worker counts exactly as a single process does, on its own ``BackendState`` objects (the
hot path is unchanged); a few times a second it copies them into a :class:`WorkerCounters`
snapshot for the supervisor. The supervisor keeps the latest snapshot of each live worker and,
for workers that have exited, their last one folded into a *retired* total, so totals never go
backwards when a worker is replaced. :func:`load` writes ``retired + sum(live)`` into the
supervisor's own ``BackendState`` objects, so the metrics collector, the status document and the
windowed rates read totals exactly as they read one process's counters.

Gauges are not carried over from a dead worker: its in-flight requests and its run of passive
failures ended with it. Per-second request counts are keyed by the epoch second, so the workers'
60-second windows add up second by second and the observed traffic share is computed from the
summed counts.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import NamedTuple, TypeVar

from tdproxy.routing.state import DURATION_BUCKETS, BackendState


class BackendCounters(NamedTuple):
    requests: dict[int, int]  # status code -> count
    errors: dict[str, int]  # kind -> count
    retries: int
    durations: tuple[int, ...]  # per-bucket counts (last slot above every bound)
    duration_sum: float
    recent: dict[int, int]  # epoch second -> requests answered, last 60 s
    in_flight: int  # gauge
    consecutive_failures: int  # gauge: this worker's run of passive failures

    @classmethod
    def of(cls, state: BackendState, now_second: int) -> BackendCounters:
        return cls(
            dict(state.requests),
            dict(state.errors),
            state.retries,
            tuple(state.duration_counts),
            state.duration_sum,
            state.recent_by_second(now_second),
            state.in_flight,
            state.consecutive_failures,
        )

    @property
    def answered(self) -> int:
        return sum(self.requests.values())


EMPTY = BackendCounters({}, {}, 0, (0,) * (len(DURATION_BUCKETS) + 1), 0.0, {}, 0, 0)


class WorkerCounters(NamedTuple):
    backends: dict[str, BackendCounters]
    connections: int  # gauge: client connections open
    unrouted: dict[int, int]  # status -> requests answered without a backend
    dropped_log_lines: int

    @property
    def answered(self) -> int:
        return sum(counters.answered for counters in self.backends.values())


NO_COUNTERS = WorkerCounters({}, 0, {}, 0)


def take(
    states: Mapping[str, BackendState],
    now_second: int,
    connections: int,
    unrouted: Mapping[int, int],
    dropped_log_lines: int,
) -> WorkerCounters:
    """A worker's snapshot (off the hot path: the worker's reporter task calls it)."""
    backends = {name: BackendCounters.of(state, now_second) for name, state in states.items()}
    return WorkerCounters(backends, connections, dict(unrouted), dropped_log_lines)


K = TypeVar("K")


def _add_counts(a: Mapping[K, int], b: Mapping[K, int]) -> dict[K, int]:
    total = dict(a)
    for key, count in b.items():
        total[key] = total.get(key, 0) + count
    return total


def add(a: BackendCounters, b: BackendCounters) -> BackendCounters:
    return BackendCounters(
        _add_counts(a.requests, b.requests),
        _add_counts(a.errors, b.errors),
        a.retries + b.retries,
        tuple(x + y for x, y in zip(a.durations, b.durations, strict=True)),
        a.duration_sum + b.duration_sum,
        _add_counts(a.recent, b.recent),
        a.in_flight + b.in_flight,
        a.consecutive_failures + b.consecutive_failures,
    )


def retired(counters: BackendCounters) -> BackendCounters:
    """What of a dead worker's counters stays in the totals: everything but the gauges."""
    return counters._replace(in_flight=0, consecutive_failures=0)


class Totals:
    """The supervisor's view: retired counts plus the latest snapshot of each live worker."""

    def __init__(self) -> None:
        self.live: dict[int, WorkerCounters] = {}  # by worker index
        self.retired_backends: dict[str, BackendCounters] = {}
        self.retired_unrouted: dict[int, int] = {}
        self.retired_dropped = 0

    def update(self, index: int, counters: WorkerCounters) -> None:
        self.live[index] = counters

    def passive(self, index: int, name: str, consecutive: int) -> None:
        """Worker ``index`` reported its run of passive failures on ``name`` ahead of its next
        snapshot (the run decides health, so it cannot wait)."""
        counters = self.live.get(index, NO_COUNTERS)
        backend = counters.backends.get(name, EMPTY)._replace(consecutive_failures=consecutive)
        self.live[index] = counters._replace(backends={**counters.backends, name: backend})

    def retire(self, index: int) -> None:
        """Worker ``index`` exited: keep what it counted, drop its gauges."""
        counters = self.live.pop(index, None)
        if counters is None:
            return
        for name, backend in counters.backends.items():
            before = self.retired_backends.get(name, EMPTY)
            self.retired_backends[name] = add(before, retired(backend))
        self.retired_unrouted = _add_counts(self.retired_unrouted, counters.unrouted)
        self.retired_dropped += counters.dropped_log_lines

    def forget_except(self, names: Iterable[str]) -> None:
        """A reload removed backends: their retired counts go, as their series do."""
        keep = set(names)
        for name in [name for name in self.retired_backends if name not in keep]:
            del self.retired_backends[name]

    def backend(self, name: str) -> BackendCounters:
        total = self.retired_backends.get(name, EMPTY)
        for counters in self.live.values():
            backend = counters.backends.get(name)
            if backend is not None:
                total = add(total, backend)
        return total

    def connections(self) -> int:
        return sum(counters.connections for counters in self.live.values())

    def unrouted(self) -> dict[int, int]:
        total = dict(self.retired_unrouted)
        for counters in self.live.values():
            total = _add_counts(total, counters.unrouted)
        return total

    def dropped_log_lines(self) -> int:
        return self.retired_dropped + sum(c.dropped_log_lines for c in self.live.values())

    def load(self, states: Mapping[str, BackendState]) -> None:
        """Write the totals into the supervisor's states (health and check counts are the
        supervisor's own and stay)."""
        for name, state in states.items():
            load(state, self.backend(name))


def load(state: BackendState, total: BackendCounters) -> None:
    state.requests = dict(total.requests)
    state.errors = dict(total.errors)
    state.retries = total.retries
    state.duration_counts = list(total.durations)
    state.duration_sum = total.duration_sum
    state.load_recent(total.recent)
    state.in_flight = total.in_flight
    state.consecutive_failures = total.consecutive_failures
