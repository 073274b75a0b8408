"""Live reload of a real tdproxy process: the file watcher, SIGHUP and ``POST /api/v1/reload``.

Every test runs ``python -m tdproxy run`` in front of fake backends and changes its config the
way operators do: an editor's atomic replace, a Kubernetes ConfigMap's ``..data`` symlink swap,
a signal, an API call. What a reload must get right is observed from outside only: which backend
answers (``X-Backend``), ``/metrics``, ``/api/v1/status`` and the log on stderr.

The watcher polls about once a second, so a change written to the file lands within ~1 s; waits
for it poll the status document's ``generation`` (bumped by every applied reload) or its reload
counters, each with a deadline. Where a test needs a change that only an explicit trigger can
apply, it edits the file in place keeping its inode, size and mtime, which the poller cannot see.
"""

from __future__ import annotations

import copy
import functools
import os
import re
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.fakes import client
from tests.fakes.client import RawClient
from tests.fakes.process import (
    BackendFactory,
    BackendProcess,
    ProxyFactory,
    ProxyProcess,
    free_port,
    port_is_open,
    proxy_config,
    start_backend,
    wait_until,
)
from tests.fakes.websocket import OP_CLOSE, OP_TEXT

WATCH_DEADLINE = 10.0  # generous: the watcher itself polls every ~1 s
APPLY_WITHIN = 2.0  # the promise: an edited weight is in effect this soon after the write
LOG_TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d")


# -- fixtures and helpers ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def backends() -> Iterator[dict[str, BackendProcess]]:
    """Three fake environments shared by the module (tests only read from them)."""
    with (
        start_backend("blue") as blue,
        start_backend("green") as green,
        start_backend("red") as red,
    ):
        yield {"blue": blue, "green": green, "red": red}


def config_for(backends: Mapping[str, BackendProcess], **weights: int) -> dict[str, Any]:
    """A config over the named backends, with these weights, on fresh ports."""
    return proxy_config([(name, backends[name].url, weight) for name, weight in weights.items()])


def reweighted(
    config: Mapping[str, Any], backends: Mapping[str, BackendProcess], **weights: int
) -> dict[str, Any]:
    """``config`` (same ports and other settings) with exactly these backends and weights."""
    new = copy.deepcopy(dict(config))
    new["backends"] = [
        {"name": name, "url": backends[name].url, "weight": weight}
        for name, weight in weights.items()
    ]
    return new


def dump(config: Mapping[str, Any]) -> str:
    return yaml.safe_dump(dict(config), sort_keys=False)


def status(proxy: ProxyProcess) -> dict[str, Any]:
    response = client.request(proxy.admin_url + "/api/v1/status")
    assert response.status == 200, response.text
    document: dict[str, Any] = response.json()
    return document


