"""The Python cost of one proxied request, without sockets.

Drives tdproxy's real protocol objects (a ``ClientConnection`` and pooled ``UpstreamConnection``s
behind a real ``Router``) with in-memory transports: a ``GET /`` as wrk sends it goes in, the
request head the backend would receive comes out, a small nginx-style response goes back in and
the answer to the client comes out. No system calls and no event-loop turns are involved, so the
figure is the interpreter's share of a request and moves little between runs, which makes it the
yardstick for hot-path changes (``run.py`` measures the whole thing against nginx).

    python3 benchmarks/hotpath.py                 # best of 5 x 100,000 requests, in µs
    python3 benchmarks/hotpath.py --profile       # also the top functions by own time (cProfile)
    python3 benchmarks/hotpath.py --show          # print what goes out on each side, once
    python3 benchmarks/hotpath.py --access-log json   # with the access log on
    python3 benchmarks/hotpath.py --new-connections   # a connection per request

For line-level sampling, run it under ``py-spy record --format raw``.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import pstats
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tdproxy.config.loader import parse_config_text
from tdproxy.dataplane.client import ClientConnection
from tdproxy.dataplane.context import ProxyContext
from tdproxy.dataplane.endpoints import Endpoints
from tdproxy.dataplane.upstream import UpstreamConnection
from tdproxy.observability.access_log import AccessLog
from tdproxy.observability.log_output import LogWriter
from tdproxy.routing.router import Router

CONFIG = """
entrypoint: {address: 127.0.0.1, port: 18080}
backends:
  - {name: a, url: "http://127.0.0.1:18090", weight: 50}
  - {name: b, url: "http://127.0.0.1:18090", weight: 50}
access_log: {enabled: false}
health_check: {enabled: false}
"""
REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1:18080\r\n\r\n"
CLOSE_REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1:18080\r\nConnection: close\r\n\r\n"
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Fri, 27 Nov 2026 19:40:00 GMT\r\n"
    b"Content-Type: text/plain\r\nContent-Length: 3\r\nConnection: keep-alive\r\n\r\nok\n"
)


class MemoryTransport:
    """Just enough of ``asyncio.Transport`` for the hot path; counts (or shows) what is sent."""

    def __init__(self, name: str, show: bool = False) -> None:
        self.name = name
        self.show = show
        self.sent = 0

    def write(self, data: bytes) -> None:
        self.sent += 1
        if self.show:
            print(f"{self.name} <- {bytes(data)!r}")

    def writelines(self, data: list[bytes]) -> None:
        self.write(b"".join(data))

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 50000) if name == "peername" else default

    def can_write_eof(self) -> bool:
        return True

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass


class Rig:
    def __init__(
        self, show: bool = False, access_log: str = "off", new_connections: bool = False
    ) -> None:
        self.new_connections = new_connections
        config = parse_config_text(CONFIG)
        self.loop = asyncio.new_event_loop()
        endpoints = Endpoints()
        router = Router(config, endpoints)
        self.log: AccessLog | None = None
        self.devnull = -1
        if access_log != "off":
            # The real writer thread, writing to /dev/null: its share of the GIL counts too.
            self.devnull = os.open(os.devnull, os.O_WRONLY)
            self.log = AccessLog(access_log, LogWriter(self.devnull, "bench"))
        ctx = self.ctx = ProxyContext(
            self.loop, router, config, self.log, lambda target, kind: None, endpoints
        )
        self.served = 0
        for pool in endpoints.pools:
            upstream = UpstreamConnection(pool)
            upstream.connection_made(MemoryTransport(f"backend {pool.key[0]}", show))  # type: ignore[arg-type]
            pool.put(upstream, 0.0)
        self.client_transport = MemoryTransport("client", show)
        self.client = ClientConnection(ctx)
        self.client.connection_made(self.client_transport)  # type: ignore[arg-type]

    def one(self) -> None:
        if self.new_connections:
            self.one_connection()
            return
        self.client.data_received(REQUEST)
        active = self.client._active
        assert active is not None and active.upstream is not None, "request not dispatched"
        active.upstream.data_received(RESPONSE)
        self.served += 1
        if self.log is not None and self.served % 1000 == 0:
            self.log.flush()  # the sweeper's job, every quarter second in the proxy

    def one_connection(self) -> None:
        """A connection per request, as ``wrk -H 'Connection: close'`` makes them: accepted,
        one request answered, closed."""
        client = ClientConnection(self.ctx)
        client.connection_made(self.client_transport)  # type: ignore[arg-type]
        client.data_received(CLOSE_REQUEST)
        active = client._active
        assert active is not None and active.upstream is not None, "request not dispatched"
        active.upstream.data_received(RESPONSE)
        client.connection_lost(None)
        self.served += 1

    def close(self) -> None:
        self.loop.close()
        if self.log is not None:
            self.log.flush()
        if self.devnull >= 0:
            os.close(self.devnull)


def measure(rig: Rig, requests: int, repeats: int) -> float:
    """Best of ``repeats`` runs, in µs per request."""
    for _ in range(2000):
        rig.one()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(requests):
            rig.one()
        best = min(best, (time.perf_counter() - start) / requests * 1e6)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--requests", type=int, default=100_000, help="requests per run")
    parser.add_argument("-r", "--repeats", type=int, default=5, help="runs (the best counts)")
    parser.add_argument("--profile", action="store_true", help="also print a cProfile summary")
    parser.add_argument("--show", action="store_true", help="print the bytes of one exchange")
    parser.add_argument(
        "--access-log",
        choices=("off", "json", "combined"),
        default="off",
        help="with the access log on (written by its thread to /dev/null)",
    )
    parser.add_argument(
        "--new-connections",
        action="store_true",
        help="a new client connection per request (Connection: close), as wrk -H does",
    )
    args = parser.parse_args(argv)
    if args.show:
        rig = Rig(show=True)
        rig.one()
        rig.close()
        return 0
    rig = Rig(access_log=args.access_log, new_connections=args.new_connections)
    try:
        best = measure(rig, args.requests, args.repeats)
        sent = rig.client_transport.sent
        if sent < args.requests * args.repeats:
            print(f"error: only {sent} answers reached the client", file=sys.stderr)
            return 1
        print(f"{best:.3f} µs per request (best of {args.repeats} x {args.requests:,})")
        if args.profile:
            profile = cProfile.Profile()
            profile.enable()
            for _ in range(min(args.requests, 50_000)):
                rig.one()
            profile.disable()
            pstats.Stats(profile).sort_stats("tottime").print_stats(25)
    finally:
        rig.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
