#!/usr/bin/env python3
"""Benchmark tdproxy against nginx as a weighted reverse proxy, and measure its idle memory.

Targets, measured with wrk in alternating rounds (backend, nginx, tdproxy, backend, ...):

* ``backend`` - an nginx returning a tiny fixed response, hit directly (the ceiling);
* ``nginx``   - nginx as a weighted reverse proxy in front of that backend;
* ``tdproxy`` - ``python3 -m tdproxy run`` with the same two-backend 50/50 setup.

Then tdproxy's RSS is read with 5,000 idle keep-alive client connections open.
Stdlib only; run as ``python3 benchmarks/run.py --help``. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from string import Template
from typing import Any

from processes import Child, Children, tdproxy_source

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
HOST = "127.0.0.1"
TARGETS = ("backend", "nginx", "tdproxy")
NOFILE_WANTED = 65536
READY_TIMEOUT = 20.0
STOP_TIMEOUT = 5.0


def log(message: str) -> None:
    print(message, flush=True)


class BenchmarkError(Exception):
    """A failure with a message meant for the person running the benchmark."""


# --------------------------------------------------------------------------- command line


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-t", "--threads", type=int, default=1, help="wrk threads (default 1)")
    parser.add_argument("-c", "--connections", type=int, default=50, help="wrk connections")
    parser.add_argument("-d", "--duration", type=int, default=10, help="seconds per wrk run")
    parser.add_argument("-r", "--rounds", type=int, default=5, help="rounds over all targets")
    parser.add_argument("--warmup", type=int, default=2, help="unrecorded seconds per target")
    parser.add_argument("--quick", action="store_true", help="1 round of 3 s, 1 s warm-up")
    parser.add_argument(
        "--targets",
        default=",".join(TARGETS),
        help="comma-separated subset of backend,nginx,tdproxy (default: all)",
    )
    parser.add_argument(
        "--idle-connections", type=int, default=5000, help="for the RSS test (0 = skip)"
    )
    parser.add_argument(
        "--profile-seconds",
        type=int,
        default=0,
        help="also profile tdproxy under wrk load with py-spy for this long (0 = off)",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--markdown", metavar="PATH", help="also write the results as Markdown")
    parser.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (logs)")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.duration, args.warmup = 1, 3, 1
    args.targets = _parse_targets(parser, args.targets)
    return args


def _parse_targets(parser: argparse.ArgumentParser, value: str) -> list[str]:
    wanted = [t.strip() for t in value.split(",") if t.strip()]
    unknown = sorted(set(wanted) - set(TARGETS))
    if unknown or not wanted:
        parser.error(f"--targets: unknown {unknown}; choose from {', '.join(TARGETS)}")
    return [t for t in TARGETS if t in wanted]


# --------------------------------------------------------------------------- tools


def _tools_found() -> bool:
    if not shutil.which("nginx") and Path("/usr/sbin/nginx").exists():
        os.environ["PATH"] += f"{os.pathsep}/usr/sbin"  # not on PATH for non-root users
    return bool(shutil.which("nginx") and shutil.which("wrk"))


def _apt_get(*argv: str) -> bool:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        return subprocess.run(["apt-get", *argv], env=env, check=False).returncode == 0
    except OSError as exc:
        raise BenchmarkError(f"apt-get is not available ({exc}): install nginx and wrk") from exc


def ensure_tools() -> None:
    """Install nginx and wrk from Debian's packages when they are not on PATH."""
    if _tools_found():
        return
    log("nginx or wrk missing: installing the Debian packages nginx-light and wrk")
    install = ("install", "-y", "--no-install-recommends", "nginx-light", "wrk")
    if not _apt_get(*install):
        log("apt-get install failed: running apt-get update, then retrying")
        if not (_apt_get("update") and _apt_get(*install)):
            raise BenchmarkError("apt-get could not install nginx-light and wrk (run as root?)")
    if not _tools_found():
        raise BenchmarkError("nginx/wrk still not on PATH after apt-get install")


def ensure_py_spy() -> str:
    found = shutil.which("py-spy")
    if found:
        return found
    log("py-spy missing: pip install py-spy")
    subprocess.run([sys.executable, "-m", "pip", "install", "py-spy"], check=True)
    found = shutil.which("py-spy")
    if not found:
        raise BenchmarkError("py-spy still not on PATH after pip install")
    return found