def metrics(proxy: ProxyProcess) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of ``/metrics``, keyed by name and label set."""
    response = client.request(proxy.admin_url + "/metrics")
    assert response.status == 200, response.text
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def sample(
    samples: Mapping[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def backend_names(samples: Mapping[tuple[str, frozenset[tuple[str, str]]], float]) -> set[str]:
    return {value for (_, labels) in samples for key, value in labels if key == "backend"}


def wait_generation(proxy: ProxyProcess, generation: int) -> dict[str, Any]:
    """Wait until the config generation ``generation`` serves; returns that status document."""
    return wait_until(
        lambda: (doc := status(proxy))["generation"] >= generation and doc,
        WATCH_DEADLINE,
        0.05,
        message=f"config generation {generation}",
    )


def wait_reloads(proxy: ProxyProcess, *, success: int, failure: int) -> dict[str, Any]:
    """Wait until ``tdproxy_config_reloads_total`` reaches these counts; returns the status."""
    expected = {"success": success, "failure": failure}
    return wait_until(
        lambda: (doc := status(proxy))["reloads"] == expected and doc,
        WATCH_DEADLINE,
        0.05,
        message=f"reload counts {expected}",
    )


def hits(proxy: ProxyProcess, count: int, path: str = "/") -> list[str]:
    """Which backend answered each of ``count`` requests on one keep-alive connection."""
    answered = []
    with RawClient(proxy.host, proxy.port) as raw:
        for _ in range(count):
            response = raw.request("GET", path)
            assert response.status == 200, (response.status, response.body)
            answered.append(response.header("X-Backend") or "?")
    return answered


def reload_counters(proxy: ProxyProcess) -> tuple[float | None, float | None, float | None]:
    """(last_reload_successful, reloads_total{success}, reloads_total{failure})."""
    samples = metrics(proxy)
    return (
        sample(samples, "tdproxy_config_last_reload_successful"),
        sample(samples, "tdproxy_config_reloads_total", result="success"),
        sample(samples, "tdproxy_config_reloads_total", result="failure"),
    )


def rewrite_unseen(path: Path, text: str) -> None:
    """Rewrite ``path`` in place with same-size ``text`` and restore its mtime: the inode, size
    and mtime the watcher polls do not move, so only SIGHUP or the API can apply the change."""
    before = os.stat(path)
    data = text.encode()
    assert len(data) == before.st_size, "the new text must keep the file's size"
    with open(path, "r+b") as file:
        file.write(data)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


def post_reload(
    proxy: ProxyProcess, headers: list[tuple[str, str]] | None = None
) -> client.Response:
    return client.request(proxy.admin_url + "/api/v1/reload", "POST", headers=headers or [])


# -- a continuous load ------------------------------------------------------------------------


@dataclass
class Attempt:
    started: float
    ended: float
    backend: str | None  # X-Backend of a 200 answer; None when the request failed
    problem: str = ""


@dataclass
class Worker:
    """One load thread's log: every attempt, in order, and how many connections it opened."""

    name: str
    attempts: list[Attempt] = field(default_factory=list)
    connections: int = 0

    def failures(self) -> list[Attempt]:
        return [a for a in self.attempts if a.backend is None]

    def settled_after(self, since: float, backend: str, streak: int = 20) -> float | None:
        """Seconds from ``since`` until every request went to ``backend``: the end of the last
        request started after ``since`` that went elsewhere (0 if none did). None until at least
        ``streak`` requests in a row have gone to ``backend`` since then."""
        later = [a for a in self.attempts[:] if a.started >= since]
        last_other = max((i for i, a in enumerate(later) if a.backend != backend), default=-1)
        if len(later) - last_other - 1 < streak:
            return None
        return later[last_other].ended - since if last_other >= 0 else 0.0


class Load:
    """Requests sent without pause by two threads until stopped: one over a single keep-alive
    connection, one on a new connection per request. Every failure is recorded, never raised."""

    def __init__(self, proxy: ProxyProcess) -> None:
        self.proxy = proxy
        self.keepalive = Worker("keep-alive")
        self.fresh = Worker("new connections")
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._keepalive_loop, name="load-keepalive"),
            threading.Thread(target=self._fresh_loop, name="load-fresh"),
        ]

    @property
    def workers(self) -> tuple[Worker, Worker]:
        return self.keepalive, self.fresh

    def __enter__(self) -> Self:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)

    def _attempt(self, worker: Worker, send: Callable[[], client.Response]) -> None:
        started = time.monotonic()
        try:
            response = send()
        except Exception as exc:  # any failure is data for the test, not a crash of the thread
            worker.attempts.append(Attempt(started, time.monotonic(), None, repr(exc)))
            raise
        ended = time.monotonic()
        if response.status == 200:
            worker.attempts.append(Attempt(started, ended, response.header("X-Backend")))
        else:
            problem = f"HTTP {response.status}: {response.body[:200]!r}"
            worker.attempts.append(Attempt(started, ended, None, problem))

    def _keepalive_loop(self) -> None:
        raw: RawClient | None = None
        try:
            while not self._stop.is_set():
                try:
                    if raw is None:
                        raw = self._attempt_connect()
                    self._attempt(self.keepalive, functools.partial(raw.request, "GET", "/"))
                except Exception:
                    if raw is not None:
                        raw.close()
                    raw = None
        finally:
            if raw is not None:
                raw.close()

    def _attempt_connect(self) -> RawClient:
        started = time.monotonic()
        self.keepalive.connections += 1
        try:
            return RawClient(self.proxy.host, self.proxy.port)
        except OSError as exc:
            self.keepalive.attempts.append(Attempt(started, time.monotonic(), None, repr(exc)))
            raise

    def _fresh_loop(self) -> None:
        url = self.proxy.url + "/"
        while not self._stop.is_set():
            self.fresh.connections += 1
            try:
                self._attempt(self.fresh, lambda: client.request(url))
            except Exception:
                continue

    def wait_settled(self, since: float, backend: str) -> float:
        """Wait until both workers see only ``backend``; returns the slower one's delay."""

        def settled() -> list[float]:
            """Each worker's delay once all of them have settled, else []."""
            delays = [worker.settled_after(since, backend) for worker in self.workers]
            return [] if None in delays else [d for d in delays if d is not None]

        return max(wait_until(settled, WATCH_DEADLINE, 0.05, message=f"all traffic on {backend}"))


