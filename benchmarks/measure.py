"""One measured run of a load generator against a variant, with the CPU it cost.

For every run this reads the CPU time (user + system, from ``/proc``) of the target's own
processes (its whole session: nginx's master and workers, tdproxy's supervisor and workers) and
divides it by the requests the load generator counted, and it measures the CPU that processes
*outside* the benchmark used meanwhile, so rounds disturbed by other work are flagged.
Standard library only.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import tempfile
import time
from pathlib import Path

import loadgen
from processes import Child
from scenarios import Variant
from servers import BenchmarkError, check_http

OTHER_CPU_WARN = 5.0  # percent of all cores


@dataclasses.dataclass(frozen=True)
class Endpoint:
    """Where a variant's load goes: the process serving it and its port."""

    variant: Variant
    child: Child
    port: int


@dataclasses.dataclass
class RunResult:
    scenario: str
    target: str  # the variant's name
    round: int
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    requests: int
    non_2xx_3xx: int
    socket_errors: dict[str, int]
    other_cpu_percent: float = 0.0  # CPU used by processes outside the benchmark, all cores
    target_cpu_percent: float = 0.0  # CPU the target's processes used, in % of one core
    cpu_us_per_request: float = 0.0  # the target's CPU time (user + system) per request
    protocol: str = ""


# --------------------------------------------------------------------------- CPU accounting


@dataclasses.dataclass(frozen=True)
class CpuSnapshot:
    busy: int  # ticks, all cores, not idle
    total: int  # ticks, all cores
    ours: int  # ticks used by this script, its reaped children and the target sessions


def _system_ticks() -> tuple[int, int]:
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    total = sum(fields[:8])  # user nice system idle iowait irq softirq steal
    return total - fields[3] - fields[4], total


def session_ticks(sessions: frozenset[int]) -> int:
    ticks = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # the process went away
        if int(fields[3]) in sessions:  # field 6, the session id
            ticks += int(fields[11]) + int(fields[12])  # utime + stime
    return ticks


def cpu_snapshot(sessions: frozenset[int]) -> CpuSnapshot:
    own = os.times()
    own_seconds = own.user + own.system + own.children_user + own.children_system
    own_ticks = round(own_seconds * os.sysconf("SC_CLK_TCK"))
    busy, total = _system_ticks()
    return CpuSnapshot(busy, total, own_ticks + session_ticks(sessions))


def other_cpu_percent(before: CpuSnapshot, after: CpuSnapshot) -> float:
    """CPU that processes outside the benchmark used between two snapshots, in % of all cores."""
    other = (after.busy - before.busy) - (after.ours - before.ours)
    return max(0.0, 100.0 * other / max(after.total - before.total, 1))


def cpu_busy_percent(interval: float = 1.0) -> float:
    """How busy all cores were over `interval` seconds."""
    busy0, total0 = _system_ticks()
    time.sleep(interval)
    busy1, total1 = _system_ticks()
    return 100.0 * (busy1 - busy0) / max(total1 - total0, 1)


# --------------------------------------------------------------------------- one run


def load_argv(endpoint: Endpoint, seconds: int, threads: int, log_file: str | None) -> list[str]:
    load, server = endpoint.variant.load, endpoint.variant.server
    url = loadgen.url(endpoint.port, load.path, server.tls)
    if load.tool == "h2load":
        return loadgen.h2load_argv(load, url, seconds=seconds, log_file=log_file)
    return loadgen.wrk_argv(load, url, seconds, threads)


