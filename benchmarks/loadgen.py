"""The load generators' command lines and what their output says: wrk and h2load.

Pure functions (no process is started here), checked by ``tests/unit/test_benchmark_loadgen.py``.
Standard library only.
"""

from __future__ import annotations

import dataclasses
import re

from scenarios import Load

_UNIT_SECONDS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION = r"([\d.]+)(us|ms|s|m|h)"


class OutputError(Exception):
    """The load generator's output lacks a line the benchmark needs."""


@dataclasses.dataclass
class LoadResult:
    """What one load-generator run measured (before the CPU figures are added)."""

    requests_per_s: float
    p50_ms: float
    p99_ms: float
    requests: int  # completed requests (for h2load: succeeded ones)
    non_2xx_3xx: int  # responses that were neither 2xx nor 3xx
    socket_errors: dict[str, int]  # kind -> count; wrk: connect/read/write/timeout
    protocol: str = ""  # h2load's negotiated application protocol


def url(port: int, path: str, tls: bool, host: str = "127.0.0.1") -> str:
    return f"{'https' if tls else 'http'}://{host}:{port}{path}"


def wrk_argv(load: Load, target_url: str, seconds: int, threads: int = 1) -> list[str]:
    argv = ["wrk", "-t", str(min(threads, load.connections)), "-c", str(load.connections)]
    argv += ["-d", f"{seconds}s", "--latency"]
    if load.close:
        argv += ["-H", "Connection: close"]
    return [*argv, target_url]


def h2load_argv(
    load: Load,
    target_url: str,
    *,
    seconds: int | None = None,
    requests: int | None = None,
    log_file: str | None = None,
) -> list[str]:
    """h2load for ``seconds`` (timing-based) or for ``requests`` requests."""
    argv = ["h2load", "-t", "1", "-c", str(load.connections), "-m", str(load.streams)]
    if load.h1:
        argv.append("--h1")
    if load.close:
        argv += ["-H", "Connection: close"]
    if seconds is not None:
        argv += ["-D", str(seconds)]
    if requests is not None:
        argv += ["-n", str(requests)]
    if log_file is not None:
        argv.append(f"--log-file={log_file}")
    return [*argv, target_url]


def _find(pattern: str, output: str, tool: str) -> re.Match[str]:
    match = re.search(pattern, output, re.MULTILINE)
    if not match:
        raise OutputError(f"{tool} output has no match for {pattern!r}:\n{output}")
    return match


def duration_ms(value: str, unit: str) -> float:
    return float(value) * _UNIT_SECONDS[unit] * 1000.0


def parse_wrk(output: str) -> LoadResult:
    p50 = _find(rf"^\s*50%\s+{_DURATION}", output, "wrk")
    p99 = _find(rf"^\s*99%\s+{_DURATION}", output, "wrk")
    errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    kinds = ("connect", "read", "write", "timeout")
    return LoadResult(
        requests_per_s=float(_find(r"^Requests/sec:\s+([\d.]+)", output, "wrk").group(1)),
        p50_ms=duration_ms(*p50.groups()),
        p99_ms=duration_ms(*p99.groups()),
        requests=int(_find(r"^\s*(\d+) requests in", output, "wrk").group(1)),
        non_2xx_3xx=int(non_2xx.group(1)) if non_2xx else 0,
        socket_errors=dict(zip(kinds, map(int, errors.groups()), strict=True)) if errors else {},
    )


@dataclasses.dataclass
class H2loadSummary:
    requests_per_s: float
    done: int
    succeeded: int
    failed: int
    errored: int
    timeout: int
    status: dict[str, int]  # "2xx" .. "5xx" -> count
    data_bytes: int  # response body bytes received
    protocol: str


def parse_h2load(output: str) -> H2loadSummary:
    """The summary lines h2load prints at the end of a run."""
    rate = _find(r"^finished in [\d.]+\w*, ([\d.]+) req/s", output, "h2load")
    counts = _find(
        r"^requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed, "
        r"(\d+) errored, (\d+) timeout",
        output,
        "h2load",
    )
    codes = _find(r"^status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", output, "h2load")
    data = _find(r"^traffic: .*?\((\d+)\) data", output, "h2load")
    protocol = re.search(r"^Application protocol: (\S+)", output, re.MULTILINE)
    done, succeeded, failed, errored, timeout = map(int, counts.groups())
    return H2loadSummary(
        requests_per_s=float(rate.group(1)),
        done=done,
        succeeded=succeeded,
        failed=failed,
        errored=errored,
        timeout=timeout,
        status=dict(zip(("2xx", "3xx", "4xx", "5xx"), map(int, codes.groups()), strict=True)),
        data_bytes=int(data.group(1)),
        protocol=protocol.group(1) if protocol else "",
    )


def request_times_us(log_text: str) -> list[int]:
    """The per-request times of h2load's ``--log-file`` (start, status, microseconds)."""
    times = []
    for line in log_text.splitlines():
        fields = line.split("\t")
        if len(fields) >= 3 and fields[2].isdigit():
            times.append(int(fields[2]))
    return times


def percentile(sorted_values: list[int], percent: float) -> float:
    """The nearest-rank percentile of already sorted values (0 for none)."""
    if not sorted_values:
        return 0.0
    rank = max(1, -(-len(sorted_values) * percent // 100))  # ceil without floats drifting
    return float(sorted_values[min(int(rank), len(sorted_values)) - 1])


def h2load_result(output: str, log_text: str) -> LoadResult:
    summary = parse_h2load(output)
    times = sorted(request_times_us(log_text))
    errors = {"failed": summary.failed, "errored": summary.errored, "timeout": summary.timeout}
    return LoadResult(
        requests_per_s=summary.requests_per_s,
        p50_ms=percentile(times, 50) / 1000.0,
        p99_ms=percentile(times, 99) / 1000.0,
        requests=summary.succeeded,
        non_2xx_3xx=summary.status["4xx"] + summary.status["5xx"],
        socket_errors={k: v for k, v in errors.items() if v},
        protocol=summary.protocol,
    )


def h2load_check(output: str, requests: int, body_size: int, protocol: str) -> str | None:
    """Why a short h2load run shows the target not serving as expected, or None when it does:
    every request a 2xx, ``body_size`` bytes each, over ``protocol``."""
    try:
        s = parse_h2load(output)
    except OutputError as exc:
        return str(exc)
    if s.protocol and s.protocol != protocol:
        return f"negotiated {s.protocol!r}, not {protocol!r}"
    if s.succeeded != requests or s.status["2xx"] != requests:
        return f"{s.succeeded}/{requests} succeeded, status codes {s.status}"
    if s.data_bytes != requests * body_size:
        return f"{s.data_bytes} body bytes for {requests} requests, not {body_size} each"
    return None
