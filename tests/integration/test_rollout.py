"""``tdproxy rollout`` as a real process, driving real ``tdproxy run`` processes in front of real
fake backends, with traffic from a bounded generator and short intervals."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from http.client import HTTPConnection, HTTPException
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.fakes import client
from tests.fakes.process import (
    REPO_ROOT,
    BackendFactory,
    BackendProcess,
    ProxyFactory,
    ProxyProcess,
    free_port,
    run_tdproxy,
    wait_until,
)

CONFIG = """\
# blue is live; green is the new release
entrypoint:
  address: 127.0.0.1
  port: {port}
routing:
  method: round_robin   # weights decide
backends:
  - name: blue
    url: {blue}
    weight: 100
  - name: green
    url: "{green}"
    weight: 0          # not live yet
  - name: spare
    url: {blue}
    backup: true
health_check:
  enabled: false
admin:
  address: 127.0.0.1
  port: {admin}
"""

ORIGINAL = {"blue": 100, "green": 0, "spare": 1}
PROMOTED = {"blue": 0, "green": 100, "spare": 1}


def config_text(
    blue: BackendProcess, green: BackendProcess, *, port: int = 0, admin: int = 0
) -> str:
    return CONFIG.format(
        port=port or free_port(), admin=admin or free_port(), blue=blue.url, green=green.url
    )


class Traffic:
    """``threads`` keep-alive clients sending ``GET /`` to the proxies, together at most
    ``rate`` requests a second, until stopped (or ``limit`` seconds pass)."""

    def __init__(self, urls: Sequence[str], threads: int = 4, rate: float = 200, limit: float = 60):
        self.urls = list(urls)
        self.threads = threads
        self.pause = threads / rate
        self.limit = limit
        self.stop = threading.Event()
        self.sent = 0
        self.failed = 0
        self._workers: list[threading.Thread] = []

    def __enter__(self) -> Traffic:
        for index in range(self.threads):
            url = self.urls[index % len(self.urls)]
            worker = threading.Thread(target=self._run, args=(url,), daemon=True)
            worker.start()
            self._workers.append(worker)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for worker in self._workers:
            worker.join(timeout=10)

    def _run(self, url: str) -> None:
        parts = urlsplit(url)
        assert parts.hostname is not None and parts.port is not None
        deadline = time.monotonic() + self.limit
        connection = HTTPConnection(parts.hostname, parts.port, timeout=5)
        while not self.stop.is_set() and time.monotonic() < deadline:
            try:
                connection.request("GET", "/")
                connection.getresponse().read()
                self.sent += 1
            except (OSError, HTTPException):
                self.failed += 1
                connection.close()
                connection = HTTPConnection(parts.hostname, parts.port, timeout=5)
            self.stop.wait(self.pause)
        connection.close()


class Rollout:
    """``tdproxy rollout ... --json`` running; its events read as they come."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tdproxy", "rollout", *args, "--json"],
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.events: list[dict[str, Any]] = []
        self.started = time.monotonic()

    def next_event(self, timeout: float = 60) -> dict[str, Any] | None:
        """The next event (None at the end of the output)."""
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            return None
        event: dict[str, Any] = json.loads(line)
        self.events.append(event)
        return event

    def until(self, kind: str, **fields: Any) -> dict[str, Any]:
        while True:
            event = self.next_event()
            if event is None:
                raise AssertionError(
                    f"no {kind} event {fields}; saw {self.events}, {self.stderr()}"
                )
            if event["event"] == kind and all(event.get(k) == v for k, v in fields.items()):
                return event

    def finish(self, timeout: float = 60) -> int:
        while self.next_event() is not None:
            pass
        code = self.proc.wait(timeout)
        self.elapsed = time.monotonic() - self.started
        return code

    def stderr(self) -> str:
        assert self.proc.stderr is not None
        if self.proc.poll() is None:
            return "(still running)"
        return self.proc.stderr.read()

    def kinds(self, kind: str) -> list[dict[str, Any]]:
        return [event for event in self.events if event["event"] == kind]


@contextmanager
def rollout(*args: str) -> Iterator[Rollout]:
    running = Rollout(*args)
    try:
        yield running
    finally:
        if running.proc.poll() is None:
            running.proc.kill()
        running.proc.wait()
        for pipe in (running.proc.stdout, running.proc.stderr):
            if pipe is not None:
                pipe.close()


