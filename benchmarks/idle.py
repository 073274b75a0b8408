"""tdproxy's memory with many idle keep-alive connections, and a py-spy profile under load.

Standard library only (py-spy is installed with pip when a profile is asked for).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import os
import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from measure import Endpoint, load_argv
from processes import Child, Children
from servers import HOST, BenchmarkError

STOP_TIMEOUT = 5.0


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


def idle_connection_test(
    child: Child, port: int, count: int, log: Callable[[str], None]
) -> IdleResult:
    log(f"idle connections: opening {count} keep-alive connections to tdproxy ...")
    result = asyncio.run(_idle_test(child, port, count))
    rss_kib(child)  # raises when tdproxy died during the test
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
    py_spy: str,
    children: Children,
    endpoint: Endpoint,
    tmp: Path,
    seconds: int,
    log: Callable[[str], None],
) -> Profile:
    pid = endpoint.child.proc.pid
    raw = tmp / "profile.txt"
    argv = load_argv(endpoint, seconds + 3, 1, None)
    wrk = children.start("wrk", argv, tmp / "wrk-profile.log")
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
