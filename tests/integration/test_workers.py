"""``workers: N``: a supervisor process and N worker processes, observed from outside.

Every test runs ``python -m tdproxy run`` with ``workers: 2`` in front of fake backends. The
kernel spreads new connections over the workers by a hash of the client's address and port, so
a test that needs every worker to serve sends each request on a new connection, enough of them
that both workers serve some with overwhelming probability, and then checks that they did
(each worker's pid and request count are in ``/api/v1/status``). Waits poll with deadlines:
worker counters reach the supervisor a few times a second.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest

from tests.fakes import client
from tests.fakes.client import RawClient
from tests.fakes.process import (
    BackendFactory,
    BackendProcess,
    ProxyFactory,
    ProxyProcess,
    proxy_config,
    run_tdproxy,
    wait_until,
)

# New connections per round: the chance that one of two workers gets none is 2**-(ROUND-1).
ROUND = 40
COUNTERS_WITHIN = 5.0  # snapshots arrive every 0.25 s; generous for a loaded machine


@pytest.fixture
def blue(backend_factory: BackendFactory) -> BackendProcess:
    return backend_factory("blue")


@pytest.fixture
def green(backend_factory: BackendFactory) -> BackendProcess:
    return backend_factory("green")


def workers_config(*backends: tuple[str, str, int], **overrides: Any) -> dict[str, Any]:
    return proxy_config(list(backends), workers=2, access_log={"enabled": False}, **overrides)


def status(proxy: ProxyProcess) -> dict[str, Any]:
    document: dict[str, Any] = client.request(proxy.admin_url + "/api/v1/status").json()
    return document


def processes(proxy: ProxyProcess) -> list[dict[str, Any]]:
    workers: list[dict[str, Any]] = status(proxy)["workers"]["processes"]
    return workers


def worker_requests(proxy: ProxyProcess) -> dict[int, int]:
    """Requests answered per worker pid, as the supervisor last heard."""
    return {p["pid"]: p["requests"] for p in processes(proxy) if p["pid"] is not None}


def serve_round(proxy: ProxyProcess, count: int = ROUND, path: str = "/") -> Counter[str]:
    """``count`` requests, each on a new connection; which backend answered them."""
    served: Counter[str] = Counter()
    for _ in range(count):
        response = client.request(proxy.url + path)
        assert response.status == 200, response
        served[response.header("X-Backend") or "?"] += 1
    return served


def all_workers_served(
    proxy: ProxyProcess, before: Mapping[int, int], total: int
) -> Callable[[], dict[int, int]]:
    """A wait condition: every live worker answered more than in ``before``, and the
    supervisor has heard of ``total`` more requests in all."""

    def check() -> dict[int, int]:
        now = worker_requests(proxy)
        grown = {pid: count - before.get(pid, 0) for pid, count in now.items()}
        if sum(grown.values()) < total or any(n <= 0 for n in grown.values()) or len(now) < 2:
            return {}
        return grown

    return check


def start_workers(proxy_factory: ProxyFactory, config: Mapping[str, Any]) -> ProxyProcess:
    proxy = proxy_factory(config, wait_admin=True)
    wait_until(
        lambda: status(proxy)["workers"]["live"] == 2,
        timeout=10,
        message="two workers serving",
    )
    return proxy


def pid_gone(pid: int) -> bool:
    """The process has exited (a zombie waiting for its new parent to reap it counts)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


# -- serving and counting ---------------------------------------------------------------------


