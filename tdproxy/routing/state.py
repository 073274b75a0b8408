"""Observed state: what the proxy has learned about a backend at run time.

A :class:`BackendState` outlives config generations: a reload that keeps a backend (matched by
name) hands the same object to the new routing table, so health, passive-failure counts and
counters carry over. Plain integers only, so the hot path pays a few increments per request.

``ramp_started`` is when the backend last came into service (back up after being down, or added
or raised from weight 0 by a reload): the start of its slow-start ramp, whose length is
configured (``routing.slow_start``; see :mod:`tdproxy.routing.slow_start`). None since the
process started, and while the backend is down.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Callable

# Per-second buckets of the last minute, for the observed traffic share.
SHARE_WINDOW_SECONDS = 60
# Upper bounds (seconds) of the request-duration histogram buckets; +Inf is implied.
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class BackendState:
    __slots__ = (
        "_ring",
        "_ring_second",
        "checks",
        "consecutive_failures",
        "duration_counts",
        "duration_sum",
        "errors",
        "health_changed_at",
        "health_reason",
        "healthy",
        "in_flight",
        "name",
        "ramp_started",
        "requests",
        "retries",
    )

    def __init__(self, name: str, healthy: bool = True) -> None:
        self.name = name
        self.healthy = healthy
        self.health_changed_at = time.time()
        self.health_reason = "initial"
        self.ramp_started: float | None = None  # monotonic seconds; None = not ramping
        self.consecutive_failures = 0  # passive: connect errors / timeouts on real traffic
        self.in_flight = 0
        self.requests: dict[int, int] = {}  # status code -> count
        self.errors: dict[str, int] = {}  # kind (connect, timeout, reset, ...) -> count
        self.retries = 0
        self.checks = {"success": 0, "failure": 0}  # active health-check results
        # duration_counts[i] counts requests with DURATION_BUCKETS[i-1] < d <= DURATION_BUCKETS[i]
        # (the last slot is above every bound); cumulated only when scraped.
        self.duration_counts = [0] * (len(DURATION_BUCKETS) + 1)
        self.duration_sum = 0.0
        self._ring = [0] * SHARE_WINDOW_SECONDS
        self._ring_second = [-1] * SHARE_WINDOW_SECONDS

    def record_response(self, status: int, now_second: int, seconds: float | None = None) -> None:
        """Count one answered request, and its duration when given (the hot path's only
        per-request bookkeeping here, in one call)."""
        requests = self.requests
        requests[status] = requests.get(status, 0) + 1
        slot = now_second % SHARE_WINDOW_SECONDS
        if self._ring_second[slot] != now_second:
            self._ring_second[slot] = now_second
            self._ring[slot] = 0
        self._ring[slot] += 1
        if seconds is not None:
            self.duration_counts[bisect_left(DURATION_BUCKETS, seconds)] += 1
            self.duration_sum += seconds

    def record_duration(self, seconds: float) -> None:
        self.duration_counts[bisect_left(DURATION_BUCKETS, seconds)] += 1
        self.duration_sum += seconds

    def record_error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1

    def total_requests(self) -> int:
        return sum(self.requests.values())

    def recent_requests(self, now_second: int) -> int:
        """Requests answered in the last ``SHARE_WINDOW_SECONDS`` seconds."""
        oldest = now_second - SHARE_WINDOW_SECONDS
        return sum(
            count
            for second, count in zip(self._ring_second, self._ring, strict=True)
            if second > oldest
        )

    def recent_by_second(self, now_second: int) -> dict[int, int]:
        """The last ``SHARE_WINDOW_SECONDS`` seconds' answered requests, by epoch second."""
        oldest = now_second - SHARE_WINDOW_SECONDS
        return {
            second: count
            for second, count in zip(self._ring_second, self._ring, strict=True)
            if second > oldest and count
        }

    def load_recent(self, by_second: dict[int, int]) -> None:
        """Replace the per-second ring with ``by_second`` (a worker supervisor's sums)."""
        self._ring = [0] * SHARE_WINDOW_SECONDS
        self._ring_second = [-1] * SHARE_WINDOW_SECONDS
        for second, count in by_second.items():
            slot = second % SHARE_WINDOW_SECONDS
            if second > self._ring_second[slot]:
                self._ring_second[slot] = second
                self._ring[slot] = count

    def set_health(
        self,
        healthy: bool,
        reason: str,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> bool:
        """Change health; return True when it actually changed. Coming back up starts a ramp."""
        if healthy == self.healthy:
            return False
        self.healthy = healthy
        self.health_reason = reason
        self.health_changed_at = clock()
        self.ramp_started = monotonic() if healthy else None
        return True

    def start_ramp(self, now: float) -> None:
        """The backend comes into service at ``now`` (monotonic): added or raised from weight 0."""
        self.ramp_started = now

    def __repr__(self) -> str:
        health = "up" if self.healthy else "down"
        return (
            f"<BackendState {self.name} {health} in_flight={self.in_flight} "
            f"requests={self.total_requests()}>"
        )