def tdproxy_env() -> dict[str, str]:
    path = os.environ.get("PYTHONPATH")
    pythonpath = f"{REPO_ROOT}{os.pathsep}{path}" if path else str(REPO_ROOT)
    return {**os.environ, "PYTHONPATH": pythonpath}


def check_tdproxy_importable() -> None:
    code = (
        "import importlib.util, sys, tdproxy.cli\n"
        "sys.exit(0 if importlib.util.find_spec('tdproxy.__main__') else 3)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO_ROOT,
        env=tdproxy_env(),
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode == 3:
        raise BenchmarkError("tdproxy/__main__.py is missing: `python3 -m tdproxy` cannot run")
    if result.returncode != 0:
        tail = "\n".join(result.stderr.strip().splitlines()[-6:])
        raise BenchmarkError(
            f"tdproxy is not importable yet (`import tdproxy.cli` failed):\n{tail}\n"
            "Run with --targets backend,nginx to benchmark nginx alone."
        )


def raise_nofile_limit() -> int:
    """Raise RLIMIT_NOFILE for this process and so for every child it starts."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < NOFILE_WANTED:
        try:  # root may raise the hard limit too
            resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE_WANTED, NOFILE_WANTED))
            return NOFILE_WANTED
        except (ValueError, OSError):
            pass
    target = NOFILE_WANTED if hard == resource.RLIM_INFINITY else min(hard, NOFILE_WANTED)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# --------------------------------------------------------------------------- child processes


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def wait_for_port(child: Child, port: int, timeout: float = READY_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child.proc.poll() is not None:
            raise BenchmarkError(
                f"{child.name} exited with code {child.proc.returncode} before listening on "
                f"{HOST}:{port}; its log ({child.log_path}):\n{child.log_tail()}"
            )
        try:
            with socket.create_connection((HOST, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise BenchmarkError(
        f"{child.name} did not accept connections on {HOST}:{port} within {timeout:.0f} s; "
        f"its log ({child.log_path}):\n{child.log_tail()}"
    )


def check_serves(name: str, port: int) -> None:
    """One GET through the target: it must answer 200 with the backend's body."""
    url = f"http://{HOST}:{port}/"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            status, body = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read()
    except OSError as exc:
        raise BenchmarkError(f"{name}: GET {url} failed: {exc!r}") from exc
    if status != 200 or body != b"ok\n":
        raise BenchmarkError(f"{name}: GET {url} answered {status} {body[:200]!r}, not 200 'ok'")


# --------------------------------------------------------------------------- targets


@dataclasses.dataclass
class Target:
    name: str
    port: int
    child: Child


def start_nginx(children: Children, tmp: Path, name: str, template: str, **values: int) -> Target:
    prefix = tmp / name
    prefix.mkdir(mode=0o755)
    port = free_port()
    text = Template((HERE / template).read_text()).substitute(prefix=prefix, port=port, **values)
    conf = prefix / "nginx.conf"
    conf.write_text(text)
    argv = ["nginx", "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")]
    child = children.start(name, argv, prefix / "stdout.log")
    wait_for_port(child, port)
    return Target(name, port, child)


def tdproxy_config(port: int, admin_port: int, backend_port: int) -> str:
    backends = "".join(
        f"  - name: {name}\n    url: http://{HOST}:{backend_port}\n    weight: 50\n"
        for name in ("a", "b")
    )
    return (
        f"entrypoint:\n  address: {HOST}\n  port: {port}\n"
        "routing:\n  method: round_robin\n"
        f"backends:\n{backends}"
        "health_check:\n  enabled: false\n"
        f"admin:\n  address: {HOST}\n  port: {admin_port}\n"
        "access_log:\n  enabled: false\n"
    )


def start_tdproxy(children: Children, tmp: Path, backend_port: int) -> Target:
    port = free_port()
    config = tmp / "tdproxy.yaml"
    config.write_text(tdproxy_config(port, free_port(), backend_port))
    argv = [sys.executable, "-m", "tdproxy", "run", "--config", str(config)]
    child = children.start("tdproxy", argv, tmp / "tdproxy.log", cwd=REPO_ROOT, env=tdproxy_env())
    wait_for_port(child, port)
    return Target("tdproxy", port, child)