def test_two_workers_both_serve_and_their_counters_sum(
    blue: BackendProcess, green: BackendProcess, proxy_factory: ProxyFactory
) -> None:
    proxy = start_workers(
        proxy_factory, workers_config(("blue", blue.url, 1), ("green", green.url, 1))
    )
    workers = processes(proxy)
    pids = {p["pid"] for p in workers}
    assert len(pids) == 2 and proxy.pid not in pids
    assert all(p["state"] == "running" for p in workers)

    served = serve_round(proxy, 2 * ROUND)
    assert sum(served.values()) == 2 * ROUND
    grown = wait_until(
        all_workers_served(proxy, {}, 2 * ROUND),
        timeout=COUNTERS_WITHIN,
        message="both workers served and reported",
    )
    assert set(grown) == pids
    assert sum(grown.values()) == 2 * ROUND

    def metric_total() -> float:
        return client.metric(proxy.admin_url, "tdproxy_requests_total")

    wait_until(lambda: metric_total() == 2 * ROUND, timeout=COUNTERS_WITHIN)
    by_backend = {
        name: client.metric(proxy.admin_url, "tdproxy_requests_total", backend=name)
        for name in ("blue", "green")
    }
    assert by_backend == {"blue": served["blue"], "green": served["green"]}
    document = status(proxy)
    assert sum(b["requests"] for b in document["backends"]) == 2 * ROUND
    # The observed share comes from the summed per-second counts.
    shares = {b["name"]: b["observed_share"] for b in document["backends"]}
    assert shares["blue"] == pytest.approx(served["blue"] / (2 * ROUND))
    # Each worker runs its own exact rotation: the split is within +-2 of 50/50.
    assert abs(served["blue"] - served["green"]) <= 2
    assert client.metric(proxy.admin_url, "tdproxy_workers") == 2
    assert client.metric(proxy.admin_url, "tdproxy_worker_restarts_total") == 0
    assert client.request(proxy.admin_url + "/readyz").status == 200


def test_workers_1_is_one_process(blue: BackendProcess, proxy_factory: ProxyFactory) -> None:
    proxy = proxy_factory(proxy_config([("blue", blue.url, 1)], workers=1), wait_admin=True)
    serve_round(proxy, 3)
    document = status(proxy)["workers"]
    assert document["configured"] == 1 and document["live"] == 1
    assert [p["pid"] for p in document["processes"]] == [proxy.pid]
    assert document["processes"][0]["requests"] == 3
    assert client.metric(proxy.admin_url, "tdproxy_workers") == 1
    children = Path(f"/proc/{proxy.pid}/task/{proxy.pid}/children").read_text().split()
    assert children == []


# -- a worker dies ------------------------------------------------------------------------------


def test_a_killed_worker_is_replaced_within_a_second_and_nothing_counted_is_lost(
    blue: BackendProcess, proxy_factory: ProxyFactory
) -> None:
    proxy = start_workers(proxy_factory, workers_config(("blue", blue.url, 1)))
    serve_round(proxy)
    wait_until(all_workers_served(proxy, {}, ROUND), timeout=COUNTERS_WITHIN)
    victim = processes(proxy)[0]
    killed = time.monotonic()
    os.kill(victim["pid"], signal.SIGKILL)

    def replaced() -> dict[str, Any] | None:
        slot = processes(proxy)[victim["index"]]
        fresh = slot["pid"] not in (None, victim["pid"]) and slot["state"] == "running"
        return slot if fresh else None

    slot = wait_until(replaced, timeout=5, interval=0.01, message="the worker replaced")
    took = time.monotonic() - killed
    assert took < 1.0, f"replaced after {took:.2f}s"
    assert slot["restarts"] == 1
    assert client.metric(proxy.admin_url, "tdproxy_worker_restarts_total") == 1
    assert client.metric(proxy.admin_url, "tdproxy_workers") == 2
    # The dead worker's counts stay in the totals (it had reported them before it died).
    assert client.metric(proxy.admin_url, "tdproxy_requests_total") == ROUND
    before = worker_requests(proxy)
    serve_round(proxy)
    wait_until(all_workers_served(proxy, before, ROUND), timeout=COUNTERS_WITHIN)
    wait_until(
        lambda: client.metric(proxy.admin_url, "tdproxy_requests_total") == 2 * ROUND,
        timeout=COUNTERS_WITHIN,
    )
    assert f"worker {victim['index']} (pid {victim['pid']}) exited" in proxy.stderr_text()


# -- generations and health reach every worker ------------------------------------------------


