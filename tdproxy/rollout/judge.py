"""Judging a rollout step on the proxy's own counters for the ``to`` backend (pure).

Theory of operation: at the start of a step's window and at each look after it, every admin
server's ``/metrics`` is read into :class:`Counters` for ``to``. The window is judged on the
*difference* (summed over every proxy), never on totals since the process started, so what
happened before the step does not count.

What the counters mean (see how the data plane counts, ``tdproxy/dataplane/client.py`` and
``relay.py``): every attempt to serve a request on a backend ends in one of

- an answer counted in ``tdproxy_requests_total{backend,code}``: the backend's own status, or a
  502/504 that tdproxy made itself after an upstream error it could not retry;
- a retry on another backend, counted in ``tdproxy_retries_total{backend}`` (after a connect
  error, or a reset/timeout of a request that may be sent again).

Each upstream error (``tdproxy_upstream_errors_total{backend,kind}``: connect, timeout, reset,
protocol) is one failed attempt, and it shows up as a retry, as tdproxy's own 502/504, or (when
part of the answer had already reached the client) as an answer cut short whose status was the
backend's. So:

- requests = answers + retries (the requests sent to ``to``);
- errors = 5xx answers other than 502/504 + max(502/504 answers + retries, upstream errors).
  The maximum counts a 502/504 that tdproxy made for an upstream error once, not twice, and
  still counts the upstream errors that cut an answer short. (A window in which ``to`` itself
  answers 502/504 *and* cuts answers short is counted low by the smaller of the two.)
- p99: from the difference of the duration histogram's cumulative buckets, interpolated
  linearly inside the bucket that holds the rank, as Prometheus' ``histogram_quantile`` does;
  a rank in the ``+Inf`` bucket is *above* the highest bound (infinite), not equal to it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

GATEWAY_CODES = frozenset({502, 504})
INF = math.inf

Buckets = tuple[tuple[float, float], ...]  # (upper bound, cumulative count), +Inf last


@dataclass(frozen=True)
class Counters:
    """The ``to`` backend's counters as one proxy reported them at one moment (or a sum or
    difference of such)."""

    answered: int = 0  # answers, any status (tdproxy_requests_total)
    server_errors: int = 0  # of those, 5xx other than 502/504
    gateway_errors: int = 0  # of those, 502 and 504 (the backend's or tdproxy's own)
    retried: int = 0  # failed on it, then retried elsewhere (tdproxy_retries_total)
    upstream_errors: int = 0  # transport failures, every kind (tdproxy_upstream_errors_total)
    buckets: Buckets = ()

    @property
    def requests(self) -> int:
        return self.answered + self.retried

    @property
    def errors(self) -> int:
        return self.server_errors + max(self.gateway_errors + self.retried, self.upstream_errors)

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    def p99(self) -> float | None:
        return quantile(0.99, self.buckets)

    def _values(self) -> tuple[int, ...]:
        return (
            self.answered,
            self.server_errors,
            self.gateway_errors,
            self.retried,
            self.upstream_errors,
        )

    def minus(self, earlier: Counters) -> Counters:
        """What happened since ``earlier``. A counter that went down means the process started
        over (counters reset), so everything it counts now happened since: as Prometheus'
        ``increase()`` treats a reset."""
        now, then = self._values(), earlier._values()
        bucket_drop = _bucket_counts(self.buckets, earlier.buckets, sign=-1)
        if any(a < b for a, b in zip(now, then, strict=True)) or bucket_drop is None:
            return self
        return Counters._of([a - b for a, b in zip(now, then, strict=True)], bucket_drop)

    def plus(self, other: Counters) -> Counters:
        values = [a + b for a, b in zip(self._values(), other._values(), strict=True)]
        return Counters._of(values, _bucket_counts(self.buckets, other.buckets, sign=1) or ())

    @staticmethod
    def _of(values: list[int], buckets: Buckets) -> Counters:
        answered, server, gateway, retried, upstream = values
        return Counters(answered, server, gateway, retried, upstream, buckets)


def _bucket_counts(first: Buckets, second: Buckets, sign: int) -> Buckets | None:
    """``first`` plus (or minus) ``second``, bound by bound; ``None`` when a difference would be
    negative (a reset). Bounds present in only one side count as 0 in the other."""
    if not second:
        return first
    if not first:
        return second if sign > 0 else None
    table = dict(first)
    for bound, count in second:
        table[bound] = table.get(bound, 0.0) + sign * count
    if any(count < 0 for count in table.values()):
        return None
    return tuple(sorted(table.items()))


def total(counters: Iterable[Counters]) -> Counters:
    result = Counters()
    for item in counters:
        result = result.plus(item)
    return result


def quantile(q: float, buckets: Buckets) -> float | None:
    """The ``q`` quantile from cumulative buckets; ``None`` without observations, ``inf`` when
    the rank lies above the highest finite bound."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for bound, cumulative in buckets:
        if cumulative >= rank and cumulative > below:
            if math.isinf(bound):
                return INF
            return lower + (bound - lower) * (rank - below) / (cumulative - below)
        lower, below = bound, cumulative
    return INF