def start_targets(children: Children, tmp: Path, wanted: list[str]) -> dict[str, Target]:
    backend = start_nginx(children, tmp, "backend", "nginx-backend.conf.tmpl")
    targets = {"backend": backend}
    if "nginx" in wanted:
        targets["nginx"] = start_nginx(
            children, tmp, "nginx", "nginx-proxy.conf.tmpl", backend_port=backend.port
        )
    if "tdproxy" in wanted:
        targets["tdproxy"] = start_tdproxy(children, tmp, backend.port)
    for target in targets.values():
        log(f"{target.name}: pid {target.child.proc.pid}, http://{HOST}:{target.port}/")
        check_serves(target.name, target.port)
    return {name: targets[name] for name in wanted}


# --------------------------------------------------------------------------- CPU accounting

OTHER_CPU_WARN = 5.0  # percent of all cores


@dataclasses.dataclass(frozen=True)
class CpuSnapshot:
    busy: int  # ticks, all cores, not idle
    total: int  # ticks, all cores
    ours: int  # ticks used by this script, its reaped children and the target sessions


def _system_ticks() -> tuple[int, int]:
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    total = sum(fields[:8])  # user nice system idle iowait irq softirq steal
    return total - fields[3] - fields[4], total


def _session_ticks(sessions: frozenset[int]) -> int:
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
    return CpuSnapshot(busy, total, own_ticks + _session_ticks(sessions))


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


def check_machine_idle() -> float:
    busy = cpu_busy_percent()
    if busy > 10.0:
        log(f"!! warning: the CPUs are already {busy:.0f}% busy; results will be noisy")
    return busy


# --------------------------------------------------------------------------- wrk

_UNIT_SECONDS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION = r"([\d.]+)(us|ms|s|m|h)"


@dataclasses.dataclass
class WrkResult:
    target: str
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


def _duration_ms(value: str, unit: str) -> float:
    return float(value) * _UNIT_SECONDS[unit] * 1000.0


def parse_wrk(output: str, target: str, round_no: int) -> WrkResult:
    def find(pattern: str) -> re.Match[str]:
        match = re.search(pattern, output, re.MULTILINE)
        if not match:
            raise BenchmarkError(f"wrk output has no match for {pattern!r}:\n{output}")
        return match

    p50, p99 = find(rf"^\s*50%\s+{_DURATION}"), find(rf"^\s*99%\s+{_DURATION}")
    errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    kinds = ("connect", "read", "write", "timeout")
    return WrkResult(
        target=target,
        round=round_no,
        requests_per_s=float(find(r"^Requests/sec:\s+([\d.]+)").group(1)),
        p50_ms=_duration_ms(*p50.groups()),
        p99_ms=_duration_ms(*p99.groups()),
        requests=int(find(r"^\s*(\d+) requests in").group(1)),
        non_2xx_3xx=int(non_2xx.group(1)) if non_2xx else 0,
        socket_errors=dict(zip(kinds, map(int, errors.groups()), strict=True)) if errors else {},
    )


def wrk_argv(args: argparse.Namespace, port: int, seconds: int) -> list[str]:
    threads, conns = str(args.threads), str(args.connections)
    url = f"http://{HOST}:{port}/"
    return ["wrk", "-t", threads, "-c", conns, "-d", f"{seconds}s", "--latency", url]


def run_wrk(
    args: argparse.Namespace, target: Target, seconds: int, round_no: int, ours: frozenset[int]
) -> WrkResult:
    """One wrk run; `ours` are the session ids whose CPU use is not counted as "other"."""
    argv = wrk_argv(args, target.port, seconds)
    mine = frozenset({target.child.proc.pid})
    before, target_before = cpu_snapshot(ours), _session_ticks(mine)
    started = time.monotonic()
    result = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
    elapsed = time.monotonic() - started
    target_seconds = (_session_ticks(mine) - target_before) / os.sysconf("SC_CLK_TCK")
    other_cpu = other_cpu_percent(before, cpu_snapshot(ours))
    if result.returncode != 0:
        raise BenchmarkError(f"{' '.join(argv)} failed:\n{result.stdout}{result.stderr}")
    if target.child.proc.poll() is not None:
        raise BenchmarkError(
            f"{target.name} died during the wrk run (exit {target.child.proc.returncode}):\n"
            f"{target.child.log_tail()}"
        )
    parsed = parse_wrk(result.stdout, target.name, round_no)
    return dataclasses.replace(
        parsed,
        other_cpu_percent=round(other_cpu, 1),
        target_cpu_percent=round(100.0 * target_seconds / elapsed, 1),
        cpu_us_per_request=round(1e6 * target_seconds / max(parsed.requests, 1), 2),
    )


