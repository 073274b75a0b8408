#!/usr/bin/env python3
"""Soak test: tdproxy under 10 minutes of mixed traffic, reloads and backend restarts.

It starts two fake backends (``python -m tests.fakes.backend``) and one ``python -m tdproxy run``,
all on free ports of 127.0.0.1, then for ``--minutes`` keeps ``--concurrency`` clients busy with
a bounded mix of keep-alive GETs, GETs on new connections, slow GETs, uploads (random bodies,
checksums verified), downloads (checksums verified) and WebSockets (echo, then close). Every
``--reload-every`` seconds it rewrites the config (weights 50/50 <-> 70/30, atomic replace), and
every ``--restart-every`` seconds it kills one backend (SIGKILL, alternating) and starts it again
on the same port after ``--restart-downtime`` seconds.

Every ``--sample-every`` seconds it records tdproxy's RSS, open file descriptors, CPU time, the
requests done and the errors so far. At the end it stops the load, lets in-flight requests
finish, waits for idle connections to close, and reports: requests by kind, errors by kind and
by restart window, RSS over time, descriptors at baseline / peak / end, and PASS or FAIL against:

* no unexpected error: none outside the restart windows, and inside them none on an idempotent
  request before its response started (those must be retried by tdproxy). Allowed: a POST in
  flight at the kill, a download cut mid-body, an open WebSocket closed by the kill;
* RSS growth after warm-up below 5 %;
* file descriptors back to the baseline (within ``--fd-tolerance``) once the load has stopped;
* every reload applied, tdproxy alive throughout, a clean exit on SIGTERM, no traceback logged.

Usage::

    python3 benchmarks/soak.py                   # 10 minutes
    python3 benchmarks/soak.py --minutes 1 --restart-every 20   # a quick trial
    python3 benchmarks/soak.py --json /tmp/soak.json

Needs the standard library and aiohttp; run from anywhere (it runs its children from the
repository root). Not part of the test suite. Traffic goes to 127.0.0.1 only. Every child is
stopped at exit, on Ctrl-C and on SIGTERM, and gets SIGKILL should this script die.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import hashlib
import json
import os
import platform
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from processes import Children, log_tail, tdproxy_source

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
HOST = "127.0.0.1"
# Every child runs from the repository root with it on PYTHONPATH, its output unbuffered.
CHILD_SETTINGS: dict[str, Any] = {
    "cwd": REPO_ROOT,
    "env": {
        **os.environ,
        "PYTHONPATH": str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "PYTHONUNBUFFERED": "1",
    },
}
STOP_TIMEOUT = 10.0
READY_TIMEOUT = 20.0
OP_TIMEOUT = 30.0  # no single operation may take longer
MAX_OPS_PER_WORKER = 10_000_000  # a bound on every worker loop besides the clock
WINDOW_GRACE = 5.0  # a restart window lasts from the kill until the backend is back + this
ERRORS_KEPT = 2000  # error records kept in detail (all are counted)

OPS = ("keepalive_get", "newconn_get", "slow_get", "upload", "download", "websocket")
OP_WEIGHTS = (36, 14, 5, 20, 15, 10)
IDEMPOTENT_OPS = frozenset({"keepalive_get", "newconn_get", "slow_get", "download", "websocket"})
UPLOAD_SIZES = (0, 1, 100, 4096, 65_536, 65_537, 200_000, 1_000_000)
UPLOAD_SIZE_WEIGHTS = (5, 5, 20, 25, 15, 5, 15, 10)
DOWNLOAD_SIZES = (0, 1, 1000, 65_536, 100_000, 1_000_000, 2_000_000)
DOWNLOAD_SIZE_WEIGHTS = (5, 5, 30, 20, 20, 15, 5)
DOWNLOAD_SEEDS = 8  # sizes x seeds stays within the fake backend's checksum cache
RANDOM_POOL_BYTES = 4 * 1024 * 1024


def log(message: str = "") -> None:
    print(message, flush=True)


class SoakError(Exception):
    """A failure with a message meant for the person running the soak."""


# --------------------------------------------------------------------------- command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="load duration (default 10)")
    parser.add_argument("--concurrency", type=int, default=24, help="concurrent clients")
    parser.add_argument("--reload-every", type=float, default=30.0, help="seconds (default 30)")
    parser.add_argument("--restart-every", type=float, default=120.0, help="seconds (default 120)")
    parser.add_argument(
        "--restart-downtime", type=float, default=3.0, help="seconds a killed backend stays down"
    )
    parser.add_argument("--sample-every", type=float, default=5.0, help="seconds (default 5)")
    parser.add_argument("--progress-every", type=float, default=30.0, help="seconds (default 30)")
    parser.add_argument(
        "--warmup", type=float, default=None, help="seconds excluded from RSS growth (default 60)"
    )
    parser.add_argument("--idle", type=float, default=5.0, help="tdproxy timeouts.idle, seconds")
    parser.add_argument(
        "--fd-wait", type=float, default=45.0, help="max seconds to wait for fds to settle"
    )
    parser.add_argument("--fd-tolerance", type=int, default=3, help="fds allowed above baseline")
    parser.add_argument("--rss-growth-limit", type=float, default=5.0, help="percent (default 5)")
    parser.add_argument("--seed", type=int, default=20261127, help="random seed")
    parser.add_argument("--json", metavar="PATH", help="also write every number as JSON")
    parser.add_argument("--keep-tmp", action="store_true", help="keep configs and logs")
    args = parser.parse_args(argv)
    if args.minutes <= 0 or args.concurrency < 1:
        parser.error("--minutes must be > 0 and --concurrency >= 1")
    if args.warmup is None:
        args.warmup = min(60.0, args.minutes * 60 / 3)
    return args


# --------------------------------------------------------------------------- child processes


async def wait_for_log(
    path: Path, pattern: str, proc: subprocess.Popen[bytes], timeout: float, offset: int = 0
) -> re.Match[str]:
    """Poll ``path`` (from byte ``offset``) until ``pattern`` matches; fail if ``proc`` exits."""
    regex = re.compile(pattern)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            with path.open("rb") as handle:
                handle.seek(offset)
                text = handle.read().decode(errors="replace")
            match = regex.search(text)
            if match:
                return match
        if proc.poll() is not None:
            raise SoakError(
                f"{path.name}: the process exited ({proc.returncode}):\n{log_tail(path)}"
            )
        await asyncio.sleep(0.05)
    raise SoakError(f"{path.name}: {pattern!r} not seen within {timeout:.0f}s:\n{log_tail(path)}")


class Backend:
    """One fake backend; ``restart`` kills it and starts it again on the same port."""

    def __init__(self, name: str, children: Children, tmp: Path) -> None:
        self.name = name
        self.children = children
        self.log_path = tmp / f"backend-{name}.log"
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.incarnations = 0

    async def start(self) -> None:
        for attempt in range(20):  # the port may be briefly unavailable right after a kill
            offset = self.log_path.stat().st_size if self.log_path.exists() else 0
            argv = [sys.executable, "-m", "tests.fakes.backend", "--name", self.name]
            argv += ["--host", HOST, "--port", str(self.port)]
            proc = self.children.start(
                f"backend {self.name}", argv, self.log_path, append=True, **CHILD_SETTINGS
            ).proc
            try:
                match = await wait_for_log(
                    self.log_path, r"LISTENING (\d+)", proc, READY_TIMEOUT, offset
                )
            except SoakError:
                if self.port and proc.poll() is not None and attempt < 19:
                    await asyncio.sleep(0.5)
                    continue
                raise
            self.port = int(match.group(1))
            self.proc = proc
            self.incarnations += 1
            return
        raise SoakError(f"backend {self.name} could not be started again on port {self.port}")

    async def kill(self) -> None:
        proc = self.proc
        if proc is None:
            return
        proc.send_signal(signal.SIGKILL)
        for _ in range(200):
            if proc.poll() is not None:
                break
            await asyncio.sleep(0.01)
        self.proc = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"


def config_text(backends: list[Backend], weights: tuple[int, int], idle: float) -> str:
    lines = [
        "# written by benchmarks/soak.py",
        "entrypoint:",
        f"  address: {HOST}",
        "  port: 0",
        "routing:",
        "  method: round_robin",
        "backends:",
    ]
    for backend, weight in zip(backends, weights, strict=True):
        lines += [f"  - name: {backend.name}", f"    url: {backend.url}", f"    weight: {weight}"]
    lines += [
        "health_check:",
        "  enabled: true",
        "  type: http",
        "  path: /health",
        "  interval: 1s",
        "  timeout: 1s",
        "  fall: 2",
        "  rise: 2",
        "timeouts:",
        "  connect: 2s",
        "  response_header: 30s",
        "  client_header: 15s",
        "  client_body: 30s",
        f"  idle: {idle:g}s",
        "  shutdown_grace: 10s",
        "admin:",
        f"  address: {HOST}",
        "  port: 0",
        "access_log:",
        "  enabled: false",
    ]
    return "\n".join(lines) + "\n"


def write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


# --------------------------------------------------------------------------- /proc readings


def read_rss_kb(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def count_fds(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def cpu_seconds(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks  # utime + stime


def loadavg() -> float:
    try:
        with open("/proc/loadavg") as handle:
            return float(handle.read().split()[0])
    except OSError:
        return float("nan")


def machine_info() -> dict[str, Any]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpu_model": model,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
    }


# --------------------------------------------------------------------------- bookkeeping


@dataclasses.dataclass
class ErrorRecord:
    op: str
    kind: str
    detail: str
    start: float  # seconds since the load started
    end: float
    started_response: bool  # the response head (or the WebSocket handshake) had arrived
    in_window: bool = False
    expected: bool = False


@dataclasses.dataclass
class Window:
    backend: str
    kill: float
    up: float | None = None

    @property
    def end(self) -> float:
        return float("inf") if self.up is None else self.up + WINDOW_GRACE


class Stats:
    def __init__(self) -> None:
        self.ok: collections.Counter[str] = collections.Counter()
        self.failed: collections.Counter[str] = collections.Counter()
        self.errors: list[ErrorRecord] = []
        self.error_count = 0
        self.bytes_up = 0
        self.bytes_down = 0
        self.backends: collections.Counter[str] = collections.Counter()

    @property
    def done(self) -> int:
        return sum(self.ok.values()) + sum(self.failed.values())

    def add_error(self, record: ErrorRecord) -> None:
        self.failed[record.op] += 1
        self.error_count += 1
        if len(self.errors) < ERRORS_KEPT:
            self.errors.append(record)


class CheckFailed(Exception):
    """A response arrived but is wrong (status, checksum, mixed-up id, ...)."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


