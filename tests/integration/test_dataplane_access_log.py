"""The access log: one line per request on stdout, JSON by default, ``combined`` on request,
none at all when disabled.

tdproxy writes log lines in batches a few times a second and once more when it stops, so the
tests wait for the lines to appear (or stop the proxy first) instead of sleeping.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from tests.fakes.client import RawClient
from tests.fakes.process import (
    BackendProcess,
    ProxyProcess,
    proxy_config,
    start_tdproxy,
    wait_until,
)


@pytest.fixture(scope="module")
def backends(blue: BackendProcess, green: BackendProcess) -> tuple[BackendProcess, BackendProcess]:
    return blue, green


def start(
    backends: tuple[BackendProcess, BackendProcess], tmp_path: Path, **access_log: Any
) -> ProxyProcess:
    blue, green = backends
    config = proxy_config([("blue", blue.url, 1), ("green", green.url, 1)])
    if access_log:
        config["access_log"] = access_log
    return start_tdproxy(config, tmp_path)


Sent = list[tuple[str, str, int, str | None]]


def send_mix(proxy: ProxyProcess) -> Sent:
    """Four requests on one connection; returns (method, target, status, X-Backend) for each,
    as the client saw them."""
    sent: Sent = []
    with RawClient(proxy.host, proxy.port) as raw:
        for method, target, body in (
            ("GET", "/echo?x=1", None),
            ("POST", "/upload", b"data"),
            ("GET", "/status/404", None),
            ("HEAD", "/head-test", None),
        ):
            response = raw.request(
                method, target, body=body, headers=[("User-Agent", "access-log-test/1.0")]
            )
            sent.append((method, target, response.status, response.header("X-Backend")))
    return sent


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_json_access_log_has_one_line_per_request(
    backends: tuple[BackendProcess, BackendProcess], tmp_path: Path
) -> None:
    with start(backends, tmp_path) as proxy:
        sent = send_mix(proxy)
        wait_until(  # written while the proxy runs, not only at its stop
            lambda: len(json_lines(proxy.stdout_text())) >= len(sent),
            timeout=5,
            message="an access log line per request",
        )
        proxy.stop()
        entries = json_lines(proxy.stdout_text())
    assert len(entries) == len(sent), entries  # and no more than one line per request
    logged = [(e["method"], e["target"], e["status"], e["backend"]) for e in entries]
    assert logged == sent
    assert {backend for *_, backend in sent} == {"blue", "green"}
    for entry in entries:
        assert entry["remote"] == "127.0.0.1"
        assert entry["user_agent"] == "access-log-test/1.0"


def test_disabled_access_log_prints_nothing(
    backends: tuple[BackendProcess, BackendProcess], tmp_path: Path
) -> None:
    with start(backends, tmp_path, enabled=False) as proxy:
        send_mix(proxy)
        assert proxy.stop() == 0  # the final flush has happened, so nothing is still pending
        assert proxy.stdout_text() == ""


COMBINED = re.compile(
    r"^127\.0\.0\.1 - - \[\d{2}/\w{3}/\d{4}:\d{2}:\d{2}:\d{2} [+-]\d{4}\] "
    r'"(?P<method>[A-Z]+) (?P<target>\S+) HTTP/1\.1" (?P<status>\d{3}) (?P<bytes>\d+) '
    r'"-" "access-log-test/1\.0"'
)


def test_combined_access_log_format(
    backends: tuple[BackendProcess, BackendProcess], tmp_path: Path
) -> None:
    with start(backends, tmp_path, format="combined") as proxy:
        sent = send_mix(proxy)
        proxy.stop()
        lines = proxy.stdout_text().splitlines()
    assert len(lines) == 4, lines
    for line, (method, target, status, backend) in zip(lines, sent, strict=True):
        match = COMBINED.match(line)
        assert match, line
        assert (match["method"], match["target"], int(match["status"])) == (method, target, status)
        assert f" {backend} " in line[match.end() :]


@pytest.mark.parametrize(
    ("raw", "status", "method", "target"),
    [
        # (A field reaches tdproxy once the next one has begun: X-A delivers Host.)
        (
            b"PUT /bad HTTP/1.1\r\nHost: shop.example.test\r\nX-A: 1\r\nBad Header: x\r\n\r\n",
            400,
            "PUT",
            "/bad",
        ),
        (
            b"GET /" + b"l" * 9000 + b" HTTP/1.1\r\nHost: shop.example.test\r\n\r\n",
            414,
            "GET",
            None,
        ),
        (
            b"DELETE /big HTTP/1.1\r\nHost: shop.example.test\r\n"
            + b"".join(b"X-F%d: v\r\n" % n for n in range(150))
            + b"\r\n",
            431,
            "DELETE",
            "/big",
        ),
    ],
)
def test_a_refused_request_is_logged_with_what_was_read(
    backends: tuple[BackendProcess, BackendProcess],
    tmp_path: Path,
    raw: bytes,
    status: int,
    method: str,
    target: str | None,
) -> None:
    proxy = start(backends, tmp_path)
    with RawClient(proxy.host, proxy.port) as client:
        client.send(raw)
        assert client.read_response().status == status

    def logged() -> dict[str, Any] | None:
        for line in proxy.stdout_text().splitlines():
            entry: dict[str, Any] = json.loads(line)
            if entry["status"] == status:
                return entry
        return None

    entry = wait_until(logged, timeout=5, message=f"the access-log line of the {status}")
    proxy.stop()
    assert entry["method"] == method
    assert entry["version"] == "1.1" or status == 414  # a 414 stops before the version
    assert entry["backend"] is None
    if status != 414:  # the target was read whole, and the Host field before the refusal
        assert (entry["target"], entry["host"]) == (target, "shop.example.test")