def run_load(
    endpoint: Endpoint,
    scenario: str,
    seconds: int,
    round_no: int,
    ours: frozenset[int],
    threads: int = 1,
) -> RunResult:
    """One load-generator run; ``ours`` are the session ids whose CPU is not "other"."""
    is_h2load = endpoint.variant.load.tool == "h2load"
    with tempfile.NamedTemporaryFile("r", prefix="tdbench-h2load-", suffix=".log") as times:
        argv = load_argv(endpoint, seconds, threads, times.name if is_h2load else None)
        mine = frozenset({endpoint.child.proc.pid})
        before, target_before = cpu_snapshot(ours), session_ticks(mine)
        started = time.monotonic()
        try:
            result = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
        except subprocess.TimeoutExpired as exc:
            raise BenchmarkError(f"{' '.join(argv)} did not finish within {exc.timeout} s") from exc
        elapsed = time.monotonic() - started
        target_seconds = (session_ticks(mine) - target_before) / os.sysconf("SC_CLK_TCK")
        other_cpu = other_cpu_percent(before, cpu_snapshot(ours))
        if result.returncode != 0:
            raise BenchmarkError(f"{' '.join(argv)} failed:\n{result.stdout}{result.stderr}")
        if endpoint.child.proc.poll() is not None:
            raise BenchmarkError(
                f"{endpoint.child.name} died during the run (exit "
                f"{endpoint.child.proc.returncode}):\n{endpoint.child.log_tail()}"
            )
        try:
            if is_h2load:
                parsed = loadgen.h2load_result(result.stdout, Path(times.name).read_text())
            else:
                parsed = loadgen.parse_wrk(result.stdout)
        except loadgen.OutputError as exc:
            raise BenchmarkError(str(exc)) from exc
    return RunResult(
        scenario=scenario,
        target=endpoint.variant.name,
        round=round_no,
        requests_per_s=parsed.requests_per_s,
        p50_ms=parsed.p50_ms,
        p99_ms=parsed.p99_ms,
        requests=parsed.requests,
        non_2xx_3xx=parsed.non_2xx_3xx,
        socket_errors=parsed.socket_errors,
        other_cpu_percent=round(other_cpu, 1),
        target_cpu_percent=round(100.0 * target_seconds / elapsed, 1),
        cpu_us_per_request=round(1e6 * target_seconds / max(parsed.requests, 1), 2),
        protocol=parsed.protocol,
    )


def describe(result: RunResult) -> str:
    text = (
        f"{result.requests_per_s:>9.0f} req/s  p50 {result.p50_ms:.2f} ms  "
        f"p99 {result.p99_ms:.2f} ms  CPU {result.target_cpu_percent:.0f}% "
        f"{result.cpu_us_per_request:.1f} us/req"
    )
    errors = sum(result.socket_errors.values())
    if result.non_2xx_3xx or errors:
        text += f"  !! non-2xx/3xx {result.non_2xx_3xx}, socket errors {result.socket_errors}"
    if result.other_cpu_percent > OTHER_CPU_WARN:
        text += f"  !! other processes used {result.other_cpu_percent:.0f}% CPU"
    return text


# --------------------------------------------------------------------------- checks


def check_serves(endpoint: Endpoint) -> None:
    """The variant's target answers its load's request with a 200 and the expected body size,
    over the protocol the load uses (h2load variants are checked with a short h2load run)."""
    variant, load = endpoint.variant, endpoint.variant.load
    name = f"{variant.name} ({load.describe()})"
    if load.tool != "h2load":
        check_http(name, endpoint.port, load.path, variant.server.tls, load.close, load.body_size)
        return
    requests = 4
    url = loadgen.url(endpoint.port, load.path, variant.server.tls)
    short = dataclasses.replace(load, connections=1, streams=min(load.streams, requests))
    argv = loadgen.h2load_argv(short, url, requests=requests)
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    expected = "http/1.1" if load.h1 else "h2"
    problem = loadgen.h2load_check(result.stdout, requests, load.body_size, expected)
    if result.returncode != 0 or problem is not None:
        raise BenchmarkError(
            f"{name}: {' '.join(argv)} shows it does not serve: "
            f"{problem or f'exit code {result.returncode}'}\n{result.stdout}{result.stderr}"
        )
