"""Signals at any moment of a process's life: start-up, serving, and the graceful drain.

tdproxy handles SIGTERM, SIGINT and SIGHUP from before it starts anything until it exits:

- during start-up (here: an initial health round held up by a backend whose ``/health`` hangs)
  SIGTERM and SIGINT stop it cleanly with exit code 0, and SIGHUP is kept until it has started;
- during the drain a second SIGTERM/SIGINT and a SIGHUP are logged and ignored, so the request
  in flight still completes and the exit code is 0.

No traceback ever reaches stderr. Each test starts its own proxy (each one ends it) and acts on
conditions it observes, never after a fixed sleep.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.fakes import client
from tests.fakes.client import RawClient
from tests.fakes.process import (
    REPO_ROOT,
    BackendFactory,
    BackendProcess,
    ProxyFactory,
    ProxyProcess,
    port_is_open,
    proxy_config,
    wait_until,
)

HEALTH_TIMEOUT = 8.0  # the start-up round would take this long: every wait below is shorter
PROMPTLY = 4.0

Launch = Callable[[Mapping[str, Any]], ProxyProcess]


@pytest.fixture
def launch(tmp_path: Path) -> Iterator[Launch]:
    """Start ``tdproxy run`` and return at once (``start_tdproxy`` waits until it serves)."""
    started: list[ProxyProcess] = []

    def start(config: Mapping[str, Any]) -> ProxyProcess:
        number = len(started) + 1
        config_path = tmp_path / f"launched-{number}.yaml"
        config_path.write_text(yaml.safe_dump(dict(config), sort_keys=False))
        stdout_path = tmp_path / f"launched-{number}.stdout.log"
        stderr_path = tmp_path / f"launched-{number}.stderr.log"
        stdout, stderr = stdout_path.open("wb"), stderr_path.open("wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "tdproxy", "run", "--config", str(config_path)],
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
        )
        proxy = ProxyProcess(proc, config, config_path, stdout_path, stderr_path, [stdout, stderr])
        started.append(proxy)
        return proxy

    try:
        yield start
    finally:
        for proxy in started:
            code = proxy.stop()
            print(f"--- {proxy!r} exited {code}; stderr ---\n{proxy.stderr_text()}")


@pytest.fixture
def hanging(backend_factory: BackendFactory) -> BackendProcess:
    """A backend whose ``/health`` never answers: the start-up round waits for the timeout."""
    backend = backend_factory("hanging")
    backend.set_health(hang=True)
    return backend


def starting_proxy(launch: Launch, backend: BackendProcess) -> ProxyProcess:
    """A proxy held in its initial health round (the backend has seen the check)."""
    config = proxy_config(
        [("hanging", backend.url, 1)],
        health_check={"enabled": True, "path": "/health", "timeout": f"{HEALTH_TIMEOUT:g}s"},
    )
    proxy = launch(config)
    wait_until(
        lambda: backend.stats()["requests_by_path"].get("/health", 0) >= 1,
        timeout=10,
        message="the initial health check reached the backend",
    )
    assert proxy.running
    assert not port_is_open(proxy.host, proxy.port)  # still starting: not serving yet
    return proxy


def assert_clean(proxy: ProxyProcess) -> None:
    stderr = proxy.stderr_text()
    assert "Traceback" not in stderr, stderr


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_signal_during_start_up_exits_0_at_once(
    launch: Launch, hanging: BackendProcess, signum: int
) -> None:
    proxy = starting_proxy(launch, hanging)
    proxy.send_signal(signum)
    assert proxy.wait(timeout=PROMPTLY) == 0  # not after the health round's 8 s
    assert_clean(proxy)
    assert f"{signal.Signals(signum).name} during start-up: stopping" in proxy.stderr_text()


def test_sighup_during_start_up_is_applied_once_started(
    launch: Launch, hanging: BackendProcess
) -> None:
    proxy = starting_proxy(launch, hanging)
    proxy.send_signal(signal.SIGHUP)
    proxy.wait_for_output("SIGHUP during start-up: reload deferred until started", PROMPTLY)
    assert proxy.running
    hanging.set_health(hang=False)  # only the running checks see this; the first one timed out
    wait_until(
        lambda: port_is_open(proxy.host, proxy.port),
        timeout=HEALTH_TIMEOUT + 5,
        message="started after the health round",
    )
    proxy.wait_for_output("reload (signal): configuration unchanged", 5)
    status = client.request(proxy.admin_url + "/api/v1/status").json()
    assert status["reloads"] == {"success": 1, "failure": 0}
    assert proxy.running
    proxy.terminate()
    assert proxy.wait(timeout=10) == 0
    assert_clean(proxy)


def test_a_second_stop_signal_and_sighup_during_the_drain_are_ignored(
    blue: BackendProcess, proxy_factory: ProxyFactory
) -> None:
    proxy = proxy_factory(proxy_config([("blue", blue.url, 1)], timeouts={"shutdown_grace": "20s"}))
    blue.reset_stats()
    with RawClient(proxy.host, proxy.port) as raw:
        raw.send_request("GET", "/slow?ms=2500")
        wait_until(
            lambda: blue.stats()["requests_by_path"].get("/slow", 0) >= 1,
            timeout=5,
            message="the slow request reached the backend",
        )
        proxy.terminate()
        proxy.wait_for_output("stopping: draining connections", PROMPTLY)
        for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            proxy.send_signal(signum)
            proxy.wait_for_output(f"{signal.Signals(signum).name} while stopping", PROMPTLY)
        assert proxy.running  # still draining
        response = raw.read_response()
        assert response.status == 200
        assert response.body == b"hello from blue\n"
    assert proxy.wait(timeout=10) == 0
    assert_clean(proxy)