# -- weights edited in the file ----------------------------------------------------------------


def test_edited_weights_apply_within_2s_under_load_without_a_failed_request(
    backends: dict[str, BackendProcess], proxy_factory: ProxyFactory
) -> None:
    config = config_for(backends, blue=50, green=50)
    proxy = proxy_factory(config, wait_admin=True)
    assert Counter(hits(proxy, 10)) == {"blue": 5, "green": 5}

    with Load(proxy) as load:
        wait_until(lambda: all(len(w.attempts) >= 20 for w in load.workers), message="load running")
        written = time.monotonic()
        proxy.write_config(reweighted(config, backends, blue=100, green=0))
        to_blue = load.wait_settled(written, "blue")
        written = time.monotonic()
        proxy.write_config(reweighted(config, backends, blue=0, green=100))
        to_green = load.wait_settled(written, "green")

    assert to_blue < APPLY_WITHIN, f"100/0 took {to_blue:.2f}s to apply"
    assert to_green < APPLY_WITHIN, f"0/100 took {to_green:.2f}s to apply"
    for worker in load.workers:
        assert worker.failures() == [], f"{worker.name}: {worker.failures()[:5]}"
        assert {a.backend for a in worker.attempts} == {"blue", "green"}
    # The keep-alive connection opened before both reloads served throughout.
    assert load.keepalive.connections == 1
    assert load.fresh.connections > 20

    # Each applied change is one timestamped line: what changed and the resulting distribution.
    first = proxy.wait_for_output("config reloaded (file), generation 2", stream="stderr")
    assert LOG_TIMESTAMP.match(first), first
    assert "blue weight 50 -> 100" in first and "green weight 50 -> 0" in first, first
    assert "blue 100% / green 0% (drain)" in first, first
    second = proxy.wait_for_output("config reloaded (file), generation 3", stream="stderr")
    assert "blue 0% (drain) / green 100%" in second, second


# -- invalid files ---------------------------------------------------------------------------


def test_invalid_file_keeps_the_old_split_and_flips_the_reload_gauge(
    backends: dict[str, BackendProcess], proxy_factory: ProxyFactory
) -> None:
    config = config_for(backends, blue=3, green=1)
    proxy = proxy_factory(config, wait_admin=True)
    path = str(proxy.config_path)
    assert Counter(hits(proxy, 8)) == {"blue": 6, "green": 2}
    assert reload_counters(proxy) == (1, 0, 0)

    # 1. Not YAML at all.
    proxy.write_config(dump(config) + "backends: [\n  - name: broken\n")
    doc = wait_reloads(proxy, success=0, failure=1)
    assert reload_counters(proxy) == (0, 0, 1)
    assert doc["generation"] == 1 and doc["last_reload"]["ok"] is False
    [error] = doc["last_reload"]["errors"]
    assert path in error and "not valid YAML" in error and "line" in error, error
    assert Counter(hits(proxy, 8)) == {"blue": 6, "green": 2}
    logged = proxy.wait_for_output("not valid YAML", stream="stderr")
    assert "(yaml)" in logged
    assert f"{path}: invalid configuration" in proxy.stderr_text()

    # 2. Valid YAML that breaks the schema: a negative weight, reported with its key path.
    proxy.write_config(reweighted(config, backends, blue=3, green=-1))
    doc = wait_reloads(proxy, success=0, failure=2)
    assert reload_counters(proxy) == (0, 0, 2)
    assert doc["generation"] == 1
    [error] = doc["last_reload"]["errors"]
    assert error == f"{path}: backends[1].weight: must be >= 0", error
    assert Counter(hits(proxy, 8)) == {"blue": 6, "green": 2}
    logged = proxy.wait_for_output("backends[1].weight: must be >= 0", stream="stderr")
    assert "must be >= 0" in logged
    assert "reload (file) failed, still serving generation 1" in proxy.stderr_text()

    # The status page says so too.
    page = client.request(proxy.admin_url + "/status").text
    assert "backends[1].weight: must be &gt;= 0" in page

    # 3. A fixed file applies and brings the gauge back.
    proxy.write_config(reweighted(config, backends, blue=1, green=1))
    doc = wait_reloads(proxy, success=1, failure=2)
    assert reload_counters(proxy) == (1, 1, 2)
    assert doc["generation"] == 2 and doc["last_reload"]["errors"] == []
    assert hits(proxy, 6) in (["blue", "green"] * 3, ["green", "blue"] * 3)


