"""What ``run.py`` measures: the scenarios, the servers each one needs and the load on each.

A **scenario** is one row of the comparison (small responses over 50 keep-alive connections, a
new connection per request, TLS, HTTP/2, ...). It has **variants**, the columns measured side by
side in alternating rounds: a server (the backend nginx hit directly, nginx or HAProxy as a
proxy, tdproxy) and the load put on it. Several variants may share one server process (HTTP/2
and HTTP/1.1 against the same TLS listener). Every scenario also names the **comparisons** it
prints as ratios.

Pure data and arithmetic, no I/O: ``tests/unit/test_benchmark_scenarios.py`` checks it. Standard
library only, like every benchmark script.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

SMALL_BODY = b"ok\n"  # what the backend answers at "/"
LARGE_PATH = "/1mib"
LARGE_SIZE = 1024 * 1024  # the backend serves a file of this size at LARGE_PATH
KINDS = ("backend", "nginx", "haproxy", "tdproxy")


@dataclasses.dataclass(frozen=True)
class Server:
    """One process to start for a scenario. ``kind`` is backend, nginx, haproxy or tdproxy;
    the backend is started once per run and serves plain HTTP, HTTPS and h2 on three ports."""

    kind: str
    tls: bool = False
    http2: bool = False
    access_log: bool = False
    workers: int = 1

    @property
    def key(self) -> str:
        """A name for the process, unique within a scenario."""
        parts = [self.kind]
        if self.tls:
            parts.append("h2" if self.http2 else "tls")
        if self.access_log:
            parts.append("log")
        if self.workers != 1:
            parts.append(f"w{self.workers}")
        return "-".join(parts)


@dataclasses.dataclass(frozen=True)
class Load:
    """The load generator's side of a variant.

    ``tool`` is wrk (HTTP/1.1, optionally with ``Connection: close`` so every request opens a
    new connection) or h2load (``streams`` concurrent streams per connection over h2, or
    HTTP/1.1 with ``h1``)."""

    tool: str = "wrk"
    connections: int = 50
    streams: int = 1
    h1: bool = False
    close: bool = False
    path: str = "/"
    body_size: int = len(SMALL_BODY)

    def describe(self) -> str:
        if self.tool == "h2load":
            proto = "HTTP/1.1" if self.h1 else "h2"
            text = f"h2load {proto}, {self.connections} conn"
            if self.streams > 1:
                text += f" x {self.streams} streams"
        else:
            text = f"wrk, {self.connections} conn"
        if self.close:
            text += ", Connection: close"
        if self.body_size != len(SMALL_BODY):
            text += f", {self.body_size} B bodies"
        return text


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    server: Server
    load: Load

    @property
    def kind(self) -> str:
        return self.server.kind


@dataclasses.dataclass(frozen=True)
class Comparison:
    """``numerator / denominator`` of two variants' medians, printed with ``label``."""

    label: str
    numerator: str
    denominator: str


@dataclasses.dataclass(frozen=True)
class Scenario:
    key: str
    title: str
    variants: tuple[Variant, ...]
    comparisons: tuple[Comparison, ...]
    note: str = ""

    def variant(self, name: str) -> Variant | None:
        return next((v for v in self.variants if v.name == name), None)

    def servers(self) -> list[Server]:
        """The processes to start (the backend excluded), each once, in variant order."""
        seen: dict[str, Server] = {}
        for v in self.variants:
            if v.kind != "backend":
                seen.setdefault(v.server.key, v.server)
        return list(seen.values())


def _proxies(
    load: Load, *, tls: bool = False, backend: bool = True, anchors: Iterable[str] = ("haproxy",)
) -> tuple[Variant, ...]:
    """backend direct, nginx, the other anchors and tdproxy, all under the same load."""
    kinds = ["backend"] if backend else []
    kinds += ["nginx", *anchors, "tdproxy"]
    return tuple(Variant(kind, Server(kind, tls=tls), load) for kind in kinds)


def _vs_anchors(*anchors: str, of: str = "tdproxy") -> tuple[Comparison, ...]:
    return tuple(Comparison(f"{of}/{a}", of, a) for a in anchors)


