"""Reloads that go wrong, half-written files and big files, against a real ``tdproxy run``.

- Every failed reload is visible, whatever the cause (here: 5,000 nested ``[``, which made the
  pure-Python YAML parser raise ``RecursionError``, and a file over the 4 MiB cap): counted in
  ``tdproxy_config_reloads_total{result="failure"}``, ``tdproxy_config_last_reload_successful``
  at 0, shown on ``/api/v1/status`` and ``/status``, answered with the reason by
  ``POST /api/v1/reload``, logged for the watcher and for SIGHUP; ``tdproxy check`` exits 2.
- A file rewritten in place with pauses is applied only once it has settled: the half never is.
- A big file is read, parsed and built off the event loop: requests keep being answered while a
  ~3 MB config is reloaded.
"""

from __future__ import annotations

import html
import signal
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.fakes import client
from tests.fakes.client import RawClient
from tests.fakes.process import (
    BackendProcess,
    ProxyFactory,
    ProxyProcess,
    proxy_config,
    run_tdproxy,
    wait_until,
)
from tests.integration.test_reload import wait_reloads

DEEP = "[" * 5000


def assert_failure_shown(proxy: ProxyProcess, failures: int, reason: str) -> None:
    """The failure is in the counters, the gauge, the status JSON and the status page."""
    doc = wait_reloads(proxy, success=0, failure=failures)
    last = doc["last_reload"]
    assert last["ok"] is False
    assert any(reason in error for error in last["errors"]), last
    assert doc["generation"] == 1  # still serving the start-up config
    admin = proxy.admin_url
    assert client.metric(admin, "tdproxy_config_reloads_total", result="failure") == failures
    assert client.metric(admin, "tdproxy_config_last_reload_successful") == 0
    page = client.request(admin + "/status").text
    assert html.escape(reason) in page


def in_place(path: Path, text: str) -> None:
    """Rewrite ``path`` in place (same inode) as ``cat > path`` does."""
    with path.open("r+", encoding="utf-8") as file:
        file.truncate(0)
        file.write(text)


def test_every_kind_of_reload_failure_is_visible(
    blue: BackendProcess, proxy_factory: ProxyFactory
) -> None:
    proxy = proxy_factory(proxy_config([("blue", blue.url, 1)]), wait_admin=True)
    good = proxy.config_path.read_text()
    reason = "exceeded maximum nesting depth"

    # The file watcher.
    proxy.config_path.write_text("backends: " + DEEP + "\n")
    assert_failure_shown(proxy, 1, reason)
    proxy.wait_for_output("reload (file) failed, still serving generation 1", 5)

    # SIGHUP.
    proxy.send_signal(signal.SIGHUP)
    assert_failure_shown(proxy, 2, reason)
    proxy.wait_for_output("reload (signal) failed, still serving generation 1", 5)

    # The API: 422 with the reason, not a generic 500.
    response = client.request(proxy.admin_url + "/api/v1/reload", "POST")
    assert response.status == 422, response.text
    assert any(reason in error for error in response.json()["errors"])
    assert_failure_shown(proxy, 3, reason)

    # Too big: refused before it is parsed.
    proxy.config_path.write_text(good + "#" * (4 * 1024 * 1024) + "\n")
    response = client.request(proxy.admin_url + "/api/v1/reload", "POST")
    assert response.status == 422, response.text
    assert any("larger than 4 MiB" in error for error in response.json()["errors"])

    # Through all of it the start-up config served.
    assert client.request(proxy.url + "/").status == 200
    assert "Traceback" not in proxy.stderr_text()


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("backends: " + DEEP + "\n", "exceeded maximum nesting depth"),
        ("backends:\n  - name: a\n    url: http://a\n    weight: 2001-13-01\n", "month must be"),
        (
            "backends:\n  - name: a\n    url: http://" + "x" * 64 + ".example\n"
            "    host_header: backend\n",
            "cannot build the routing table",
        ),
    ],
    ids=["deep-nesting", "bad-date", "bad-host-label"],
)
def test_check_exits_2_with_the_reason(tmp_path: Path, text: str, reason: str) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    result = run_tdproxy("check", "--config", str(path))
    assert result.returncode == 2, result.stderr
    assert reason in result.stderr
    assert "Traceback" not in result.stderr


# -- half-written files ------------------------------------------------------------------------


def backends_config(
    config: Mapping[str, Any], backends: Mapping[str, BackendProcess], **weights: int
) -> str:
    new = dict(config)
    new["backends"] = [
        {"name": name, "url": backends[name].url, "weight": weight}
        for name, weight in weights.items()
    ]
    return yaml.safe_dump(new, sort_keys=False)


