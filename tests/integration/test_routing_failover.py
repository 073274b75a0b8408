"""Failover, backups and killed backends under a steady load, through real tdproxy processes.

issue 3: ``failover`` sends everything to the first healthy non-backup backend in list order and
the next ones take over in order; traffic returns to the primary by itself once it is healthy
again (after ``rise`` successes); ``backup: true`` gets traffic only while no non-backup backend is
healthy, in every method. Killing the primary's process under a steady GET load moves all traffic
to the backup within ``interval x fall + 1 s``, with zero 5xx after detection and, thanks to
retries, no client-visible error at all. The same holds for a killed backend in ``round_robin``.

Health checks run every 300 ms with a 200 ms timeout, fall 2, rise 2. Detection and recovery are
read from tdproxy's log lines (``backend NAME: up -> down (...)``), polled with a deadline.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Self

from tests.fakes import client
from tests.fakes.client import RawClient
from tests.fakes.process import (
    BackendFactory,
    BackendProcess,
    ProxyFactory,
    ProxyProcess,
    proxy_config,
    wait_until,
)

INTERVAL = 0.3
FALL = 2
RISE = 2
HEALTH = {
    "enabled": True,
    "path": "/health",
    "interval": f"{int(INTERVAL * 1000)}ms",
    "timeout": "200ms",
    "fall": FALL,
    "rise": RISE,
}
DETECTION_BOUND = INTERVAL * FALL + 1.0  # the "within interval x fall + 1 s"


# ---------------------------------------------------------------------------------------------
# A steady GET load


@dataclass(frozen=True)
class Outcome:
    started: float  # time.monotonic() when the request was sent
    finished: float
    status: int | None  # None: the client saw an error instead of a response
    backend: str | None
    error: str | None = None


class SteadyLoad:
    """``workers`` threads sending GETs back to back on keep-alive connections until stopped.

    Every request's outcome is recorded; an exception (reset, EOF, timeout) is an outcome with
    ``status=None``, after which that worker opens a new connection.
    """

    def __init__(self, proxy: ProxyProcess, path: str = "/", workers: int = 1) -> None:
        self.proxy = proxy
        self.path = path
        self.outcomes: list[Outcome] = []
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, name=f"load-{n}", daemon=True)
            for n in range(workers)
        ]

    def __enter__(self) -> Self:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=15)
        assert not any(thread.is_alive() for thread in self._threads), "load thread stuck"

    def _run(self) -> None:
        connection: RawClient | None = None
        number = 0
        joiner = "&" if "?" in self.path else "?"
        try:
            while not self._stop.is_set():
                number += 1
                started = time.monotonic()
                try:
                    if connection is None:
                        connection = RawClient(self.proxy.host, self.proxy.port, timeout=5)
                    response = connection.request("GET", f"{self.path}{joiner}n={number}")
                except Exception as exc:  # every failure is a client-visible error to count
                    self.outcomes.append(Outcome(started, time.monotonic(), None, None, repr(exc)))
                    if connection is not None:
                        connection.close()
                        connection = None
                    continue
                self.outcomes.append(
                    Outcome(
                        started, time.monotonic(), response.status, response.header("X-Backend")
                    )
                )
                if (response.header("Connection") or "").lower() == "close":
                    connection.close()
                    connection = None
        finally:
            if connection is not None:
                connection.close()

    def snapshot(self) -> list[Outcome]:
        return list(self.outcomes)

    def wait_for(self, count: int, after: float = 0.0, timeout: float = 15.0) -> list[Outcome]:
        """Wait until ``count`` requests started after ``after`` have finished; return them."""

        def enough() -> list[Outcome]:
            done = [o for o in self.snapshot() if o.started >= after]
            return done if len(done) >= count else []

        return wait_until(enough, timeout, message=f"{count} requests of the load")


def errors(outcomes: Sequence[Outcome]) -> list[Outcome]:
    return [o for o in outcomes if o.status is None]


def non_2xx(outcomes: Sequence[Outcome]) -> list[Outcome]:
    return [o for o in outcomes if o.status is not None and not 200 <= o.status < 300]


def by_backend(outcomes: Sequence[Outcome]) -> Counter[str | None]:
    return Counter(o.backend for o in outcomes)


def wait_for_log(proxy: ProxyProcess, text: str, timeout: float = 15.0) -> float:
    """Wait until ``text`` is in tdproxy's stderr; return the monotonic time it was seen."""
    proxy.wait_for_output(text, timeout=timeout, stream="stderr")
    return time.monotonic()


def backends_served(proxy: ProxyProcess, count: int = 20) -> Counter[str]:
    """Who answered ``count`` sequential GETs, each on a fresh connection (all must be 200)."""
    seen: Counter[str] = Counter()
    for _ in range(count):
        response = client.request(proxy.url + "/")
        assert response.status == 200, (response.status, response.text)
        seen[response.header("X-Backend") or "?"] += 1
    return seen


def config_for(
    backends: Sequence[BackendProcess | Mapping[str, Any]], method: str, **overrides: Any
) -> dict[str, Any]:
    """A config over ``backends`` (processes, or mappings with ``process`` and extra keys)."""
    specs = []
    for item in backends:
        if isinstance(item, BackendProcess):
            specs.append({"name": item.name, "url": item.url, "weight": 1})
        else:
            extra = {key: value for key, value in item.items() if key != "process"}
            process = item["process"]
            specs.append({"name": process.name, "url": process.url, "weight": 1, **extra})
    return proxy_config(specs, routing={"method": method}, health_check=HEALTH, **overrides)


# ---------------------------------------------------------------------------------------------
# failover