def test_reverting_a_broken_file_to_the_serving_content_clears_the_error(
    backends: dict[str, BackendProcess], proxy_factory: ProxyFactory
) -> None:
    config = config_for(backends, blue=1, green=1)
    proxy = proxy_factory(config, wait_admin=True)
    good = dump(config)
    proxy.write_config(good + "routing: [\n")
    wait_reloads(proxy, success=0, failure=1)
    proxy.write_config(good)  # the operator reverts the bad edit (git checkout, rollback)
    # The watcher reads the file at once but applies it only once it has settled (1 s).
    wait_until(
        lambda: reload_counters(proxy)[0] == 1,
        WATCH_DEADLINE,
        message="tdproxy_config_last_reload_successful back to 1",
    )
    assert status(proxy)["last_reload"]["errors"] == []


# -- ConfigMap-style symlink swaps -----------------------------------------------------------


def publish(configmap: Path, stamp: str, text: str) -> Path:
    """What Kubernetes' atomic writer does: write a new timestamped directory, point a temporary
    ``..data_tmp`` symlink at it and rename that over ``..data`` in one step."""
    version = configmap / f"..{stamp}"
    version.mkdir()
    (version / "tdproxy.yaml").write_text(text, encoding="utf-8")
    temporary = configmap / "..data_tmp"
    temporary.symlink_to(version.name)
    os.replace(temporary, configmap / "..data")
    return version