def test_a_file_written_in_pieces_is_applied_only_when_complete(
    blue: BackendProcess, green: BackendProcess, proxy_factory: ProxyFactory
) -> None:
    backends = {"blue": blue, "green": green}
    config = proxy_config([("blue", blue.url, 1), ("green", green.url, 1)])
    proxy = proxy_factory(config, wait_admin=True)
    assert client.request(proxy.url + "/").status == 200
    complete = backends_config(config, backends, blue=2, green=1)
    half = complete[: complete.index("- name: green")]
    assert yaml.safe_load(half)["backends"][0]["name"] == "blue"  # valid alone: green "removed"
    path = proxy.config_path
    # A slow writer: the first half, a pause, the rest; three times over.
    for _ in range(3):
        in_place(path, half)
        time.sleep(0.7)  # the writer's own pause, shorter than the settling time
        with path.open("a", encoding="utf-8") as file:
            file.write(complete[len(half) :])
    written = time.monotonic()
    doc = wait_reloads(proxy, success=1, failure=0)
    applied_after = time.monotonic() - written
    assert [b["weight"] for b in doc["backends"]] == [2, 1]
    assert sum(b["requests"] for b in doc["backends"]) >= 1  # counters carried over
    assert "removed" not in proxy.stderr_text()
    assert applied_after < 2.5, f"applied {applied_after:.2f}s after the last write"


# -- big files, off the event loop --------------------------------------------------------------


class Prober(threading.Thread):
    """Requests one after the other on a keep-alive connection, each timed."""

    def __init__(self, proxy: ProxyProcess) -> None:
        super().__init__(daemon=True)
        self.proxy = proxy
        self.done = threading.Event()
        self.timings: list[tuple[float, float]] = []
        self.errors: list[BaseException] = []

    def run(self) -> None:
        try:
            with RawClient(self.proxy.host, self.proxy.port, timeout=10) as raw:
                while not self.done.is_set():
                    started = time.monotonic()
                    assert raw.request("GET", "/").status == 200
                    self.timings.append((started, time.monotonic()))
        except BaseException as exc:
            self.errors.append(exc)

    def within(self, start: float, end: float) -> list[float]:
        """Latencies of the requests that started and ended between ``start`` and ``end``."""
        return [e - s for s, e in self.timings if s >= start and e <= end]

    def overlapping(self, start: float, end: float) -> list[float]:
        return [e - s for s, e in self.timings if e >= start and s <= end]


def big_config(config: Mapping[str, Any], blue: BackendProcess, fillers: int) -> str:
    """``config`` plus ``fillers`` drained backends and a long comment: about 3 MB."""
    new = dict(config)
    new["backends"] = [{"name": "blue", "url": blue.url, "weight": 1}] + [
        {"name": f"filler-{n}", "url": blue.url, "weight": 0} for n in range(fillers)
    ]
    text = yaml.safe_dump(new, sort_keys=False)
    return text + ("# " + "padding " * 12 + "\n") * ((3_000_000 - len(text)) // 99)


def test_a_big_config_is_parsed_off_the_event_loop(
    blue: BackendProcess, proxy_factory: ProxyFactory
) -> None:
    config = proxy_config([("blue", blue.url, 1)], timeouts={"shutdown_grace": "1s"})
    proxy = proxy_factory(config, wait_admin=True)
    text = big_config(config, blue, 1500)
    assert 2_500_000 < len(text) < 4 * 1024 * 1024
    proxy.config_path.write_text(text)
    prober = Prober(proxy)
    prober.start()
    try:
        wait_until(lambda: len(prober.timings) >= 50, message="requests flowing")
        started = time.monotonic()
        response = client.request(proxy.admin_url + "/api/v1/reload", "POST", timeout=30)
        ended = time.monotonic()
    finally:
        prober.done.set()
        prober.join(10)
    assert prober.errors == []
    assert response.status == 200, response.text
    assert response.json()["generation"] == 2
    served = prober.within(started, ended)
    slowest = max(prober.overlapping(started, ended))
    print(
        f"reload took {ended - started:.3f}s; {len(served)} requests answered meanwhile, "
        f"slowest {slowest * 1000:.1f} ms"
    )
    # The loop kept serving while the file was read, parsed, validated and built.
    assert len(served) >= 5, f"{len(served)} requests during a {ended - started:.2f}s reload"
    assert slowest < 0.5, f"a request took {slowest:.2f}s during the reload"