def test_a_reload_reaches_every_worker(
    blue: BackendProcess, green: BackendProcess, proxy_factory: ProxyFactory
) -> None:
    config = workers_config(("blue", blue.url, 1), ("green", green.url, 0))
    proxy = start_workers(proxy_factory, config)
    assert serve_round(proxy) == Counter({"blue": ROUND})
    wait_until(all_workers_served(proxy, {}, ROUND), timeout=COUNTERS_WITHIN)

    config["backends"] = [
        {"name": "blue", "url": blue.url, "weight": 0},
        {"name": "green", "url": green.url, "weight": 1},
    ]
    proxy.write_config(config)
    outcome = client.request(proxy.admin_url + "/api/v1/reload", "POST").json()
    assert outcome["ok"], outcome
    generation = outcome["generation"]
    wait_until(
        lambda: all(p["generation"] == generation for p in processes(proxy)),
        timeout=5,
        message="every worker on the new generation",
    )
    before = worker_requests(proxy)
    assert serve_round(proxy) == Counter({"green": ROUND})
    wait_until(all_workers_served(proxy, before, ROUND), timeout=COUNTERS_WITHIN)


def test_a_health_change_reaches_every_worker(
    blue: BackendProcess, green: BackendProcess, proxy_factory: ProxyFactory
) -> None:
    config = workers_config(
        ("blue", blue.url, 1),
        ("green", green.url, 1),
        health_check={
            "enabled": True,
            "path": "/health",
            "interval": "200ms",
            "fall": 1,
            "rise": 1,
        },
    )
    proxy = start_workers(proxy_factory, config)
    green.set_health(503)
    wait_until(
        lambda: not {b["name"]: b for b in status(proxy)["backends"]}["green"]["healthy"],
        timeout=5,
        message="green marked down",
    )
    before = worker_requests(proxy)
    assert serve_round(proxy) == Counter({"blue": ROUND})
    wait_until(all_workers_served(proxy, before, ROUND), timeout=COUNTERS_WITHIN)

    green.set_health(200)
    wait_until(
        lambda: {b["name"]: b for b in status(proxy)["backends"]}["green"]["healthy"],
        timeout=5,
        message="green back up",
    )
    before = worker_requests(proxy)
    served = serve_round(proxy)
    assert abs(served["blue"] - served["green"]) <= 2
    wait_until(all_workers_served(proxy, before, ROUND), timeout=COUNTERS_WITHIN)


def test_passive_failures_seen_by_workers_take_the_backend_out_everywhere(
    blue: BackendProcess, green: BackendProcess, proxy_factory: ProxyFactory
) -> None:
    config = workers_config(
        ("blue", blue.url, 1),
        ("green", green.url, 1),
        # Active checks far apart: only live traffic can find green gone in this test.
        health_check={
            "enabled": True,
            "path": "/health",
            "interval": "60s",
            "passive": {"max_failures": 2},
        },
        timeouts={"connect": "1s"},
    )
    proxy = start_workers(proxy_factory, config)
    green.stop()
    # Connect errors on green are retried on blue: every request is answered.
    assert serve_round(proxy) == Counter({"blue": ROUND})
    green_state = {b["name"]: b for b in status(proxy)["backends"]}["green"]
    assert not green_state["healthy"]
    assert "on live traffic" in green_state["health_reason"]

    def settled() -> float:
        """green's connect errors, once blue's answers are all counted."""
        if status(proxy)["backends"][0]["requests"] < answered:
            return 0
        return client.metric(proxy.admin_url, "tdproxy_upstream_errors_total", backend="green")

    answered = ROUND
    errors = wait_until(settled, timeout=COUNTERS_WITHIN)
    assert 2 <= errors < ROUND
    # Every worker now leaves green out: no new connect errors.
    before = worker_requests(proxy)
    serve_round(proxy)
    wait_until(all_workers_served(proxy, before, ROUND), timeout=COUNTERS_WITHIN)
    answered = 2 * ROUND
    assert wait_until(settled, timeout=COUNTERS_WITHIN) == errors


# -- stopping -----------------------------------------------------------------------------------


