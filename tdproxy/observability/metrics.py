"""Prometheus metrics, computed when scraped: nothing here runs on the hot path.

The data plane only bumps plain integers on :class:`~tdproxy.routing.state.BackendState`
(status counts, error kinds, retries, per-bucket duration counts, the 60-second request ring).
:class:`TdproxyCollector` turns those into metric families at scrape time: it cumulates the
duration buckets, derives the observed traffic share and reads the configured weights (and the
weights after slow start that the rotation uses now) from the current routing table. Labels
come only from config names (backend names) and from fixed sets chosen by tdproxy (error kinds,
check results, reload results), never from request data.
The count of dropped log lines is process-wide and comes from
:mod:`tdproxy.observability.log_output`.

Series follow the current config: a backend removed by a reload disappears from every family,
since the router no longer holds its state. The collector is registered on its own
:class:`CollectorRegistry`, so nothing leaks into (or from) the process-global registry.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder

import tdproxy
from tdproxy.controlplane.reload_state import ReloadHistory
from tdproxy.observability import log_output
from tdproxy.routing.router import Router
from tdproxy.routing.state import DURATION_BUCKETS
from tdproxy.routing.table import RoutingTable, Target
from tdproxy.workers.report import WorkersReport

# Error kinds always exported (at 0 until seen), so rate() works before the first failure.
KNOWN_ERROR_KINDS = ("connect", "timeout", "reset")
# The ``le`` label values, written as Prometheus writes them (0.005, 1.0, +Inf).
BUCKET_LABELS = (*(str(float(bound)) for bound in DURATION_BUCKETS), "+Inf")


class MetricsSource(Protocol):
    """What the collector reads; the running app (and the admin server's source) provide it."""

    router: Router
    reload_history: ReloadHistory

    def connections_active(self) -> int: ...

    def unrouted_requests(self) -> dict[int, int]: ...

    def workers_report(self) -> WorkersReport: ...


class TdproxyCollector:
    """A custom collector: every family is built from the live objects on each scrape."""

    def __init__(
        self,
        source: MetricsSource,
        clock: Callable[[], float] = time.time,
        dropped_log_lines: Callable[[], int] = log_output.dropped_lines,
    ) -> None:
        self._source = source
        self._clock = clock
        self._dropped_log_lines = dropped_log_lines

    def describe(self) -> list[Metric]:
        # Registration must not call collect(): the source may still be starting up.
        return []

    def collect(self) -> Iterator[Metric]:
        source = self._source
        targets = source.router.table.targets
        yield from self._request_families(targets)
        yield self._unrouted_family(source)
        yield from self._backend_gauges(source.router.table)
        yield from self._failure_families(targets)
        yield from self._process_families(source)

    def _request_families(self, targets: Sequence[Target]) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "tdproxy_requests",
            "Requests answered, by backend and status code.",
            labels=["backend", "code"],
        )
        duration = HistogramMetricFamily(
            "tdproxy_request_duration_seconds",
            "Time from the request's arrival to its answer being complete, by backend.",
            labels=["backend"],
        )
        for target in targets:
            state = target.state
            for code, count in sorted(state.requests.items()):
                requests.add_metric([target.name, str(code)], count)
            duration.add_metric(
                [target.name], cumulative_buckets(state.duration_counts), state.duration_sum
            )
        yield requests
        yield duration

    def _unrouted_family(self, source: MetricsSource) -> Metric:
        unrouted = CounterMetricFamily(
            "tdproxy_unrouted_requests",
            "Requests answered without reaching a backend, by status code: refused by tdproxy "
            "(400, 405, 408, 413, 414, 431), no backend available (503), or the client left "
            "before a backend was chosen (499).",
            labels=["code"],
        )
        for code, count in sorted(source.unrouted_requests().items()):
            unrouted.add_metric([str(code)], count)
        return unrouted

    def _backend_gauges(self, table: RoutingTable) -> Iterator[Metric]:
        targets = table.targets
        share = GaugeMetricFamily(
            "tdproxy_backend_traffic_share",
            "Share (0..1) of the requests answered over the last 60 s that this backend served.",
            labels=["backend"],
        )
        weight = GaugeMetricFamily(
            "tdproxy_backend_weight", "Configured weight of the backend.", labels=["backend"]
        )
        effective = GaugeMetricFamily(
            "tdproxy_backend_effective_weight",
            "Weight the rotation gives the backend now: the configured weight, or during slow "
            "start the part of it its ramp has reached.",
            labels=["backend"],
        )
        up = GaugeMetricFamily(
            "tdproxy_backend_up", "1 when the backend is healthy, 0 when not.", labels=["backend"]
        )
        in_flight = GaugeMetricFamily(
            "tdproxy_backend_in_flight", "Requests being served by the backend.", labels=["backend"]
        )
        shares = observed_shares(targets, int(self._clock()))
        for target in targets:
            state = target.state
            share.add_metric([target.name], shares[target.name])
            weight.add_metric([target.name], target.weight)
            effective.add_metric([target.name], table.effective_weight(target))
            up.add_metric([target.name], 1 if state.healthy else 0)
            in_flight.add_metric([target.name], state.in_flight)
        yield from (share, weight, effective, up, in_flight)

    def _failure_families(self, targets: Sequence[Target]) -> Iterator[Metric]:
        errors = CounterMetricFamily(
            "tdproxy_upstream_errors",
            "Failed upstream attempts (connect, timeout, reset, ...), by backend and kind.",
            labels=["backend", "kind"],
        )
        retries = CounterMetricFamily(
            "tdproxy_retries",
            "Requests retried on another backend after failing on this one.",
            labels=["backend"],
        )
        checks = CounterMetricFamily(
            "tdproxy_health_checks",
            "Active health-check results, by backend and result.",
            labels=["backend", "result"],
        )
        for target in targets:
            state = target.state
            kinds = dict.fromkeys(KNOWN_ERROR_KINDS, 0) | state.errors
            for kind, count in sorted(kinds.items()):
                errors.add_metric([target.name, kind], count)
            retries.add_metric([target.name], state.retries)
            for result in ("success", "failure"):
                checks.add_metric([target.name, result], state.checks.get(result, 0))
        yield from (errors, retries, checks)

    def _process_families(self, source: MetricsSource) -> Iterator[Metric]:
        history = source.reload_history
        reloads = CounterMetricFamily(
            "tdproxy_config_reloads", "Config reload attempts, by result.", labels=["result"]
        )
        for result in ("success", "failure"):
            reloads.add_metric([result], history.reloads.get(result, 0))
        yield reloads
        yield GaugeMetricFamily(
            "tdproxy_config_generation",
            "The config generation serving now: 1 at start, one more for each applied reload.",
            value=source.router.generation,
        )
        yield GaugeMetricFamily(
            "tdproxy_config_last_reload_successful",
            "1 when the last config reload succeeded (or none was tried yet), 0 when it failed.",
            value=1 if history.last_successful else 0,
        )
        yield GaugeMetricFamily(
            "tdproxy_connections_active",
            "Client connections open on the entrypoint.",
            value=source.connections_active(),
        )
        workers = source.workers_report()
        yield CounterMetricFamily(
            "tdproxy_log_lines_dropped",
            "Log lines (access log and tdproxy's own log) dropped because their output could "
            "not keep up; logging never blocks traffic.",
            value=self._dropped_log_lines() + workers.dropped_log_lines,
        )
        yield GaugeMetricFamily(
            "tdproxy_workers",
            "Data-plane processes serving now (1 without worker processes).",
            value=workers.live,
        )
        yield CounterMetricFamily(
            "tdproxy_worker_restarts",
            "Worker processes started again after one died.",
            value=workers.restarts,
        )
        build = GaugeMetricFamily(
            "tdproxy_build_info", "tdproxy's version; the value is always 1.", labels=["version"]
        )
        build.add_metric([tdproxy.__version__], 1)
        yield build