def describe(result: WrkResult) -> str:
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


def run_rounds(
    args: argparse.Namespace, targets: dict[str, Target], ours: frozenset[int]
) -> list[WrkResult]:
    if args.warmup > 0:
        for target in targets.values():
            log(f"warm-up: {target.name} ({args.warmup} s)")
            run_wrk(args, target, args.warmup, 0, ours)
    results = []
    for round_no in range(1, args.rounds + 1):
        for target in targets.values():
            log(f"round {round_no}/{args.rounds}: {target.name} ({args.duration} s) ...")
            result = run_wrk(args, target, args.duration, round_no, ours)
            log(f"round {round_no}/{args.rounds}: {target.name:<8} {describe(result)}")
            results.append(result)
    return results


# --------------------------------------------------------------------------- summary


@dataclasses.dataclass
class Summary:
    target: str
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    non_2xx_3xx: int
    socket_errors: int
    max_other_cpu_percent: float
    cpu_us_per_request: float


def summarize(results: list[WrkResult], names: list[str]) -> list[Summary]:
    summaries = []
    for name in names:
        mine = [r for r in results if r.target == name]
        summaries.append(
            Summary(
                target=name,
                requests_per_s=statistics.median(r.requests_per_s for r in mine),
                p50_ms=statistics.median(r.p50_ms for r in mine),
                p99_ms=statistics.median(r.p99_ms for r in mine),
                non_2xx_3xx=sum(r.non_2xx_3xx for r in mine),
                socket_errors=sum(sum(r.socket_errors.values()) for r in mine),
                max_other_cpu_percent=max(r.other_cpu_percent for r in mine),
                cpu_us_per_request=statistics.median(r.cpu_us_per_request for r in mine),
            )
        )
    return summaries


def round_ratios(results: list[WrkResult]) -> list[float]:
    """tdproxy/nginx requests/s round by round (the two ran back to back in each round)."""
    by_round = {(r.target, r.round): r.requests_per_s for r in results}
    rounds = sorted({r.round for r in results})
    return [
        by_round[("tdproxy", n)] / by_round[("nginx", n)]
        for n in rounds
        if ("tdproxy", n) in by_round and ("nginx", n) in by_round
    ]


def ratios(summaries: list[Summary], per_round: list[float]) -> dict[str, float]:
    by_name = {s.target: s for s in summaries}
    if "nginx" not in by_name or "tdproxy" not in by_name:
        return {}
    nginx, td = by_name["nginx"], by_name["tdproxy"]
    return {
        "requests_per_s_round_median": statistics.median(per_round),
        "requests_per_s_round_min": min(per_round),
        "requests_per_s": td.requests_per_s / nginx.requests_per_s,
        "p99": td.p99_ms / nginx.p99_ms,
        "cpu_per_request": td.cpu_us_per_request / max(nginx.cpu_us_per_request, 1e-9),
    }


def format_table(summaries: list[Summary], rounds: int) -> str:
    head = (
        f"{'target':<9} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'non-2xx':>8} {'sock err':>8}"
        f" {'other CPU':>9} {'CPU us/req':>10}"
    )
    lines = [f"medians over {rounds} round(s):", head, "-" * len(head)]
    for s in summaries:
        lines.append(
            f"{s.target:<9} {s.requests_per_s:>9.0f} {s.p50_ms:>8.2f} {s.p99_ms:>8.2f} "
            f"{s.non_2xx_3xx:>8} {s.socket_errors:>8} {s.max_other_cpu_percent:>8.0f}% "
            f"{s.cpu_us_per_request:>10.1f}"
        )
    return "\n".join(lines)