def test_sigterm_drains_every_worker_and_exits_0(
    blue: BackendProcess, proxy_factory: ProxyFactory
) -> None:
    proxy = start_workers(proxy_factory, workers_config(("blue", blue.url, 1)))
    worker_pids = [p["pid"] for p in processes(proxy)]
    results: list[int] = []
    lock = threading.Lock()

    def slow_request() -> None:
        response = client.request(proxy.url + "/slow?ms=1500", timeout=10)
        with lock:
            results.append(response.status)

    threads = [threading.Thread(target=slow_request) for _ in range(12)]
    for thread in threads:
        thread.start()

    def in_flight() -> bool:
        backends = status(proxy)["backends"]
        workers = [p for p in processes(proxy) if p["connections_active"] > 0]
        return sum(b["in_flight"] for b in backends) >= 6 and len(workers) == 2

    wait_until(in_flight, timeout=5, message="requests in flight on both workers")
    proxy.terminate()
    for thread in threads:
        thread.join(10)
    assert results == [200] * 12
    assert proxy.wait(timeout=10) == 0
    assert all(pid_gone(pid) for pid in worker_pids)
    assert "Traceback" not in proxy.stderr_text()


def test_workers_exit_when_the_supervisor_is_killed(
    blue: BackendProcess, proxy_factory: ProxyFactory
) -> None:
    proxy = start_workers(proxy_factory, workers_config(("blue", blue.url, 1)))
    worker_pids = [p["pid"] for p in processes(proxy)]
    with RawClient(proxy.host, proxy.port) as idle:  # an idle keep-alive connection
        assert idle.request("GET", "/").status == 200
        proxy.kill()
        wait_until(
            lambda: all(pid_gone(pid) for pid in worker_pids),
            timeout=5,
            message="the workers exited",
        )


def test_a_port_in_use_is_a_clear_start_error(blue: BackendProcess, tmp_path: Path) -> None:
    import socket

    import yaml

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        config = workers_config(("blue", blue.url, 1))
        config["entrypoint"]["port"] = taken.getsockname()[1]
        path = tmp_path / "taken.yaml"
        path.write_text(yaml.safe_dump(config))
        result = run_tdproxy("run", "--config", str(path), timeout=20)
    assert result.returncode == 1
    assert "cannot start" in result.stderr and "in use" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_sighup_reloads_every_worker(
    blue: BackendProcess, green: BackendProcess, proxy_factory: ProxyFactory
) -> None:
    config = workers_config(("blue", blue.url, 1), ("green", green.url, 0))
    proxy = start_workers(proxy_factory, config)
    config["backends"][0]["weight"], config["backends"][1]["weight"] = 0, 1
    path = proxy.config_path
    # Written in place with the old size, inode and mtime kept: only the signal can apply it.
    stat = path.stat()
    text = path.read_text().replace("weight: 1", "weight: X").replace("weight: 0", "weight: 1")
    path.write_text(text.replace("weight: X", "weight: 0"))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    proxy.send_signal(signal.SIGHUP)
    wait_until(
        lambda: [p["generation"] for p in processes(proxy)] == [2, 2],
        timeout=5,
        message="every worker on generation 2",
    )
    assert serve_round(proxy, 10) == Counter({"green": 10})


def test_a_tls_entrypoint_and_its_redirect_port_are_served_by_every_worker(
    blue: BackendProcess, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    import http.client
    import ssl

    from tests.fakes.process import free_port
    from tests.fakes.tls import make_self_signed

    cert, key = make_self_signed(tmp_path, ("127.0.0.1",))
    trust = ssl.create_default_context(cafile=str(cert))
    redirect_port = free_port()
    config = workers_config(
        ("blue", blue.url, 1),
        entrypoint={
            "tls": {"certificate": str(cert), "key": str(key)},
            "redirect_http_port": redirect_port,
        },
    )
    proxy = start_workers(proxy_factory, config)
    for _ in range(ROUND):
        connection = http.client.HTTPSConnection(proxy.host, proxy.port, context=trust, timeout=10)
        try:
            connection.request("GET", "/")
            assert connection.getresponse().status == 200
        finally:
            connection.close()
    wait_until(all_workers_served(proxy, {}, ROUND), timeout=COUNTERS_WITHIN)
    redirect = client.request(f"http://127.0.0.1:{redirect_port}/x")
    assert redirect.status == 301
    assert redirect.header("Location") == f"https://127.0.0.1:{proxy.port}/x"