def at(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(event["time"].replace("Z", "+00:00")).timestamp()


def reported_weights(admin_url: str) -> dict[str, int]:
    status = client.request(admin_url + "/api/v1/status").json()
    return {backend["name"]: backend["weight"] for backend in status["backends"]}


def file_weights(path: Path) -> dict[str, int]:
    result = run_tdproxy("weights", "--config", str(path))
    assert result.returncode == 0, result.stderr
    found = {}
    for line in result.stdout.splitlines():
        name, _, weight = line.split()[:3]
        found[name] = int(weight)
    return found


@pytest.fixture
def pair(backend_factory: BackendFactory) -> tuple[BackendProcess, BackendProcess]:
    return backend_factory("blue"), backend_factory("green")


@pytest.fixture
def proxy(pair: tuple[BackendProcess, BackendProcess], proxy_factory: ProxyFactory) -> ProxyProcess:
    blue, green = pair
    return proxy_factory(config_text(blue, green), wait_admin=True)


def test_a_healthy_rollout_reaches_100_in_steps_times_interval(proxy: ProxyProcess) -> None:
    original = proxy.config_path.read_text()
    interval = 2.5
    with (
        Traffic([proxy.url]),
        rollout(
            "--to",
            "green",
            "--steps",
            "5,25,50,100",
            "--interval",
            f"{interval}s",
            "--min-requests",
            "3",
            "--config",
            str(proxy.config_path),
        ) as running,
    ):
        code = running.finish()
    assert code == 0, (running.events, running.stderr())
    judged = running.kinds("judged")
    assert [(e["step"], e["result"]) for e in judged] == [
        (1, "ok"),
        (2, "ok"),
        (3, "ok"),
        (4, "ok"),
    ]
    assert all(e["requests"] >= 3 and e["errors"] == 0 for e in judged)
    assert [e["weights"]["green"] for e in running.kinds("applied")] == [5, 25, 50, 100]
    # steps x interval, a second per step either way
    first, verdict = running.kinds("written")[0], running.kinds("verdict")[0]
    assert verdict["result"] == "promoted"
    took = at(verdict) - at(first)
    assert 4 * interval - 4 <= took <= 4 * interval + 4, took
    # only the weight values changed; comments and layout kept
    expected = original.replace("weight: 100\n", "weight: 0\n", 1).replace(
        "weight: 0          # not live yet", "weight: 100          # not live yet"
    )
    assert proxy.config_path.read_text() == expected
    assert reported_weights(proxy.admin_url) == PROMOTED
    assert _change_triggers(proxy)[:4] == ["file"] * 4
    assert client.metric(proxy.admin_url, "tdproxy_config_generation") == 5  # start + 4 steps


def _change_triggers(proxy: ProxyProcess) -> list[str]:
    changes = client.request(proxy.admin_url + "/api/v1/changes").json()["changes"]
    return [change["trigger"] for change in changes if change["kind"] == "config"]


def test_errors_at_the_second_step_roll_back_within_one_interval(
    proxy: ProxyProcess, pair: tuple[BackendProcess, BackendProcess]
) -> None:
    _, green = pair
    original = proxy.config_path.read_text()
    interval = 4.0
    with (
        Traffic([proxy.url]),
        rollout(
            "--to",
            "green",
            "--steps",
            "5,25,50,100",
            "--interval",
            f"{interval}s",
            "--min-requests",
            "10",
            "--max-error-rate",
            "0.01",
            "--config",
            str(proxy.config_path),
        ) as running,
    ):
        running.until("judged", step=1, result="ok")
        green.set_faults(fail_every=20)  # 5 % of green's answers are 500 from now on
        written = running.until("written", step=2)
        rollback = running.until("rollback")
        code = running.finish()
    assert code == 3, (running.events, running.stderr())
    assert at(rollback) - at(written) <= interval
    failed = running.kinds("judged")[-1]
    assert failed["step"] == 2 and failed["result"] == "failed"
    assert "error rate" in failed["reason"] and failed["errors"] >= 1
    assert running.kinds("rolled_back")[0]["confirmed"] is True
    assert proxy.config_path.read_text() == original
    assert reported_weights(proxy.admin_url) == ORIGINAL
    assert running.kinds("verdict")[0]["result"] == "rolled_back"


def test_a_p99_over_the_limit_rolls_back(
    proxy: ProxyProcess, pair: tuple[BackendProcess, BackendProcess]
) -> None:
    _, green = pair
    green.set_faults(delay_ms=300)
    with (
        Traffic([proxy.url], threads=6),
        rollout(
            "--to",
            "green",
            "--steps",
            "10,100",
            "--interval",
            "3s",
            "--min-requests",
            "3",
            "--max-p99",
            "200ms",
            "--config",
            str(proxy.config_path),
        ) as running,
    ):
        code = running.finish()
    assert code == 3, (running.events, running.stderr())
    failed = running.kinds("judged")[-1]
    assert failed["step"] == 1 and failed["result"] == "failed"
    assert failed["reason"].startswith("p99") and failed["p99_seconds"] > 0.2
    assert file_weights(proxy.config_path) == ORIGINAL
    assert reported_weights(proxy.admin_url) == ORIGINAL


def test_too_little_traffic_extends_three_times_then_rolls_back(proxy: ProxyProcess) -> None:
    with rollout(
        "--to",
        "green",
        "--steps",
        "50,100",
        "--interval",
        "1s",
        "--min-requests",
        "1000",
        "--config",
        str(proxy.config_path),
    ) as running:
        code = running.finish()
    assert code == 3, (running.events, running.stderr())
    results = [e["result"] for e in running.kinds("judged")]
    assert results == ["extended", "extended", "extended", "failed"]
    assert "not enough traffic to judge" in running.kinds("judged")[-1]["reason"]
    assert file_weights(proxy.config_path) == ORIGINAL
    assert reported_weights(proxy.admin_url) == ORIGINAL


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_rolls_back(proxy: ProxyProcess, signum: int, code: int) -> None:
    with (
        Traffic([proxy.url], threads=1, rate=20),
        rollout(
            "--to",
            "green",
            "--steps",
            "25,100",
            "--interval",
            "60s",
            "--config",
            str(proxy.config_path),
        ) as running,
    ):
        running.until("applied", step=1)
        assert reported_weights(proxy.admin_url)["green"] == 25
        running.proc.send_signal(signum)
        assert running.finish() == code, running.events
    verdict = running.kinds("verdict")[0]
    assert verdict["result"] == "interrupted" and verdict["exit"] == code
    assert signal.Signals(signum).name in verdict["reason"]
    assert running.kinds("rolled_back")[0]["confirmed"] is True
    assert file_weights(proxy.config_path) == ORIGINAL
    assert reported_weights(proxy.admin_url) == ORIGINAL


_LISTEN = re.compile(r"entrypoint listening on (http://\S+)")
_ADMIN = re.compile(r"admin server on (http://\S+) ")


@contextmanager
def replica(path: Path, tmp_path: Path, name: str) -> Iterator[tuple[str, str]]:
    """``tdproxy run --config PATH`` with ports chosen at start: (entrypoint url, admin url)."""
    log = tmp_path / f"{name}.stderr.log"
    with log.open("wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tdproxy", "run", "--config", str(path)],
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
        try:

            def urls() -> tuple[str, str] | None:
                assert proc.poll() is None, log.read_text()
                text = log.read_text()
                entry, admin = _LISTEN.search(text), _ADMIN.search(text)
                return (entry[1], admin[1]) if entry and admin else None

            found = wait_until(urls, 15, message=f"{name} listening")
            yield found
        finally:
            proc.terminate()
            proc.wait(10)


def test_two_proxies_reading_one_file_are_judged_together(
    pair: tuple[BackendProcess, BackendProcess], tmp_path: Path
) -> None:
    blue, green = pair
    path = tmp_path / "shared.yaml"
    path.write_text(CONFIG.format(port=0, admin=0, blue=blue.url, green=green.url))
    with (
        replica(path, tmp_path, "one") as (_, admin_one),
        replica(path, tmp_path, "two") as (
            entry_two,
            admin_two,
        ),
    ):
        # All traffic goes through the second proxy: only summing both judges the steps.
        with (
            Traffic([entry_two]),
            rollout(
                "--to",
                "green",
                "--steps",
                "50,100",
                "--interval",
                "2.5s",
                "--min-requests",
                "5",
                "--config",
                str(path),
                "--admin",
                admin_one,
                "--admin",
                admin_two,
            ) as running,
        ):
            code = running.finish()
        assert code == 0, (running.events, running.stderr())
        assert running.kinds("plan")[0]["proxies"] == [admin_one, admin_two]
        assert set(running.kinds("applied")[0]["generations"]) == {admin_one, admin_two}
        assert all(e["requests"] >= 5 for e in running.kinds("judged"))
        assert reported_weights(admin_one) == PROMOTED == reported_weights(admin_two)
    assert file_weights(path) == PROMOTED


# -- refused before anything is written ----------------------------------------------------------


def _refused(path: Path, *args: str) -> tuple[int, str]:
    before = path.read_bytes()
    result = run_tdproxy("rollout", "--config", str(path), *args)
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir() if p.name.startswith(".")) == []
    return result.returncode, result.stderr