def test_configmap_symlink_swap_is_picked_up(
    backends: dict[str, BackendProcess], proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    config = config_for(backends, blue=1, green=1)
    configmap = tmp_path / "configmap"
    configmap.mkdir()
    first = publish(configmap, "2026_01_01_00_00_00.000000001", dump(config))
    link = configmap / "tdproxy.yaml"
    link.symlink_to("..data/tdproxy.yaml")
    # The fixture writes its own copy and passes --config first; the later --config wins.
    proxy = proxy_factory(config, args=("--config", str(link)), wait_admin=True)
    assert status(proxy)["config_path"] == str(link)
    assert Counter(hits(proxy, 4)) == {"blue": 2, "green": 2}

    second = publish(
        configmap, "2026_01_01_00_01_00.000000002", dump(reweighted(config, backends, blue=1))
    )
    doc = wait_generation(proxy, 2)
    assert [b["name"] for b in doc["backends"]] == ["blue"]
    assert hits(proxy, 4) == ["blue"] * 4
    # Kubernetes then deletes the old version; the next swap must still be seen.
    for item in first.iterdir():
        item.unlink()
    first.rmdir()

    publish(
        configmap,
        "2026_01_01_00_02_00.000000003",
        dump(reweighted(config, backends, blue=0, green=5)),
    )
    doc = wait_generation(proxy, 3)
    assert {b["name"]: b["weight"] for b in doc["backends"]} == {"blue": 0, "green": 5}
    assert hits(proxy, 4) == ["green"] * 4
    assert second.exists() and doc["reloads"] == {"success": 2, "failure": 0}


# -- open connections across a reload --------------------------------------------------------


def test_websocket_keepalive_and_in_flight_request_survive_a_reload(
    backends: dict[str, BackendProcess], proxy_factory: ProxyFactory
) -> None:
    config = config_for(backends, blue=1, green=0)
    proxy = proxy_factory(config, wait_admin=True)
    slow_result: list[client.Response | BaseException] = []

    def slow_request() -> None:
        try:
            slow_result.append(client.request(proxy.url + "/slow?ms=2500", timeout=20))
        except BaseException as exc:
            slow_result.append(exc)

    with RawClient(proxy.host, proxy.port) as ws, RawClient(proxy.host, proxy.port) as keepalive:
        handshake = ws.websocket_handshake()
        assert handshake.status == 101 and handshake.header("X-Backend") == "blue"
        ws.ws_send(OP_TEXT, b"before")
        assert ws.ws_recv() == (OP_TEXT, b"before")
        before = keepalive.request("GET", "/")
        assert before.status == 200 and before.header("X-Backend") == "blue"

        slow = threading.Thread(target=slow_request, name="slow-request")
        slow.start()
        try:
            wait_until(
                lambda: status(proxy)["backends"][0]["in_flight"] == 1,
                message="the slow request in flight on blue",
            )
            proxy.write_config(reweighted(config, backends, blue=0, green=1))
            wait_generation(proxy, 2)
            assert slow.is_alive(), "the slow request finished before the reload: inconclusive"
        finally:
            slow.join(30)

        [slow_response] = slow_result
        assert isinstance(slow_response, client.Response), slow_response
        assert slow_response.status == 200 and slow_response.header("X-Backend") == "blue"

        ws.ws_send(OP_TEXT, b"after the reload")
        assert ws.ws_recv() == (OP_TEXT, b"after the reload")
        after = keepalive.request("GET", "/")
        # Same connection, new split for the next request.
        assert after.status == 200 and after.header("X-Backend") == "green"
        opcode, payload = ws.ws_close(1000)
        assert (opcode, payload[:2]) == (OP_CLOSE, (1000).to_bytes(2, "big"))

    with RawClient(proxy.host, proxy.port) as ws:
        assert ws.websocket_handshake().header("X-Backend") == "green"


# -- explicit triggers -----------------------------------------------------------------------


def test_sighup_reloads_the_file(
    backends: dict[str, BackendProcess], proxy_factory: ProxyFactory
) -> None:
    config = config_for(backends, blue=5, green=5)
    proxy = proxy_factory(config, wait_admin=True)
    rewrite_unseen(proxy.config_path, dump(reweighted(config, backends, blue=9, green=1)))

    proxy.send_signal(signal.SIGHUP)
    doc = wait_generation(proxy, 2)
    assert doc["last_reload"]["trigger"] == "signal" and doc["last_reload"]["ok"] is True
    assert {b["name"]: b["weight"] for b in doc["backends"]} == {"blue": 9, "green": 1}
    assert Counter(hits(proxy, 10)) == {"blue": 9, "green": 1}
    line = proxy.wait_for_output("config reloaded (signal)", stream="stderr")
    assert "blue 90% / green 10%" in line


def test_reload_api_needs_the_token_and_refuses_foreign_origins(
    backends: dict[str, BackendProcess], proxy_factory: ProxyFactory
) -> None:
    token = "s3cret-admin-token"
    config = config_for(backends, blue=5, green=5)
    config["admin"]["token"] = token
    proxy = proxy_factory(config, wait_admin=True)
    changed = reweighted(config, backends, blue=9, green=1)
    rewrite_unseen(proxy.config_path, dump(changed))
    bearer = ("Authorization", f"Bearer {token}")

    refused = post_reload(proxy)
    assert refused.status == 401 and refused.header("WWW-Authenticate"), refused
    assert post_reload(proxy, [("Authorization", "Bearer wrong")]).status == 401
    foreign = post_reload(proxy, [bearer, ("Origin", "http://evil.example")])
    assert foreign.status == 403, foreign
    # None of the refused calls reloaded anything.
    doc = status(proxy)
    assert doc["generation"] == 1 and doc["reloads"] == {"success": 0, "failure": 0}
    assert Counter(hits(proxy, 10)) == {"blue": 5, "green": 5}

    # The admin's own origin (a form on its own page) and a plain API call are accepted; the
    # reload is done when the call returns.
    accepted = post_reload(proxy, [bearer, ("Origin", proxy.admin_url)])
    assert accepted.status == 200, accepted.text
    outcome = accepted.json()
    assert outcome["ok"] is True and outcome["trigger"] == "api" and outcome["generation"] == 2
    assert Counter(hits(proxy, 10)) == {"blue": 9, "green": 1}

    # A broken file: the API says why with 422 and the split stays.
    proxy.write_config(dump(changed).replace("weight: 1\n", "weight: -1\n"))
    broken = post_reload(proxy, [bearer])
    assert broken.status == 422, broken.text
    assert any("backends[1].weight: must be >= 0" in e for e in broken.json()["errors"])
    assert Counter(hits(proxy, 10)) == {"blue": 9, "green": 1}


def backdate(path: Path) -> None:
    """Give ``path`` a new mtime of a moment ago (a ``touch``) and an atime before that. (Not
    now: file timestamps come from a coarse clock that may lag ``time.time_ns()``.)"""
    mtime = time.time_ns() - 10**8
    if mtime == os.stat(path).st_mtime_ns:
        mtime -= 1
    os.utime(path, ns=(mtime - 10**9, mtime))


def read_since_modified(path: Path) -> bool:
    """Someone read ``path`` after its last modification (with relatime, a read moves the atime
    past an mtime that is newer than it)."""
    stat = os.stat(path)
    return stat.st_atime_ns > stat.st_mtime_ns


def atime_tracks_reads(directory: Path) -> bool:
    probe = directory / "atime-probe"
    probe.write_text("probe")
    backdate(probe)
    probe.read_text()
    return read_since_modified(probe)


def wait_until_watcher_read(
    path: Path, scratch: Path, done: Callable[[], bool] = lambda: False
) -> None:
    """Wait until the watcher has read ``path`` since it last changed (or ``done`` is true):
    positive evidence that it has looked at the change. On a filesystem that does not update
    atimes, watch three polls go by instead."""
    if atime_tracks_reads(scratch):
        wait_until(
            lambda: done() or read_since_modified(path),
            WATCH_DEADLINE,
            0.02,
            message=f"the config watcher reading {path}",
        )
    else:  # pragma: no cover - noatime mounts
        time.sleep(3.0)


def test_touching_the_file_is_not_a_reload(
    backends: dict[str, BackendProcess], proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    config = config_for(backends, blue=1, green=1)
    proxy = proxy_factory(config, wait_admin=True)
    path = proxy.config_path
    backdate(path)  # a new mtime only, like `touch`
    wait_until_watcher_read(path, tmp_path)  # it saw the new mtime
    doc = status(proxy)
    assert doc["generation"] == 1 and doc["reloads"] == {"success": 0, "failure": 0}
    assert doc["last_reload"]["trigger"] == "start"
    assert reload_counters(proxy) == (1, 0, 0)
    assert "config reloaded" not in proxy.stderr_text()

    # The watcher is alive: a real edit after the touch is exactly one reload.
    proxy.write_config(reweighted(config, backends, blue=1, green=2))
    wait_reloads(proxy, success=1, failure=0)
    assert status(proxy)["generation"] == 2


# -- what carries over, what changes live ----------------------------------------------------


def test_health_and_counters_carry_over_a_weight_change(
    backend_factory: BackendFactory, proxy_factory: ProxyFactory
) -> None:
    own = {"blue": backend_factory("blue"), "green": backend_factory("green")}
    config = config_for(own, blue=1, green=1)
    config["health_check"] = {
        "enabled": True,
        "path": "/health",
        "interval": "200ms",
        "timeout": "200ms",
        "fall": 1,
        "rise": 1,
    }
    proxy = proxy_factory(config, wait_admin=True)
    own["green"].set_health(500)
    wait_until(lambda: not status(proxy)["backends"][1]["healthy"], message="green marked down")
    assert hits(proxy, 10) == ["blue"] * 10
    down = status(proxy)["backends"][1]
    before = metrics(proxy)
    served = sample(before, "tdproxy_requests_total", backend="blue", code="200")
    assert served is not None and served >= 10

    reweighted_config = reweighted(config, own, blue=1, green=9)
    proxy.write_config(reweighted_config)
    doc = wait_generation(proxy, 2)
    green = doc["backends"][1]
    assert green["weight"] == 9 and green["healthy"] is False
    assert green["health_changed_at"] == down["health_changed_at"]
    assert green["health_reason"] == down["health_reason"]
    assert hits(proxy, 10) == ["blue"] * 10

    after = metrics(proxy)
    assert sample(after, "tdproxy_backend_up", backend="green") == 0
    assert sample(after, "tdproxy_requests_total", backend="blue", code="200") == served + 10
    checks_before = sample(before, "tdproxy_health_checks_total", backend="green", result="failure")
    checks_after = sample(after, "tdproxy_health_checks_total", backend="green", result="failure")
    assert checks_before is not None and checks_after is not None
    assert checks_after >= checks_before > 0


def test_backends_added_and_removed_live(
    backends: dict[str, BackendProcess], proxy_factory: ProxyFactory
) -> None:
    config = config_for(backends, blue=1, green=1)
    proxy = proxy_factory(config, wait_admin=True)
    assert Counter(hits(proxy, 4)) == {"blue": 2, "green": 2}

    proxy.write_config(reweighted(config, backends, blue=1, green=1, red=1))
    wait_generation(proxy, 2)
    assert Counter(hits(proxy, 6)) == {"blue": 2, "green": 2, "red": 2}
    assert sample(metrics(proxy), "tdproxy_backend_weight", backend="red") == 1
    added = proxy.wait_for_output("config reloaded (file), generation 2", stream="stderr")
    assert f"backend red added ({backends['red'].url}, weight 1)" in added, added

    proxy.write_config(reweighted(config, backends, blue=1, red=1))
    doc = wait_generation(proxy, 3)
    assert [b["name"] for b in doc["backends"]] == ["blue", "red"]
    assert Counter(hits(proxy, 4)) == {"blue": 2, "red": 2}
    samples = metrics(proxy)
    assert backend_names(samples) == {"blue", "red"}
    # blue kept its counter through both reloads: 2 + 2 + 2 answered requests.
    assert sample(samples, "tdproxy_requests_total", backend="blue", code="200") == 6
    removed = proxy.wait_for_output("config reloaded (file), generation 3", stream="stderr")
    assert "backend green removed" in removed and "blue 50% / red 50%" in removed, removed


CHECKED = {
    "enabled": True,
    "path": "/health",
    "interval": "300ms",
    "timeout": "200ms",
    "fall": 2,
    "rise": 2,
}


def test_a_backend_added_by_a_reload_serves_only_after_a_check(
    backend_factory: BackendFactory, proxy_factory: ProxyFactory
) -> None:
    """issue 11: the start-up promise (one round of checks before traffic) holds for a backend
    a reload adds. One whose /health answers 503 got 3 of the first 6 requests before ``fall``
    checks took it out; now none, and once its /health answers 200 again it comes in after
    ``rise`` successes, like any backend marked down."""
    own = {"blue": backend_factory("blue"), "broken": backend_factory("broken")}
    own["broken"].set_health(503)
    config = config_for(own, blue=1)
    config["health_check"] = CHECKED
    proxy = proxy_factory(config, wait_admin=True)
    assert hits(proxy, 4) == ["blue"] * 4

    proxy.write_config(reweighted(config, own, blue=1, broken=1))
    doc = wait_generation(proxy, 2)
    assert hits(proxy, 6) == ["blue"] * 6
    assert own["broken"].stats()["requests_by_path"].get("/", 0) == 0
    broken = doc["backends"][1]
    assert broken["healthy"] is False
    assert broken["health_reason"] == "first check: HTTP 503"
    assert doc["last_reload"]["changes"][-1] == (
        "backend broken down after its first check (HTTP 503)"
    )
    assert hits(proxy, 20) == ["blue"] * 20

    own["broken"].set_health(200)
    up = proxy.wait_for_output("backend broken: down -> up", stream="stderr")
    assert "(2 consecutive successes: HTTP 200)" in up, up
    assert Counter(hits(proxy, 6)) == {"blue": 3, "broken": 3}


def test_a_healthy_backend_added_by_a_reload_serves_at_once(
    backend_factory: BackendFactory, proxy_factory: ProxyFactory
) -> None:
    own = {"blue": backend_factory("blue"), "green": backend_factory("green")}
    config = config_for(own, blue=1)
    config["health_check"] = {**CHECKED, "interval": "60s"}  # no loop check comes in time
    proxy = proxy_factory(config, wait_admin=True)
    proxy.write_config(reweighted(config, own, blue=1, green=1))
    doc = wait_generation(proxy, 2)
    assert doc["backends"][1]["health_reason"] == "initial"  # passed: nothing changed
    assert Counter(hits(proxy, 6)) == {"blue": 3, "green": 3}
    assert sample(metrics(proxy), "tdproxy_health_checks_total", backend="green", result="success")


def test_a_backend_whose_url_changes_is_checked_before_it_serves_there(
    backend_factory: BackendFactory, proxy_factory: ProxyFactory
) -> None:
    own = {"blue": backend_factory("blue"), "green": backend_factory("green")}
    elsewhere = backend_factory("elsewhere")
    elsewhere.set_health(503)
    config = config_for(own, blue=1, green=1)
    config["health_check"] = {**CHECKED, "interval": "60s"}
    proxy = proxy_factory(config, wait_admin=True)
    moved = copy.deepcopy(config)
    moved["backends"][1]["url"] = elsewhere.url
    proxy.write_config(moved)
    doc = wait_generation(proxy, 2)
    assert doc["backends"][1]["healthy"] is False
    assert doc["backends"][1]["health_reason"] == "first check: HTTP 503"
    assert hits(proxy, 6) == ["blue"] * 6
    assert elsewhere.stats()["requests_by_path"].get("/", 0) == 0


def test_listener_changes_wait_for_the_next_start(
    backends: dict[str, BackendProcess], proxy_factory: ProxyFactory
) -> None:
    config = config_for(backends, blue=1, green=1)
    proxy = proxy_factory(config, wait_admin=True)
    old_port, admin_port = proxy.port, proxy.admin_port
    new_port, new_admin_port = free_port(), free_port()
    moved = reweighted(config, backends, blue=1, green=0)
    moved["entrypoint"] = {**config["entrypoint"], "port": new_port}
    moved["admin"] = {**config["admin"], "port": new_admin_port}

    proxy.write_config(moved)
    doc = wait_generation(proxy, 2)  # still answered on the old admin port
    pending = doc["last_reload"]["pending_restart"]
    assert pending == [
        f"entrypoint 127.0.0.1:{old_port} -> 127.0.0.1:{new_port}",
        f"admin 127.0.0.1:{admin_port} -> 127.0.0.1:{new_admin_port}",
    ]
    line = proxy.wait_for_output("not applied until the next start: entrypoint", stream="stderr")
    assert f"127.0.0.1:{old_port} -> 127.0.0.1:{new_port}" in line
    # Everything else applied live, on the old listeners.
    assert hits(proxy, 4) == ["blue"] * 4
    assert not port_is_open("127.0.0.1", new_port)
    assert not port_is_open("127.0.0.1", new_admin_port)


def test_pending_restart_compares_with_the_running_listeners(
    backends: dict[str, BackendProcess], proxy_factory: ProxyFactory
) -> None:
    config = config_for(backends, blue=1, green=1)
    proxy = proxy_factory(config, wait_admin=True)
    moved = copy.deepcopy(config)
    moved["entrypoint"]["port"] = free_port()
    proxy.write_config(moved)
    assert wait_generation(proxy, 2)["last_reload"]["pending_restart"] != []

    proxy.write_config(reweighted(config, backends, blue=2, green=1))  # the old port again
    doc = wait_generation(proxy, 3)
    assert doc["last_reload"]["pending_restart"] == []