def counters_from_metrics(text: str, backend: str) -> Counters:
    """``backend``'s counters from a ``/metrics`` answer (Prometheus text format); ``ValueError``
    when the text is not that format."""
    answered = server = gateway = retried = upstream = 0
    buckets: dict[float, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("backend") != backend:
                continue
            if sample.name == "tdproxy_request_duration_seconds_bucket":
                buckets[float(sample.labels["le"])] = sample.value
                continue
            value = int(sample.value)
            if sample.name == "tdproxy_requests_total":
                code = int(sample.labels.get("code", "0"))
                answered += value
                if code in GATEWAY_CODES:
                    gateway += value
                elif code >= 500:
                    server += value
            elif sample.name == "tdproxy_retries_total":
                retried += value
            elif sample.name == "tdproxy_upstream_errors_total":
                upstream += value
    return Counters(answered, server, gateway, retried, upstream, tuple(sorted(buckets.items())))


@dataclass(frozen=True)
class Limits:
    max_error_rate: float  # 0..1; a step above it fails
    max_p99: float | None  # seconds; None: latency is not judged
    min_requests: int  # fewer requests than this in a window: too little to judge


@dataclass(frozen=True)
class Verdict:
    outcome: str  # ok | short (too few requests) | fail | pending (judged again later)
    reason: str = ""


def judge(window: Counters, limits: Limits, *, final: bool) -> Verdict:
    """The verdict on a window. Before its end (``final`` false) a window only fails, once it
    holds enough requests and is already over a limit; otherwise it is ``pending``."""
    if window.requests < limits.min_requests:
        if not final:
            return Verdict("pending")
        return Verdict(
            "short", f"{window.requests} of the {limits.min_requests} requests needed to judge"
        )
    if window.error_rate > limits.max_error_rate:
        return Verdict(
            "fail",
            f"error rate {percent_text(window.error_rate)} over the limit "
            f"{percent_text(limits.max_error_rate)}",
        )
    p99 = window.p99()
    if limits.max_p99 is not None and p99 is not None and p99 > limits.max_p99:
        return Verdict(
            "fail", f"p99 {p99_text(window)} over the limit {seconds_text(limits.max_p99)}"
        )
    return Verdict("ok" if final else "pending")


def percent_text(rate: float) -> str:
    """``0.4%``, ``12%``, ``0%``, ``0.05%``."""
    value = rate * 100
    if value == 0 or value >= 10:
        return f"{value:.0f}%"
    if value < 0.1:
        return f"{value:.2f}%"
    return f"{value:.1f}%"


def seconds_text(seconds: float) -> str:
    """``120 ms``, ``1.5 s``."""
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    return f"{seconds:.2f}".rstrip("0").rstrip(".") + " s"


def p99_text(window: Counters) -> str:
    """The window's p99 as printed: ``120 ms``; ``over 10 s`` above the highest finite bucket
    bound; ``-`` without requests."""
    p99 = window.p99()
    if p99 is None:
        return "-"
    if math.isinf(p99):
        bounds = [bound for bound, _ in window.buckets if not math.isinf(bound)]
        return f"over {seconds_text(max(bounds))}" if bounds else "over the highest bucket"
    return seconds_text(p99)