def test_failover_sends_everything_to_the_primary(
    backend_factory: BackendFactory, proxy_factory: ProxyFactory
) -> None:
    primary, backup = backend_factory("primary"), backend_factory("backup")
    # Weights are ignored: the backup's larger weight changes nothing.
    proxy = proxy_factory(
        config_for(
            [{"process": primary, "weight": 1}, {"process": backup, "weight": 99}], "failover"
        )
    )
    assert backends_served(proxy, 30) == {"primary": 30}
    assert backup.stats()["requests_by_path"].get("/", 0) == 0


def test_killed_primary_fails_over_under_load_and_traffic_returns(
    backend_factory: BackendFactory, proxy_factory: ProxyFactory
) -> None:
    primary, backup = backend_factory("primary"), backend_factory("backup")
    proxy = proxy_factory(config_for([primary, backup], "failover"))
    samples: list[dict[str, int]] = []  # the restarted primary's path counts, as seen over time

    def primary_counts() -> dict[str, int]:
        counts = primary.stats()["requests_by_path"]
        sample = {"/health": counts.get("/health", 0), "/": counts.get("/", 0)}
        samples.append(sample)
        return sample

    with SteadyLoad(proxy) as load:
        before = load.wait_for(50)
        assert by_backend(before) == {"primary": len(before)}, by_backend(before)

        killed = time.monotonic()
        primary.kill()
        detected = wait_for_log(proxy, "backend primary: up -> down")
        after_detection = load.wait_for(100, after=detected)

        primary.restart()  # same port: the proxy's url still fits
        wait_until(
            lambda: primary_counts()["/"] > 0,
            timeout=10,
            message="traffic back on the restarted primary",
        )
        returned = wait_for_log(proxy, "backend primary: down -> up")
        after_return = load.wait_for(50, after=returned)

    everything = load.snapshot()
    assert errors(everything) == [], "client-visible errors despite retries"
    assert non_2xx(everything) == []
    assert detected - killed <= DETECTION_BOUND, f"detected after {detected - killed:.2f}s"
    # After detection (and before the restart) all on the backup, no 5xx.
    seen = by_backend(after_detection)
    assert seen == {"backup": len(after_detection)}, seen
    # Back after ``rise`` active successes, never earlier, and then all of it.
    assert f"({RISE} consecutive successes" in proxy.wait_for_output(
        "backend primary: down -> up", stream="stderr"
    )
    early = [s for s in samples if s["/"] > 0 and s["/health"] < RISE]
    assert early == [], f"traffic reached the primary before {RISE} checks: {samples}"
    assert by_backend(after_return) == {"primary": len(after_return)}, by_backend(after_return)


def test_failover_takes_over_in_list_order(
    backend_factory: BackendFactory, proxy_factory: ProxyFactory
) -> None:
    first, second, spare = (backend_factory(n) for n in ("first", "second", "spare"))
    proxy = proxy_factory(
        config_for([first, second, {"process": spare, "backup": True}], "failover")
    )
    assert backends_served(proxy) == {"first": 20}

    first.set_health(500)
    wait_for_log(proxy, "backend first: up -> down")
    assert backends_served(proxy) == {"second": 20}

    second.set_health(500)
    wait_for_log(proxy, "backend second: up -> down")
    assert backends_served(proxy) == {"spare": 20}

    second.set_health(200)
    wait_for_log(proxy, "backend second: down -> up")
    assert backends_served(proxy) == {"second": 20}

    first.set_health(200)
    wait_for_log(proxy, "backend first: down -> up")
    assert backends_served(proxy) == {"first": 20}


# ---------------------------------------------------------------------------------------------
# backup: true in round_robin


def test_round_robin_backup_serves_only_while_no_main_backend_is_healthy(
    backend_factory: BackendFactory, proxy_factory: ProxyFactory
) -> None:
    blue, green, spare = (backend_factory(n) for n in ("blue", "green", "spare"))
    proxy = proxy_factory(
        config_for([blue, green, {"process": spare, "backup": True}], "round_robin")
    )
    assert backends_served(proxy) == {"blue": 10, "green": 10}

    blue.set_health(500)
    wait_for_log(proxy, "backend blue: up -> down")
    assert backends_served(proxy) == {"green": 20}, "one healthy main backend keeps the backup idle"

    green.set_health(500)
    wait_for_log(proxy, "backend green: up -> down")
    assert backends_served(proxy) == {"spare": 20}

    blue.set_health(200)
    wait_for_log(proxy, "backend blue: down -> up")
    assert backends_served(proxy) == {"blue": 20}
    served = spare.stats()["requests_by_path"].get("/", 0)
    assert served == 20, "the backup served exactly while both main backends were down"


# ---------------------------------------------------------------------------------------------
# A killed backend in round_robin


def test_killed_backend_under_load_causes_no_client_visible_error(
    backend_factory: BackendFactory, proxy_factory: ProxyFactory
) -> None:
    blue, green = backend_factory("blue"), backend_factory("green")
    proxy = proxy_factory(config_for([blue, green], "round_robin"))
    # Two workers on "/" and one on a slow path, so requests are in flight at the kill.
    with SteadyLoad(proxy, workers=2) as load, SteadyLoad(proxy, "/slow?ms=40") as slow:
        load.wait_for(60)
        slow.wait_for(3)
        killed = time.monotonic()
        green.kill()
        detected = wait_for_log(proxy, "backend green: up -> down")
        load.wait_for(100, after=detected)
        slow.wait_for(3, after=detected)
    everything = load.snapshot() + slow.snapshot()
    assert errors(everything) == [], "client-visible errors despite retries"
    assert non_2xx(everything) == []
    assert {"blue", "green"} <= set(by_backend(everything))
    after_kill = [o for o in everything if o.finished > killed and o.started > killed]
    assert by_backend(after_kill) == {"blue": len(after_kill)}, by_backend(after_kill)