class Progress:
    __slots__ = ("started_response",)

    def __init__(self) -> None:
        self.started_response = False


# --------------------------------------------------------------------------- the load


class Load:
    def __init__(self, args: argparse.Namespace, base_url: str, clock: Clock) -> None:
        self.args = args
        self.base = base_url
        self.ws_base = base_url.replace("http://", "ws://", 1)
        self.clock = clock
        self.stats = Stats()
        self.stop = asyncio.Event()
        self.pool = random.Random(args.seed).randbytes(RANDOM_POOL_BYTES)
        timeout = aiohttp.ClientTimeout(total=OP_TIMEOUT)
        # Keep-alive clients; connections idle for 3 s are dropped by the client before
        # tdproxy's idle timeout (5 s) could race with a new request on them.
        self.keepalive = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=3.0),
            timeout=timeout,
            auto_decompress=False,
        )
        self.fresh = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, force_close=True),
            timeout=timeout,
            auto_decompress=False,
        )

    async def close(self) -> None:
        await self.keepalive.close()
        await self.fresh.close()

    async def worker(self, index: int) -> None:
        rng = random.Random(self.args.seed * 1000 + index)
        for n in range(MAX_OPS_PER_WORKER):
            if self.stop.is_set():
                return
            op = rng.choices(OPS, OP_WEIGHTS)[0]
            request_id = f"w{index}-{n}"
            progress = Progress()
            start = self.clock.now()
            try:
                async with asyncio.timeout(OP_TIMEOUT + 5):
                    await getattr(self, "op_" + op)(rng, request_id, progress)
            except CheckFailed as failure:
                self._record(op, failure.kind, failure.detail, start, progress)
            except Exception as exc:  # every failure is counted, by its type
                self._record(op, type(exc).__name__, str(exc), start, progress)
            else:
                self.stats.ok[op] += 1

    def _record(self, op: str, kind: str, detail: str, start: float, progress: Progress) -> None:
        record = ErrorRecord(
            op, kind, detail[:300], start, self.clock.now(), progress.started_response
        )
        self.stats.add_error(record)

    # -- checks shared by the HTTP operations --

    def _check_head(self, resp: aiohttp.ClientResponse, request_id: str, status: int = 200) -> None:
        if resp.status != status:
            raise CheckFailed(f"status_{resp.status}", f"{resp.method} {resp.url.path_qs}")
        echoed = resp.headers.get("X-Request-Id")
        if echoed != request_id:
            raise CheckFailed("mixed_up", f"sent X-Request-Id {request_id}, got {echoed}")
        backend = resp.headers.get("X-Backend", "?")
        self.stats.backends[backend] += 1

    # -- operations --

    async def op_keepalive_get(self, rng: random.Random, rid: str, progress: Progress) -> None:
        async with self.keepalive.get(
            f"{self.base}/echo?rid={rid}", headers={"X-Request-Id": rid}
        ) as resp:
            self._check_head(resp, rid)
            progress.started_response = True
            payload = await resp.json()
        if payload.get("path") != f"/echo?rid={rid}" or payload.get("method") != "GET":
            raise CheckFailed("mixed_up", f"{rid}: echo says {payload.get('path')}")
        headers = {name.lower(): value for name, value in payload.get("headers", [])}
        if headers.get("x-request-id") != rid:
            raise CheckFailed("mixed_up", f"{rid}: backend saw {headers.get('x-request-id')}")

    async def op_newconn_get(self, rng: random.Random, rid: str, progress: Progress) -> None:
        async with self.fresh.get(f"{self.base}/", headers={"X-Request-Id": rid}) as resp:
            self._check_head(resp, rid)
            progress.started_response = True
            body = await resp.read()
        if not re.fullmatch(rb"hello from (blue|green)\n", body):
            raise CheckFailed("bad_body", f"{rid}: {body[:80]!r}")

    async def op_slow_get(self, rng: random.Random, rid: str, progress: Progress) -> None:
        ms = rng.choice((100, 250, 500))
        async with self.keepalive.get(
            f"{self.base}/slow?ms={ms}", headers={"X-Request-Id": rid}
        ) as resp:
            self._check_head(resp, rid)
            progress.started_response = True
            body = await resp.read()
        if not body.startswith(b"hello from "):
            raise CheckFailed("bad_body", f"{rid}: {body[:80]!r}")

    async def op_upload(self, rng: random.Random, rid: str, progress: Progress) -> None:
        size = rng.choices(UPLOAD_SIZES, UPLOAD_SIZE_WEIGHTS)[0]
        offset = rng.randrange(0, RANDOM_POOL_BYTES - size + 1)
        body = self.pool[offset : offset + size]
        expected = hashlib.sha256(body).hexdigest()
        chunked = size > 0 and rng.random() < 0.3
        data: Any = body
        if chunked:

            async def pieces() -> Any:
                view = memoryview(body)
                step = rng.choice((1000, 16_384, 65_536))
                for at in range(0, len(view), step):
                    yield bytes(view[at : at + step])

            data = pieces()
        async with self.keepalive.post(
            f"{self.base}/upload", data=data, headers={"X-Request-Id": rid}
        ) as resp:
            self._check_head(resp, rid)
            progress.started_response = True
            payload = await resp.json()
        self.stats.bytes_up += size
        if payload.get("body_len") != size or payload.get("body_sha256") != expected:
            raise CheckFailed(
                "checksum_upload",
                f"{rid}: sent {size} bytes{' chunked' if chunked else ''}, backend got "
                f"{payload.get('body_len')} ({str(payload.get('body_sha256'))[:12]})",
            )

    async def op_download(self, rng: random.Random, rid: str, progress: Progress) -> None:
        size = rng.choices(DOWNLOAD_SIZES, DOWNLOAD_SIZE_WEIGHTS)[0]
        seed = rng.randrange(DOWNLOAD_SEEDS)
        chunked = rng.random() < 0.3
        url = f"{self.base}/stream?bytes={size}&seed={seed}" + ("&chunked=1" if chunked else "")
        digest = hashlib.sha256()
        received = 0
        async with self.keepalive.get(url, headers={"X-Request-Id": rid}) as resp:
            self._check_head(resp, rid)
            progress.started_response = True
            expected = resp.headers.get("X-Body-Sha256")
            async for piece in resp.content.iter_chunked(65_536):
                digest.update(piece)
                received += len(piece)
        self.stats.bytes_down += received
        if received != size or digest.hexdigest() != expected:
            raise CheckFailed(
                "checksum_download",
                f"{rid}: {url} gave {received} bytes ({digest.hexdigest()[:12]}), "
                f"expected {size} ({str(expected)[:12]})",
            )

    async def op_websocket(self, rng: random.Random, rid: str, progress: Progress) -> None:
        async with self.keepalive.ws_connect(
            f"{self.ws_base}/ws", headers={"X-Request-Id": rid}, heartbeat=None, autoping=True
        ) as ws:
            progress.started_response = True
            backend = ws._response.headers.get("X-Backend", "?")
            self.stats.backends[backend] += 1
            for i in range(rng.randint(2, 5)):
                if i % 2 == 0:
                    text = f"{rid}-{i}-" + "x" * rng.randint(0, 2000)
                    await ws.send_str(text)
                    message = await ws.receive(timeout=10)
                    if message.type != aiohttp.WSMsgType.TEXT or message.data != text:
                        raise CheckFailed("ws_echo", f"{rid}: got {message.type!r}")
                else:
                    size = rng.randint(1, 8000)
                    offset = rng.randrange(0, RANDOM_POOL_BYTES - size)
                    data = self.pool[offset : offset + size]
                    await ws.send_bytes(data)
                    message = await ws.receive(timeout=10)
                    if message.type != aiohttp.WSMsgType.BINARY or message.data != data:
                        raise CheckFailed("ws_echo", f"{rid}: got {message.type!r}")
            await ws.close()
            if ws.close_code not in (1000, None):
                raise CheckFailed("ws_close", f"{rid}: close code {ws.close_code}")


