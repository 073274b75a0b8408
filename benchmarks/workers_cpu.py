#!/usr/bin/env python3
"""CPU time per request with ``workers: 1`` (one process) and ``workers: N`` (a supervisor and
N worker processes), side by side.

The claim being checked: a worker does exactly what the single process does per request (the
same counters, only reported to the supervisor a few times a second), so its CPU time per
request is the same, and the supervisor's is close to nothing. CPU time (user + system, from
``/proc/PID/stat``) rather than throughput, so that other load on the host matters less.

Rounds alternate 1, N, 1, N, ...; each round is one wrk run against a fresh proxy in front of
an nginx that answers a tiny fixed response. Run: ``python3 benchmarks/workers_cpu.py``.
Standard library only (plus wrk and nginx on the PATH).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from string import Template

from processes import Children

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
HOST = "127.0.0.1"
TICK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((HOST, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"port {port} never opened")


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            parents.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(parents.get(current, []))
    return found


def cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime


def config(port: int, admin: int, backend: int, workers: int) -> str:
    return (
        f"workers: {workers}\n"
        f"entrypoint: {{address: {HOST}, port: {port}}}\n"
        f"admin: {{address: {HOST}, port: {admin}}}\n"
        "access_log: {enabled: false}\n"
        "health_check: {enabled: false}\n"
        "backends:\n"
        f"  - {{name: blue, url: 'http://{HOST}:{backend}', weight: 50}}\n"
        f"  - {{name: green, url: 'http://{HOST}:{backend}', weight: 50}}\n"
    )


def one_round(args: argparse.Namespace, tmp: Path, backend: int, workers: int) -> dict[str, float]:
    port, admin = free_port(), free_port()
    path = tmp / f"tdproxy-{workers}.yaml"
    path.write_text(config(port, admin, backend, workers))
    proxy = subprocess.Popen(
        [sys.executable, "-m", "tdproxy", "run", "--config", str(path)],
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=(tmp / f"tdproxy-{workers}.log").open("ab"),
    )
    try:
        wait_port(port)
        wait_port(admin)
        wrk = ["wrk", "-t1", f"-c{args.connections}", f"-d{args.warmup}s", f"http://{HOST}:{port}/"]
        subprocess.run(wrk, check=True, capture_output=True)
        pids = descendants(proxy.pid)
        before = {pid: cpu_seconds(pid) for pid in pids}
        wrk[3] = f"-d{args.duration}s"
        out = subprocess.run(wrk, check=True, capture_output=True, text=True).stdout
        after = {pid: cpu_seconds(pid) for pid in pids}
    finally:
        proxy.terminate()
        proxy.wait(30)
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    spent = {pid: after[pid] - before[pid] for pid in pids}
    supervisor = spent[proxy.pid] if workers > 1 else 0.0
    data_plane = sum(spent.values()) - supervisor
    return {
        "rate": rate,
        "data_plane_us": 1e6 * data_plane / requests,
        "supervisor_us": 1e6 * supervisor / requests,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--workers", type=int, default=2, help="worker processes (2)")
    parser.add_argument("-r", "--rounds", type=int, default=3)
    parser.add_argument("-d", "--duration", type=int, default=8, help="seconds per wrk run")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("-c", "--connections", type=int, default=50)
    args = parser.parse_args()
    for tool in ("wrk", "nginx"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not on the PATH")
    children = Children(5.0, print)
    with tempfile.TemporaryDirectory(prefix="tdworkers-") as name:
        tmp = Path(name)
        backend = free_port()
        conf = tmp / "backend.conf"
        template = Template((HERE / "nginx-backend.conf.tmpl").read_text())
        conf.write_text(template.substitute(prefix=tmp, port=backend))
        try:
            children.start("backend", ["nginx", "-p", str(tmp), "-c", str(conf)], tmp / "nginx.log")
            wait_port(backend)
            results: dict[int, list[dict[str, float]]] = {1: [], args.workers: []}
            for number in range(args.rounds):
                for workers in (1, args.workers):
                    result = one_round(args, tmp, backend, workers)
                    results[workers].append(result)
                    print(
                        f"round {number + 1} workers={workers}: {result['rate']:.0f} req/s, "
                        f"data plane {result['data_plane_us']:.1f} us/request, "
                        f"supervisor {result['supervisor_us']:.2f} us/request",
                        flush=True,
                    )
        finally:
            children.stop_all()
    print("\nmedians:")
    for workers, rounds in results.items():
        median = {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
        print(
            f"  workers={workers}: {median['rate']:.0f} req/s; CPU per request: data plane "
            f"{median['data_plane_us']:.1f} us, supervisor {median['supervisor_us']:.2f} us"
        )


if __name__ == "__main__":
    main()