def format_ratios(values: dict[str, float]) -> str:
    if not values:
        return "tdproxy/nginx ratios: n/a (both targets are needed)"
    return (
        f"tdproxy/nginx: req/s {values['requests_per_s']:.2f}x "
        f"(higher is better), p99 {values['p99']:.2f}x (lower is better), "
        f"CPU per request {values['cpu_per_request']:.2f}x (lower is better)\n"
        f"tdproxy/nginx req/s round by round: median {values['requests_per_s_round_median']:.2f}x, "
        f"lowest {values['requests_per_s_round_min']:.2f}x"
    )


# --------------------------------------------------------------------------- machine


def _first_line(argv: list[str]) -> str:
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except OSError as exc:
        return f"unavailable ({exc})"
    text = (result.stdout + result.stderr).strip()
    return text.splitlines()[0] if text else "unknown"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_description() -> dict[str, str]:
    return {
        "cpu": cpu_model(),
        "cores": str(os.cpu_count()),
        "kernel": f"{platform.system()} {platform.release()}",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "nginx": _first_line(["nginx", "-v"]),
        "wrk": _first_line(["wrk", "-v"]),
        "tdproxy": tdproxy_source(),
        "note": "wrk, the backend and the proxy under test share these cores",
    }


def format_machine(machine: dict[str, str]) -> str:
    return "\n".join(f"  {key:<7} {value}" for key, value in machine.items())


# --------------------------------------------------------------------------- idle connections


def rss_kib(child: Child) -> int:
    """VmRSS of a running child; a clear error when it has exited."""
    if child.proc.poll() is None:
        for line in Path(f"/proc/{child.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    child.proc.wait(STOP_TIMEOUT)
    raise BenchmarkError(
        f"{child.name} (pid {child.proc.pid}) is not running (exit code "
        f"{child.proc.returncode}); its log ({child.log_path}):\n{child.log_tail()}"
    )


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def nofile_limit(pid: int) -> str:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return " ".join(line.split()[3:5])
    return "unknown"


async def _read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    match = re.search(rb"\r\ncontent-length:\s*(\d+)", head, re.IGNORECASE)
    if match:
        await reader.readexactly(int(match.group(1)))
    elif re.search(rb"\r\ntransfer-encoding:\s*chunked", head, re.IGNORECASE):
        await reader.readuntil(b"0\r\n\r\n")
    return status


async def _open_one(port: int, gate: asyncio.Semaphore) -> tuple[asyncio.StreamReader, Any, int]:
    request = f"GET / HTTP/1.1\r\nHost: {HOST}:{port}\r\nUser-Agent: tdbench\r\n\r\n".encode()
    async with gate:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port), 15)
        try:
            writer.write(request)
            status = await asyncio.wait_for(_read_response(reader), 15)
        except BaseException:
            writer.close()
            raise
    return reader, writer, status


@dataclasses.dataclass
class IdleResult:
    connections: int
    responses_200: int
    other_status: dict[str, int]
    failures: dict[str, int]
    still_open: int
    rss_before_kib: int
    rss_after_kib: int
    fds_before: int
    fds_after: int
    nofile_limit: str


async def _idle_test(child: Child, port: int, count: int) -> IdleResult:
    pid = child.proc.pid
    rss_before, fds_before = rss_kib(child), open_fds(pid)
    gate = asyncio.Semaphore(200)
    outcomes = await asyncio.gather(
        *(_open_one(port, gate) for _ in range(count)), return_exceptions=True
    )
    opened = [o for o in outcomes if not isinstance(o, BaseException)]
    failures = collections.Counter(
        type(o).__name__ for o in outcomes if isinstance(o, BaseException)
    )
    statuses = collections.Counter(status for _, _, status in opened)
    try:
        await asyncio.sleep(2.0)  # let the proxy settle; it may also close connections now
        result = IdleResult(
            connections=count,
            responses_200=statuses.pop(200, 0),
            other_status={str(k): v for k, v in statuses.items()},
            failures=dict(failures),
            still_open=sum(1 for reader, _, _ in opened if not reader.at_eof()),
            rss_before_kib=rss_before,
            rss_after_kib=rss_kib(child),
            fds_before=fds_before,
            fds_after=open_fds(pid),
            nofile_limit=nofile_limit(pid),
        )
    finally:
        for _, writer, _ in opened:
            writer.close()
    return result