def test_without_a_running_proxy_it_refuses(
    pair: tuple[BackendProcess, BackendProcess], tmp_path: Path
) -> None:
    path = tmp_path / "tdproxy.yaml"
    path.write_text(config_text(*pair))
    code, err = _refused(path, "--to", "green", "--steps", "50,100", "--interval", "1s")
    assert code == 2
    assert "no answer from http://127.0.0.1:" in err and "nothing was written" in err


def test_a_proxy_serving_another_file_is_refused(proxy: ProxyProcess, tmp_path: Path) -> None:
    other = tmp_path / "copy.yaml"
    other.write_text(proxy.config_path.read_text())
    code, err = _refused(other, "--to", "green", "--steps", "50,100", "--interval", "1s")
    assert code == 2
    assert f"serves {proxy.config_path}, not {other}" in err


def test_an_unhealthy_to_backend_is_refused(
    pair: tuple[BackendProcess, BackendProcess], proxy_factory: ProxyFactory
) -> None:
    blue, green = pair
    text = config_text(blue, green).replace(
        "health_check:\n  enabled: false", "health_check:\n  path: /health\n  interval: 1s"
    )
    green.set_health(503)
    proxy = proxy_factory(text, wait_admin=True)
    code, err = _refused(proxy.config_path, "--to", "green", "--steps", "100", "--interval", "1s")
    assert code == 2
    assert "backend green is not healthy at" in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--to", "purple", "--steps", "100"), "unknown backend 'purple'"),
        (("--to", "spare", "--steps", "100"), "backend spare is a backup"),
        (("--to", "green", "--steps", "50,25,100"), "higher than the one before"),
        (("--to", "green", "--steps", "5,50"), "the last step must be 100"),
        (("--to", "green", "--steps", "100", "--max-error-rate", "2"), "between 0 and 1"),
    ],
)
def test_invalid_arguments_exit_2(
    pair: tuple[BackendProcess, BackendProcess], tmp_path: Path, args: tuple[str, ...], message: str
) -> None:
    path = tmp_path / "tdproxy.yaml"
    path.write_text(config_text(*pair))
    code, err = _refused(path, *args, "--interval", "1s")
    assert code == 2
    assert message in err


def test_dry_run_prints_the_plan_without_asking_any_proxy(
    pair: tuple[BackendProcess, BackendProcess], tmp_path: Path
) -> None:
    path = tmp_path / "tdproxy.yaml"
    path.write_text(config_text(*pair))
    before = path.read_bytes()
    result = run_tdproxy(
        "rollout",
        "--to",
        "green",
        "--steps",
        "5,25,50,100",
        "--interval",
        "2m",
        "--dry-run",
        "--config",
        str(path),
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "plan: green from blue, 4 steps of 2m: 8m at least, 32m at most "
        "(a step short of traffic is extended up to 3 times)",
        "  step 1/4  green 5%  blue 95%",
        "  step 2/4  green 25%  blue 75%",
        "  step 3/4  green 50%  blue 50%",
        "  step 4/4  green 100%  blue 0%",
        "dry run: nothing written, no proxy asked",
    ]
    assert path.read_bytes() == before