def build_scenarios(connections: int = 50) -> dict[str, Scenario]:
    """Every scenario by its command-line key, in the order a full run measures them."""
    small = Load(connections=connections)
    tls_small = Load(connections=connections)
    anchors = _vs_anchors("nginx", "haproxy")
    h2 = Load("h2load", connections=1, streams=50)
    h1 = Load("h2load", connections=connections, h1=True)
    scenarios = [
        Scenario(
            "keepalive",
            f"small responses, {connections} keep-alive connections",
            _proxies(small),
            anchors,
        ),
        Scenario(
            "conn1000",
            "small responses, 1,000 keep-alive connections",
            _proxies(Load(connections=1000)),
            anchors,
        ),
        Scenario(
            "newconn",
            "a new connection per request (Connection: close)",
            _proxies(Load(connections=connections, close=True)),
            anchors,
        ),
        Scenario(
            "1mib",
            "1 MiB responses",
            _proxies(Load(connections=connections, path=LARGE_PATH, body_size=LARGE_SIZE)),
            anchors,
        ),
        Scenario(
            "tls",
            "TLS entrypoint, keep-alive",
            _proxies(tls_small, tls=True),
            anchors,
        ),
        Scenario(
            "tls-handshake",
            "TLS, a handshake per request (Connection: close)",
            _proxies(Load(connections=connections, close=True), tls=True),
            anchors,
        ),
        Scenario(
            "accesslog",
            "access log on (JSON lines to a file) vs off",
            tuple(
                Variant(f"{kind}{'-log' if log else ''}", Server(kind, access_log=log), small)
                for kind in ("nginx", "tdproxy")
                for log in (False, True)
            ),
            (
                Comparison("tdproxy log on/off", "tdproxy-log", "tdproxy"),
                Comparison("nginx log on/off", "nginx-log", "nginx"),
                Comparison("tdproxy-log/nginx-log", "tdproxy-log", "nginx-log"),
            ),
            note="tdproxy writes JSON lines to stdout, which the benchmark sends to a file; "
            "nginx writes a JSON log_format with the same fields to a file "
            "(buffer=64k flush=1s)",
        ),
        Scenario(
            "workers",
            "1 vs 2 worker processes",
            tuple(
                Variant(f"{kind}-w{n}", Server(kind, workers=n), small)
                for kind in ("nginx", "tdproxy")
                for n in (1, 2)
            ),
            (
                Comparison("nginx 2/1 workers", "nginx-w2", "nginx-w1"),
                Comparison("tdproxy 2/1 workers", "tdproxy-w2", "tdproxy-w1"),
                Comparison("tdproxy-w2/nginx-w2", "tdproxy-w2", "nginx-w2"),
            ),
            note="wrk, the backend and the proxy share the machine's cores, so a second worker "
            "gains only what the others leave free",
        ),
        Scenario(
            "h2",
            "HTTP/2 at the TLS entrypoint: 1 connection x 50 streams (h2load)",
            (
                *(
                    Variant(kind, Server(kind, tls=True, http2=True), h2)
                    for kind in ("backend", "nginx", "haproxy", "tdproxy")
                ),
                Variant("nginx-h1", Server("nginx", tls=True, http2=True), h1),
                Variant("tdproxy-h1", Server("tdproxy", tls=True, http2=True), h1),
            ),
            (
                *anchors,
                Comparison("tdproxy h2/h1 (http2 default rule: >= 1)", "tdproxy", "tdproxy-h1"),
                Comparison("nginx h2/h1", "nginx", "nginx-h1"),
            ),
            note=f"h2 rows: h2load -c1 -m50; the -h1 rows: h2load --h1 -c{connections} over "
            "TLS to the same listener",
        ),
    ]
    return {s.key: s for s in scenarios}


SCENARIO_KEYS = tuple(build_scenarios())


def parse_scenarios(value: str) -> list[str]:
    """The scenario keys named in a comma-separated list, in the full run's order.

    Raises ``ValueError`` naming every unknown key."""
    wanted = [w.strip() for w in value.split(",") if w.strip()]
    unknown = [w for w in wanted if w not in SCENARIO_KEYS]
    if unknown or not wanted:
        raise ValueError(f"unknown {unknown}; choose from {','.join(SCENARIO_KEYS)}")
    return [k for k in SCENARIO_KEYS if k in wanted]


def select_variants(scenario: Scenario, kinds: Sequence[str]) -> Scenario:
    """The scenario with only the variants whose server kind is in ``kinds``."""
    variants = tuple(v for v in scenario.variants if v.kind in kinds)
    return dataclasses.replace(scenario, variants=variants)


# Seconds a scenario spends outside the measured runs: starting its servers, checking that
# each serves, stopping them. Measured on a 2-core machine; used only for the printed plan.
SETUP_SECONDS_PER_SERVER = 2.0


def planned_seconds(
    scenarios: Sequence[Scenario], rounds: int, duration: int, warmup: int, extra: float = 0.0
) -> float:
    """How long a run of ``scenarios`` takes, about: every variant gets ``warmup`` seconds
    once and ``duration`` seconds per round; each server costs some set-up time."""
    total = extra
    for s in scenarios:
        total += len(s.variants) * (warmup + rounds * duration)
        total += (len(s.servers()) + 1) * SETUP_SECONDS_PER_SERVER
    return total


def ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator > 0 else None


def scaling_share(base1: float, base2: float, ours1: float, ours2: float) -> float | None:
    """Our gain from 1 to 2 workers as a share of the anchor's gain (1.0 = the same gain).

    ``None`` when the anchor gained nothing, where a share means nothing."""
    anchor_gain = base2 / base1 - 1.0 if base1 > 0 else 0.0
    if anchor_gain <= 0 or ours1 <= 0:
        return None
    return (ours2 / ours1 - 1.0) / anchor_gain