def idle_connection_test(target: Target, count: int) -> IdleResult:
    log(f"idle connections: opening {count} keep-alive connections to tdproxy ...")
    result = asyncio.run(_idle_test(target.child, target.port, count))
    rss_kib(target.child)  # raises when tdproxy died during the test
    log(format_idle(result))
    return result


def format_idle(r: IdleResult) -> str:
    lines = [
        f"tdproxy RSS with {r.connections} idle keep-alive connections:",
        f"  RSS before {r.rss_before_kib / 1024:.1f} MiB, after {r.rss_after_kib / 1024:.1f} MiB "
        f"(+{(r.rss_after_kib - r.rss_before_kib) / 1024:.1f} MiB, "
        f"{(r.rss_after_kib - r.rss_before_kib) * 1024 / max(r.connections, 1):.0f} B/conn)",
        f"  200 responses {r.responses_200}/{r.connections}, still open after 2 s {r.still_open}, "
        f"tdproxy fds {r.fds_before} -> {r.fds_after} (nofile limit {r.nofile_limit})",
    ]
    if r.other_status or r.failures:
        lines.append(f"  !! other statuses {r.other_status}, failures {r.failures}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- profile


PY_SPY_RATE = 100  # samples per second (py-spy's default)


@dataclasses.dataclass
class Profile:
    seconds: int
    active_samples: int
    possible_samples: int
    top_own_time: list[dict[str, Any]]
    own_time_by_file: list[dict[str, Any]]


def profile_tdproxy(
    args: argparse.Namespace, children: Children, target: Target, tmp: Path
) -> Profile:
    py_spy, seconds, pid = ensure_py_spy(), args.profile_seconds, target.child.proc.pid
    raw = tmp / "profile.txt"
    wrk = children.start("wrk", wrk_argv(args, target.port, seconds + 3), tmp / "wrk-profile.log")
    log(f"profile: py-spy on tdproxy pid {pid} for {seconds} s under wrk load")
    try:
        time.sleep(1.0)
        argv = [py_spy, "record", "--format", "raw", "--nonblocking", "-o", str(raw)]
        argv += ["--rate", str(PY_SPY_RATE), "--pid", str(pid), "--duration", str(seconds)]
        subprocess.run(argv, capture_output=True, check=True, timeout=seconds + 60)
    finally:
        wrk.proc.wait(seconds + 30)
    profile = summarize_profile(raw.read_text(), seconds)
    log(format_profile(profile))
    return profile


def _own_time(collapsed: str) -> collections.Counter[str]:
    """Samples per innermost frame ("function (file)") from py-spy's collapsed stacks."""
    own: collections.Counter[str] = collections.Counter()
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            leaf = stack.rsplit(";", 1)[-1]
            own[re.sub(r":\d+\)$", ")", leaf)] += int(count)
    return own


def _ranked(counter: collections.Counter[str], key: str, limit: int) -> list[dict[str, Any]]:
    total = sum(counter.values()) or 1
    return [
        {key: name, "samples": n, "percent": round(100.0 * n / total, 1)}
        for name, n in counter.most_common(limit)
    ]


def summarize_profile(collapsed: str, seconds: int, limit: int = 25) -> Profile:
    own = _own_time(collapsed)
    by_file: collections.Counter[str] = collections.Counter()
    for function, n in own.items():
        by_file[function.rpartition(" (")[2].rstrip(")")] += n
    return Profile(
        seconds=seconds,
        active_samples=sum(own.values()),
        possible_samples=seconds * PY_SPY_RATE,
        top_own_time=_ranked(own, "function", limit),
        own_time_by_file=_ranked(by_file, "file", 10),
    )


def format_profile(profile: Profile) -> str:
    busy = 100.0 * profile.active_samples / max(profile.possible_samples, 1)
    lines = [
        f"tdproxy profile: {profile.active_samples} active samples of {profile.possible_samples} "
        f"possible ({busy:.0f}% of wall time not idle); top functions by own time:",
    ]
    lines += [
        f"  {e['percent']:5.1f}%  {e['samples']:>6}  {e['function']}" for e in profile.top_own_time
    ]
    lines.append("own time by file:")
    lines += [
        f"  {e['percent']:5.1f}%  {e['samples']:>6}  {e['file']}" for e in profile.own_time_by_file
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def report_text(report: dict[str, Any]) -> str:
    summaries = [Summary(**s) for s in report["summary"]]
    lines = [
        "machine:",
        format_machine(report["machine"]),
        f"CPU busy before the run (other processes): {report['cpu_busy_before_percent']}%",
        f"load: {report['settings']['wrk']}",
        format_table(summaries, report["settings"]["rounds"]),
        format_ratios(report["ratios"]),
    ]
    if report["tdproxy_rss_startup_kib"]:
        lines.append(f"tdproxy RSS at startup: {report['tdproxy_rss_startup_kib'] / 1024:.1f} MiB")
    if report["idle"]:
        lines.append(format_idle(IdleResult(**report["idle"])))
    return "\n".join(lines)


def report_markdown(report: dict[str, Any]) -> str:
    rounds = [describe(WrkResult(**r)) for r in report["rounds"]]
    parts = [
        f"# tdproxy benchmark results\n\nRun {report['date']} with `python3 benchmarks/run.py "
        f"{report['settings']['argv']}`.\n",
        f"```\n{report_text(report)}\n```\n",
        "## Every round\n\n```",
        *(
            f"round {r['round']}: {r['target']:<8} {text}"
            for r, text in zip(report["rounds"], rounds, strict=True)
        ),
        "```\n",
    ]
    if report["profile"]:
        parts.append(f"## Profile\n\n```\n{format_profile(Profile(**report['profile']))}\n```\n")
    return "\n".join(parts)


@contextmanager
def sigterm_as_exit() -> Iterator[None]:
    def handler(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def benchmark(args: argparse.Namespace, children: Children, tmp: Path) -> dict[str, Any]:
    busy_before = check_machine_idle()
    targets = start_targets(children, tmp, args.targets)
    tdproxy = targets.get("tdproxy")
    rss_startup = rss_kib(tdproxy.child) if tdproxy else None
    results = run_rounds(args, targets, children.sessions())
    summaries = summarize(results, args.targets)
    idle = None
    if tdproxy and args.idle_connections > 0:
        idle = idle_connection_test(tdproxy, args.idle_connections)
    profile = None
    if tdproxy and args.profile_seconds > 0:
        profile = profile_tdproxy(args, children, tdproxy, tmp)
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "machine": machine_description(),
        "cpu_busy_before_percent": round(busy_before, 1),
        "settings": {
            "wrk": " ".join(wrk_argv(args, 0, args.duration)[:-1]),
            "rounds": args.rounds,
            "warmup_s": args.warmup,
            "argv": " ".join(sys.argv[1:]),
        },
        "rounds": [dataclasses.asdict(r) for r in results],
        "summary": [dataclasses.asdict(s) for s in summaries],
        "ratios": ratios(summaries, round_ratios(results)),
        "tdproxy_rss_startup_kib": rss_startup,
        "idle": dataclasses.asdict(idle) if idle else None,
        "profile": dataclasses.asdict(profile) if profile else None,
    }
    log(f"\n=== results ===\n{report_text(report)}")
    return report


def run(args: argparse.Namespace, children: Children, tmp: Path) -> None:
    with sigterm_as_exit():
        ensure_tools()
        if "tdproxy" in args.targets:
            check_tdproxy_importable()
        log(f"RLIMIT_NOFILE raised to {raise_nofile_limit()} (inherited by the children)")
        report = benchmark(args, children, tmp)
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
            log(f"wrote {args.json}")
        if args.markdown:
            Path(args.markdown).write_text(report_markdown(report))
            log(f"wrote {args.markdown}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    children = Children(STOP_TIMEOUT, log)
    tmp = Path(tempfile.mkdtemp(prefix="tdbench-"))
    tmp.chmod(0o755)  # nginx workers run as nobody when started by root
    code = 1
    try:
        run(args, children, tmp)
        code = 0
    except BenchmarkError as exc:
        log(f"error: {exc}")
    except KeyboardInterrupt:
        log("interrupted")
        code = 130
    finally:
        children.stop_all()
        if args.keep_tmp or code != 0:
            log(f"logs and configs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
