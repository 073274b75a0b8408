"""The admin server under abuse and misconfiguration, against a real ``tdproxy run``.

- Connections that never finish a request head are closed after a deadline, and no more than a
  fixed number of admin connections are held at once.
- An admin server on a non-loopback address without a token is warned about at start.
- An empty admin token is refused (it would be matched by a bare ``Authorization: Bearer``).
- Credentials written into a backend url never show up in errors, logs or status output.
"""

from __future__ import annotations

import selectors
import socket
import time
from pathlib import Path

import yaml

from tests.fakes import client
from tests.fakes.process import (
    LOCALHOST,
    BackendProcess,
    ProxyFactory,
    proxy_config,
    run_tdproxy,
    wait_until,
)

HEAD_TIMEOUT = 10.0  # tdproxy.controlplane.admin.HEAD_TIMEOUT
MAX_CONNECTIONS = 256  # tdproxy.controlplane.admin.MAX_CONNECTIONS
PARTIAL_HEAD = b"GET /status HTTP/1.1\r\nHost: admin\r\nX-Slow: "


def closed_within(sockets: list[socket.socket], timeout: float) -> dict[int, float]:
    """Seconds after which the server closed each socket (by index); unclosed ones are left out."""
    started = time.monotonic()
    closed: dict[int, float] = {}
    with selectors.DefaultSelector() as selector:
        for index, sock in enumerate(sockets):
            selector.register(sock, selectors.EVENT_READ, index)
        while len(closed) < len(sockets):
            remaining = started + timeout - time.monotonic()
            if remaining <= 0:
                break
            for key, _ in selector.select(remaining):
                try:
                    data = key.fileobj.recv(4096)  # type: ignore[union-attr]
                except OSError:
                    data = b""
                if not data:
                    closed[key.data] = time.monotonic() - started
                    selector.unregister(key.fileobj)
    return closed


def test_unfinished_heads_are_bounded_in_time_and_number(
    blue: BackendProcess, proxy_factory: ProxyFactory
) -> None:
    proxy = proxy_factory(proxy_config([("blue", blue.url, 1)]), wait_admin=True)
    sockets = []
    try:
        for _ in range(MAX_CONNECTIONS + 44):
            sock = socket.create_connection((proxy.admin_host, proxy.admin_port), timeout=5)
            sock.sendall(PARTIAL_HEAD)
            sockets.append(sock)
        opened = time.monotonic()
        closed = closed_within(sockets, HEAD_TIMEOUT + 5)
        # Past the cap: closed as soon as accepted. The rest: at the head deadline.
        early = [delay for delay in closed.values() if delay < HEAD_TIMEOUT / 2]
        assert 44 <= len(early) <= 54, sorted(closed.values())[:60]  # the cap held the rest
        assert len(closed) == len(sockets), f"{len(sockets) - len(closed)} still open"
        assert time.monotonic() - opened < HEAD_TIMEOUT + 5
    finally:
        for sock in sockets:
            sock.close()
    assert client.request(proxy.admin_url + "/healthz").status == 200
    assert "admin server: 256 connections open, closing new ones" in proxy.stderr_text()


def test_an_admin_server_open_to_the_network_without_a_token_is_warned_about(
    blue: BackendProcess, proxy_factory: ProxyFactory
) -> None:
    config = proxy_config([("blue", blue.url, 1)])
    config["admin"]["address"] = "0.0.0.0"
    proxy = proxy_factory(config, wait_admin=True)
    warning = proxy.wait_for_output("without a token: anyone who can reach it", 5)
    assert "WARNING" in warning and "0.0.0.0" in warning
    # With a token, or on loopback, nothing to warn about.
    config = proxy_config([("blue", blue.url, 1)])
    config["admin"].update(address="0.0.0.0", token="s3cret")
    guarded = proxy_factory(config, wait_admin=True)
    local = proxy_factory(proxy_config([("blue", blue.url, 1)]), wait_admin=True)
    for quiet in (guarded, local):
        quiet.wait_for_output("admin server on", 5)
        assert "without a token" not in quiet.stderr_text()


def test_an_empty_admin_token_is_refused_at_start(blue: BackendProcess, tmp_path: Path) -> None:
    config = proxy_config([("blue", blue.url, 1)])
    config["admin"]["token"] = ""
    path = tmp_path / "empty-token.yaml"
    path.write_text(yaml.safe_dump(config))
    result = run_tdproxy("run", "--config", str(path), timeout=20)
    assert result.returncode == 2
    assert "admin.token: must not be empty or blank" in result.stderr


def test_credentials_in_a_rejected_backend_url_are_never_shown(
    blue: BackendProcess, proxy_factory: ProxyFactory
) -> None:
    config = proxy_config([("blue", blue.url, 1)])
    proxy = proxy_factory(config, wait_admin=True)
    secret = "pa55w0rd-do-not-print"
    leaky = dict(config)
    leaky["backends"] = [
        {"name": "blue", "url": blue.url},
        {"name": "green", "url": f"http://deploy:{secret}@{LOCALHOST}:9"},
    ]
    proxy.write_config(leaky)
    response = client.request(proxy.admin_url + "/api/v1/reload", "POST")
    assert response.status == 422
    assert any("must not carry credentials" in error for error in response.json()["errors"])
    wait_until(
        lambda: "must not carry credentials" in proxy.stderr_text(),
        message="the refusal logged",
    )
    shown = [
        response.text,
        client.request(proxy.admin_url + "/api/v1/status").text,
        client.request(proxy.admin_url + "/status").text,
        proxy.stderr_text(),
    ]
    for text in shown:
        assert secret not in text
    assert "http://***@127.0.0.1:9" in response.text