class Clock:
    def __init__(self) -> None:
        self.zero = time.monotonic()

    def now(self) -> float:
        return time.monotonic() - self.zero


# --------------------------------------------------------------------------- the soak


class Soak:
    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        self.args = args
        self.tmp = tmp
        self.children = Children(STOP_TIMEOUT, log)
        self.backends = [Backend("blue", self.children, tmp), Backend("green", self.children, tmp)]
        self.config_path = tmp / "tdproxy.yaml"
        self.proxy_log = tmp / "tdproxy.log"
        self.proxy: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.admin_port = 0
        self.clock = Clock()
        self.samples: list[dict[str, Any]] = []
        self.windows: list[Window] = []
        self.reloads_written = 0
        self.weights = (50, 50)
        self.events: list[str] = []
        self.problems: list[str] = []
        self.load: Load | None = None
        self._last_cpu: tuple[float, float] | None = None
        self.admin: aiohttp.ClientSession | None = None
        self.revision = tdproxy_source()

    # -- setup --

    async def start(self) -> None:
        for backend in self.backends:
            await backend.start()
        write_atomically(self.config_path, config_text(self.backends, self.weights, self.args.idle))
        argv = [sys.executable, "-m", "tdproxy", "run", "--config", str(self.config_path)]
        self.proxy = self.children.start(
            "tdproxy", argv, self.proxy_log, append=True, **CHILD_SETTINGS
        ).proc
        match = await wait_for_log(
            self.proxy_log, r"entrypoint listening on http://[^:]+:(\d+)", self.proxy, READY_TIMEOUT
        )
        self.port = int(match.group(1))
        match = await wait_for_log(
            self.proxy_log, r"admin server on http://[^:]+:(\d+)", self.proxy, READY_TIMEOUT
        )
        self.admin_port = int(match.group(1))
        self.admin = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(force_close=True),
            timeout=aiohttp.ClientTimeout(total=10),
        )

    @property
    def pid(self) -> int:
        assert self.proxy is not None
        return self.proxy.pid

    async def admin_status(self) -> dict[str, Any] | None:
        assert self.admin is not None
        try:
            async with self.admin.get(f"http://{HOST}:{self.admin_port}/api/v1/status") as resp:
                return dict(await resp.json())
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError):
            return None

    async def metrics_text(self) -> str:
        assert self.admin is not None
        try:
            async with self.admin.get(f"http://{HOST}:{self.admin_port}/metrics") as resp:
                return await resp.text()
        except (aiohttp.ClientError, OSError, TimeoutError):
            return ""

    # -- sampling --

    async def sample(self, phase: str) -> dict[str, Any]:
        pid = self.pid
        # /proc first: the admin request below opens a connection of its own.
        rss, fds, cpu = read_rss_kb(pid), count_fds(pid), cpu_seconds(pid)
        now = self.clock.now()
        wall = time.monotonic()
        cpu_percent = None
        if cpu is not None and self._last_cpu is not None and wall > self._last_cpu[0]:
            cpu_percent = 100 * (cpu - self._last_cpu[1]) / (wall - self._last_cpu[0])
        if cpu is not None:
            self._last_cpu = (wall, cpu)
        stats = self.load.stats if self.load else Stats()
        status = await self.admin_status()
        sample = {
            "t": round(now, 1),
            "phase": phase,
            "rss_kb": rss,
            "fds": fds,
            "cpu_percent": None if cpu_percent is None else round(cpu_percent, 1),
            "loadavg": loadavg(),
            "requests": stats.done,
            "errors": stats.error_count,
            "errors_by_kind": dict(collections.Counter(e.kind for e in stats.errors)),
            "connections_active": status.get("connections_active") if status else None,
            "generation": status.get("generation") if status else None,
            "health": (
                {b["name"]: b["healthy"] for b in status.get("backends", [])} if status else None
            ),
        }
        self.samples.append(sample)
        if self.proxy is not None and self.proxy.poll() is not None:
            raise SoakError(
                f"tdproxy exited ({self.proxy.returncode}):\n{log_tail(self.proxy_log)}"
            )
        return sample

    # -- background actions --

    async def reload(self) -> None:
        self.weights = (70, 30) if self.weights == (50, 50) else (50, 50)
        write_atomically(self.config_path, config_text(self.backends, self.weights, self.args.idle))
        self.reloads_written += 1
        self.events.append(f"{self.clock.now():7.1f}s reload -> weights {self.weights}")

    async def restart(self, backend: Backend) -> None:
        window = Window(backend.name, self.clock.now())
        self.windows.append(window)
        await backend.kill()
        self.events.append(f"{window.kill:7.1f}s killed {backend.name} (SIGKILL)")
        await asyncio.sleep(self.args.restart_downtime)
        await backend.start()
        window.up = self.clock.now()
        self.events.append(f"{window.up:7.1f}s {backend.name} listening again on {backend.port}")

    # -- the run --

    async def run(self) -> dict[str, Any]:
        args = self.args
        await self.start()
        log(f"tdproxy pid {self.pid} on http://{HOST}:{self.port}, admin port {self.admin_port}")
        log("backends: " + ", ".join(f"{b.name} {b.url}" for b in self.backends))
        await asyncio.sleep(3.0)  # health checks settle
        self.clock = Clock()
        baseline = await self.sample("baseline")
        log(
            f"baseline: RSS {baseline['rss_kb'] / 1024:.1f} MB, fds {baseline['fds']}; "
            f"{args.concurrency} clients for {args.minutes:g} min"
        )
        self.clock = Clock()
        self.load = Load(args, f"http://{HOST}:{self.port}", self.clock)
        duration = args.minutes * 60
        workers = [
            asyncio.create_task(self.load.worker(i), name=f"worker-{i}")
            for i in range(args.concurrency)
        ]
        background: set[asyncio.Task[None]] = set()
        next_sample = 0.0
        next_progress = args.progress_every
        reload_at = [args.reload_every * k for k in range(1, int(duration / args.reload_every) + 1)]
        reload_at = [t for t in reload_at if t < duration - 1]
        restart_at = [
            args.restart_every * k for k in range(1, int(duration / args.restart_every) + 1)
        ]
        restart_at = [t for t in restart_at if t <= duration - 20]
        restarts_done = 0
        last_requests, last_progress_t = 0, 0.0
        try:
            while True:  # bounded by the clock below
                now = self.clock.now()
                if now >= duration:
                    break
                if reload_at and now >= reload_at[0]:
                    reload_at.pop(0)
                    await self.reload()
                if restart_at and now >= restart_at[0]:
                    restart_at.pop(0)
                    backend = self.backends[restarts_done % len(self.backends)]
                    restarts_done += 1
                    task = asyncio.create_task(self.restart(backend))
                    background.add(task)
                    task.add_done_callback(background.discard)
                if now >= next_sample:
                    next_sample += args.sample_every
                    await self.sample("load")
                if now >= next_progress:
                    next_progress += args.progress_every
                    stats = self.load.stats
                    rate = (stats.done - last_requests) / max(now - last_progress_t, 1e-9)
                    last_requests, last_progress_t = stats.done, now
                    sample = self.samples[-1]
                    health = sample["health"] or {}
                    log(
                        f"[{fmt_clock(now)}] requests {stats.done:>8} ({rate:5.0f}/s)  "
                        f"errors {stats.error_count:>4}  RSS {sample['rss_kb'] / 1024:6.1f} MB  "
                        f"fds {sample['fds']:>4}  gen {sample['generation']}  "
                        + " ".join(f"{n}:{'up' if h else 'DOWN'}" for n, h in health.items())
                        + f"  load {sample['loadavg']:.2f}"
                    )
                for task in list(background):
                    if task.done() and task.exception():
                        raise task.exception()  # type: ignore[misc]
                await asyncio.sleep(0.2)
            # Stop the load: let every operation in flight finish (each is bounded).
            stop_t = self.clock.now()
            self.load.stop.set()
            await self.sample("load")  # the last sample under load
            _, pending = await asyncio.wait(workers, timeout=OP_TIMEOUT + 15)
            for task in pending:
                task.cancel()
            if pending:
                self.problems.append(f"{len(pending)} worker(s) did not finish in time")
            if background:
                await asyncio.wait(background, timeout=30)
            drained_t = self.clock.now()
            await self.load.close()
            log(
                f"[{fmt_clock(drained_t)}] load stopped ({drained_t - stop_t:.1f}s to drain); "
                f"waiting up to {args.fd_wait:.0f}s for idle connections to close"
            )
            fds_after_idle = None
            settle_deadline = drained_t + args.fd_wait
            fd_settled_t = None
            while self.clock.now() < settle_deadline:  # bounded by the clock
                await asyncio.sleep(1.0)
                sample = await self.sample("idle")
                since = self.clock.now() - drained_t
                if fds_after_idle is None and since >= args.idle + 2:
                    fds_after_idle = sample["fds"]
                if (
                    fds_after_idle is not None
                    and abs(sample["fds"] - baseline["fds"]) <= args.fd_tolerance
                ):
                    fd_settled_t = since
                    break
            final_status = await self.admin_status()
            metrics = await self.metrics_text()
        finally:
            if self.load is not None:
                self.load.stop.set()
            for task in workers:
                task.cancel()
            for task in list(background):
                task.cancel()
            if self.load is not None:
                await self.load.close()
            if self.admin is not None:
                await self.admin.close()
        exit_code, stop_seconds = self.stop_proxy()
        return self.report(
            baseline, fds_after_idle, fd_settled_t, final_status, metrics, exit_code, stop_seconds
        )

    def stop_proxy(self) -> tuple[int | None, float]:
        proc = self.proxy
        if proc is None:
            return None, 0.0
        started = time.monotonic()
        proc.terminate()
        try:
            proc.wait(STOP_TIMEOUT + 10)
        except subprocess.TimeoutExpired:
            self.problems.append("tdproxy did not exit within 20 s of SIGTERM")
            proc.kill()
            proc.wait()
        return proc.returncode, time.monotonic() - started

    # -- the report --

    def classify(self) -> None:
        assert self.load is not None
        for error in self.load.stats.errors:
            error.in_window = any(
                error.start <= w.end and error.end >= w.kill for w in self.windows
            )
            error.expected = error.in_window and (
                error.op not in IDEMPOTENT_OPS or error.started_response
            )

    def report(
        self,
        baseline: dict[str, Any],
        fds_after_idle: int | None,
        fd_settled_t: float | None,
        final_status: dict[str, Any] | None,
        metrics: str,
        exit_code: int | None,
        stop_seconds: float,
    ) -> dict[str, Any]:
        args = self.args
        assert self.load is not None
        stats = self.load.stats
        self.classify()
        errors = stats.errors
        outside = [e for e in errors if not e.in_window]
        inside = [e for e in errors if e.in_window]
        unexpected = [e for e in errors if not e.expected]
        load_samples = [s for s in self.samples if s["phase"] == "load"]
        post_warmup = [s for s in load_samples if s["t"] >= args.warmup and s["rss_kb"]]
        rss_first = post_warmup[0]["rss_kb"] if post_warmup else None
        rss_last = post_warmup[-1]["rss_kb"] if post_warmup else None
        rss_max = max((s["rss_kb"] for s in load_samples if s["rss_kb"]), default=None)
        growth = (
            100.0 * (rss_last - rss_first) / rss_first if rss_first and rss_last else float("nan")
        )
        slope = rss_slope_kb_per_min(post_warmup)
        fds_peak = max((s["fds"] for s in self.samples if s["fds"] is not None), default=None)
        fds_end = self.samples[-1]["fds"] if self.samples else None
        log_text = self.proxy_log.read_text(errors="replace")
        tracebacks = log_text.count("Traceback")
        error_lines = [line for line in log_text.splitlines() if " ERROR " in line]
        backend_tracebacks = sum(
            b.log_path.read_text(errors="replace").count("Traceback") for b in self.backends
        )
        generation = final_status.get("generation") if final_status else None
        reloads = final_status.get("reloads") if final_status else None
        checks = {
            "no unexpected errors": not unexpected,
            f"RSS growth after warm-up < {args.rss_growth_limit:g} %": growth
            < args.rss_growth_limit,
            f"fds back to baseline +-{args.fd_tolerance}": fds_end is not None
            and abs(fds_end - baseline["fds"]) <= args.fd_tolerance,
            "every reload applied": reloads is not None
            and reloads.get("success") == self.reloads_written
            and reloads.get("failure") == 0,
            "tdproxy exited 0 on SIGTERM": exit_code == 0,
            "no traceback in tdproxy's log": tracebacks == 0,
            "no other problem": not self.problems,
        }
        verdict = "PASS" if all(checks.values()) else "FAIL"
        upstream = parse_metric(metrics, "tdproxy_upstream_errors_total")
        retries = parse_metric(metrics, "tdproxy_retries_total")
        requests_metric = parse_metric(metrics, "tdproxy_requests_total")
        result: dict[str, Any] = {
            "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "machine": machine_info(),
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "revision": self.revision,
            "settings": {k: v for k, v in vars(args).items()},
            "config_initial": config_text(self.backends, (50, 50), args.idle),
            "duration_seconds": args.minutes * 60,
            "requests": {
                "total": stats.done,
                "ok": dict(stats.ok),
                "failed": dict(stats.failed),
                "by_backend": dict(stats.backends),
                "bytes_up": stats.bytes_up,
                "bytes_down": stats.bytes_down,
            },
            "errors": {
                "total": stats.error_count,
                "outside_windows": len(outside),
                "inside_windows": len(inside),
                "unexpected": len(unexpected),
                "by_kind_outside": dict(collections.Counter(f"{e.op}:{e.kind}" for e in outside)),
                "by_kind_inside": dict(
                    collections.Counter(
                        f"{e.op}:{e.kind}:{'after-head' if e.started_response else 'before-head'}"
                        for e in inside
                    )
                ),
                "records": [dataclasses.asdict(e) for e in errors],
            },
            "windows": [dataclasses.asdict(w) | {"end": w.end} for w in self.windows],
            "events": self.events,
            "reloads": {
                "written": self.reloads_written,
                "applied": reloads,
                "final_generation": generation,
            },
            "rss": {
                "baseline_kb": baseline["rss_kb"],
                "warmup_seconds": args.warmup,
                "first_after_warmup_kb": rss_first,
                "last_under_load_kb": rss_last,
                "max_kb": rss_max,
                "growth_percent": round(growth, 2),
                "slope_kb_per_minute": None if slope is None else round(slope, 1),
                "end_kb": self.samples[-1]["rss_kb"] if self.samples else None,
            },
            "fds": {
                "baseline": baseline["fds"],
                "peak": fds_peak,
                "after_idle_timeout": fds_after_idle,
                "end": fds_end,
                "settled_after_seconds": None if fd_settled_t is None else round(fd_settled_t, 1),
            },
            "tdproxy": {
                "exit_code": exit_code,
                "stop_seconds": round(stop_seconds, 2),
                "tracebacks": tracebacks,
                "error_lines": error_lines[:20],
                "upstream_errors": upstream,
                "retries": retries,
                "requests_total": requests_metric,
            },
            "backend_tracebacks": backend_tracebacks,
            "problems": self.problems,
            "samples": self.samples,
            "checks": checks,
            "verdict": verdict,
        }
        return result