def cumulative_buckets(counts: Sequence[int]) -> list[tuple[str, float]]:
    """Per-bucket counts (last slot above every bound) -> Prometheus' cumulative ``le`` buckets."""
    buckets: list[tuple[str, float]] = []
    running = 0
    for label, count in zip(BUCKET_LABELS, counts, strict=True):
        running += count
        buckets.append((label, running))
    return buckets


def observed_shares(targets: Sequence[Target], now_second: int) -> dict[str, float]:
    """Each backend's share of the requests answered over the last 60 s; all 0 without traffic."""
    recent = {target.name: target.state.recent_requests(now_second) for target in targets}
    total = sum(recent.values())
    return {name: (count / total if total else 0.0) for name, count in recent.items()}


def estimate_quantile(q: float, counts: Sequence[int]) -> float | None:
    """Estimate a quantile from per-bucket duration counts, as Prometheus' histogram_quantile does:
    linear interpolation inside the bucket that holds the rank (the first bucket starts at 0).
    A rank in the +Inf bucket yields the highest finite bound. None when there is no data."""
    total = sum(counts)
    if total == 0:
        return None
    rank = q * total
    running = 0
    lower = 0.0
    for bound, count in zip(DURATION_BUCKETS, counts, strict=False):
        if count and running + count >= rank:
            return lower + (bound - lower) * (rank - running) / count
        running += count
        lower = bound
    return DURATION_BUCKETS[-1]


def build_registry(
    source: MetricsSource, clock: Callable[[], float] = time.time
) -> CollectorRegistry:
    """A registry of its own holding only tdproxy's collector."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(TdproxyCollector(source, clock))
    return registry


def exposition(registry: CollectorRegistry, accept: str = "") -> tuple[bytes, str]:
    """The scrape body and its content type: OpenMetrics when the scraper's ``Accept`` header
    asks for it (as Prometheus does), the classic text format otherwise."""
    encoder, content_type = choose_encoder(accept)
    return encoder(registry), content_type