def rss_slope_kb_per_min(samples: list[dict[str, Any]]) -> float | None:
    """Least-squares slope of RSS over time (kB per minute), a steadier view than two points."""
    points = [(s["t"], s["rss_kb"]) for s in samples if s["rss_kb"]]
    if len(points) < 3:
        return None
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_r = sum(r for _, r in points) / n
    var = sum((t - mean_t) ** 2 for t, _ in points)
    if var == 0:
        return None
    cov = sum((t - mean_t) * (r - mean_r) for t, r in points)
    return 60 * cov / var


def parse_metric(text: str, name: str) -> dict[str, float]:
    """``{labels: value}`` for one metric family from the Prometheus text format."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            head, _, value = line.rpartition(" ")
            labels = head[len(name) :].strip("{}")
            with contextlib.suppress(ValueError):
                values[labels] = float(value)
    return values


def fmt_clock(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 60:2d}:{seconds % 60:02d}"


def print_report(result: dict[str, Any]) -> None:
    r = result
    log()
    log("=" * 78)
    m = r["machine"]
    log(f"soak: {r['duration_seconds'] / 60:g} min, {r['settings']['concurrency']} clients")
    log(f"machine: {m['cpu_model']}, {m['cores']} cores, Linux {m['kernel']}, Python {m['python']}")
    log(f"tdproxy revision: {r['revision']}")
    req = r["requests"]
    log(f"requests: {req['total']} ({req['total'] / r['duration_seconds']:.0f}/s)")
    for op in OPS:
        log(f"  {op:14} ok {req['ok'].get(op, 0):>8}   failed {req['failed'].get(op, 0):>5}")
    log(f"  by backend: {req['by_backend']}")
    log(f"  bytes up {req['bytes_up'] / 1e6:.1f} MB, down {req['bytes_down'] / 1e6:.1f} MB")
    e = r["errors"]
    log(
        f"errors: {e['total']} total, {e['outside_windows']} outside restart windows, "
        f"{e['inside_windows']} inside, {e['unexpected']} unexpected"
    )
    for kind, count in sorted(e["by_kind_outside"].items()):
        log(f"  outside  {kind}: {count}")
    for kind, count in sorted(e["by_kind_inside"].items()):
        log(f"  inside   {kind}: {count}")
    for record in [x for x in e["records"] if not x["expected"]][:10]:
        log(f"  unexpected: {record}")
    log("restart windows:")
    for w in r["windows"]:
        log(f"  {w['backend']}: killed at {w['kill']:.1f}s, back at {w['up']:.1f}s")
    rl = r["reloads"]
    log(
        f"reloads: {rl['written']} written, applied {rl['applied']}, "
        f"generation {rl['final_generation']}"
    )
    rss = r["rss"]
    log(
        f"RSS: baseline {rss['baseline_kb'] / 1024:.1f} MB; after warm-up "
        f"{(rss['first_after_warmup_kb'] or 0) / 1024:.1f} MB -> "
        f"{(rss['last_under_load_kb'] or 0) / 1024:.1f} MB ({rss['growth_percent']:+.2f} %), "
        f"max {(rss['max_kb'] or 0) / 1024:.1f} MB, slope {rss['slope_kb_per_minute']} kB/min, "
        f"end {(rss['end_kb'] or 0) / 1024:.1f} MB"
    )
    f = r["fds"]
    log(
        f"fds: baseline {f['baseline']}, peak {f['peak']}, after idle timeout "
        f"{f['after_idle_timeout']}, end {f['end']} (settled after {f['settled_after_seconds']} s)"
    )
    t = r["tdproxy"]
    log(
        f"tdproxy: exit {t['exit_code']} after SIGTERM in {t['stop_seconds']} s, "
        f"{t['tracebacks']} traceback(s), {len(t['error_lines'])} ERROR line(s)"
    )
    log(f"  upstream errors: { {k: v for k, v in t['upstream_errors'].items() if v} }")
    log(f"  retries: {t['retries']}")
    for problem in r["problems"]:
        log(f"problem: {problem}")
    log("samples (every minute):")
    columns = ("time", 5), ("requests", 9), ("errors", 6), ("RSS MB", 7), ("fds", 5), ("cpu%", 5)
    log("  " + " ".join(f"{name:>{width}}" for name, width in columns) + f" {'load':>5}")
    for s in minute_samples(r["samples"]):
        when = "base" if s["phase"] == "baseline" else fmt_clock(s["t"])
        log(
            f"  {when:>5} {s['requests']:>9} {s['errors']:>6} "
            f"{(s['rss_kb'] or 0) / 1024:>7.1f} {s['fds']:>5} "
            f"{s['cpu_percent'] if s['cpu_percent'] is not None else '-':>5} {s['loadavg']:>5.2f}"
        )
    for name, ok in r["checks"].items():
        log(f"  [{'ok' if ok else 'FAIL'}] {name}")
    log(f"{r['verdict']}")


def minute_samples(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The baseline, the first load sample at or after each minute, the last load sample, and
    the last sample (after the load)."""
    chosen: list[dict[str, Any]] = []
    load = [s for s in samples if s["phase"] == "load"]
    chosen += [s for s in samples if s["phase"] == "baseline"]
    minute = 0
    for s in load:
        if s["t"] >= minute * 60:
            chosen.append(s)
            minute = int(s["t"] // 60) + 1
    if load and load[-1] not in chosen:
        chosen.append(load[-1])
    if samples and samples[-1]["phase"] == "idle":
        chosen.append(samples[-1])
    return chosen


# --------------------------------------------------------------------------- main


async def amain(args: argparse.Namespace, tmp: Path, soak: Soak) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    loop.add_signal_handler(signal.SIGTERM, task.cancel)
    return await soak.run()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="tdproxy-soak-"))
    soak = Soak(args, tmp)
    failed = True
    try:
        result = asyncio.run(amain(args, tmp, soak))
        print_report(result)
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1, default=str) + "\n")
            log(f"wrote {args.json}")
        failed = result["verdict"] != "PASS"
        return 0 if not failed else 1
    except SoakError as exc:
        log(f"soak: {exc}")
        return 2
    except (KeyboardInterrupt, asyncio.CancelledError):
        log("soak: interrupted")
        return 130
    finally:
        soak.children.stop_all()
        if args.keep_tmp or failed:
            log(f"configs and logs kept in {tmp}")
        else:
            for path in sorted(tmp.iterdir()):
                path.unlink()
            tmp.rmdir()


if __name__ == "__main__":
    sys.exit(main())
