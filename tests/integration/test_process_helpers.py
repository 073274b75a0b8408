"""The process and waiting helpers that every integration test leans on."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import yaml

from tests.fakes.client import request
from tests.fakes.process import (
    LOCALHOST,
    BackendFactory,
    ProcessFailed,
    ProxyFactory,
    async_wait_until,
    deep_merge,
    free_port,
    proxy_config,
    wait_for_port,
    wait_until,
)


def test_free_ports_are_distinct_and_bindable() -> None:
    ports = {free_port() for _ in range(20)}
    assert len(ports) == 20
    with socket.socket() as sock:
        sock.bind((LOCALHOST, ports.pop()))


def test_wait_until_returns_the_first_truthy_result() -> None:
    calls: list[int] = []

    def third_time() -> int:
        calls.append(1)
        return len(calls) if len(calls) >= 3 else 0

    assert wait_until(third_time, timeout=5, interval=0.001) == 3


def test_wait_until_times_out_naming_the_condition_and_last_result() -> None:
    with pytest.raises(TimeoutError, match=r"the sky falls not met .* \(last result: False\)"):
        wait_until(lambda: False, timeout=0.05, message="the sky falls")


def test_wait_until_can_treat_exceptions_as_not_yet() -> None:
    attempts: list[int] = []

    def flaky() -> bool:
        attempts.append(1)
        if len(attempts) < 3:
            raise ConnectionRefusedError
        return True

    assert wait_until(flaky, timeout=5, interval=0.001, ignore=(ConnectionError,))
    with pytest.raises(ZeroDivisionError):
        wait_until(lambda: 1 / 0, timeout=5, ignore=(ConnectionError,))


async def test_async_wait_until_awaits_coroutine_predicates() -> None:
    results = iter([0, 0, 7])

    async def next_result() -> int:
        return next(results)

    assert await async_wait_until(next_result, timeout=5, interval=0.001) == 7


def test_wait_for_port_fails_fast_when_the_process_is_gone() -> None:
    port = free_port()  # nothing listens here
    with pytest.raises(ProcessFailed):
        wait_for_port(LOCALHOST, port, timeout=30, alive=lambda: False)
    with pytest.raises(TimeoutError):
        wait_for_port(LOCALHOST, port, timeout=0.1)


def test_proxy_config_defaults_and_deep_merged_overrides() -> None:
    config = proxy_config(
        [
            ("blue", "http://127.0.0.1:1", 70),
            {"name": "green", "url": "http://h:2", "backup": True},
        ],
        routing={"method": "sticky", "sticky": {"cookie": "S"}},
        timeouts={"connect": "1s"},
    )
    assert config["entrypoint"]["address"] == config["admin"]["address"] == LOCALHOST
    assert config["entrypoint"]["port"] != config["admin"]["port"]
    assert config["backends"] == [
        {"name": "blue", "url": "http://127.0.0.1:1", "weight": 70},
        {"name": "green", "url": "http://h:2", "backup": True},
    ]
    assert config["health_check"] == {"enabled": False}
    assert config["routing"] == {"method": "sticky", "sticky": {"cookie": "S"}}
    assert config["timeouts"] == {"connect": "1s"}
    assert yaml.safe_load(yaml.safe_dump(config)) == config


def test_deep_merge_merges_mappings_and_replaces_the_rest() -> None:
    base = {"a": {"b": 1, "c": [1]}, "d": 1}
    assert deep_merge(base, {"a": {"c": [2]}, "e": 3}) == {"a": {"b": 1, "c": [2]}, "d": 1, "e": 3}
    assert base == {"a": {"b": 1, "c": [1]}, "d": 1}  # not modified


def test_start_tdproxy_reports_a_proxy_that_exits(
    proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    config = proxy_config([("blue", "http://127.0.0.1:1", 1)], no_such_key=True)
    with pytest.raises(ProcessFailed, match="--- stderr ---") as failure:
        proxy_factory(config)
    assert "exit code" in str(failure.value)
    assert (tmp_path / "tdproxy.yaml").exists()
    assert (tmp_path / "tdproxy.stderr.log").exists()


def test_start_tdproxy_runs_a_proxy_until_sigterm(
    backend_factory: BackendFactory, proxy_factory: ProxyFactory
) -> None:
    blue = backend_factory("blue")
    proxy = proxy_factory(proxy_config([("blue", blue.url, 1)]))
    response = request(proxy.url + "/", headers=[("X-Request-Id", "through-the-proxy")])
    assert response.header("X-Backend") == "blue"
    assert blue.saw_request_id("through-the-proxy")
    proxy.terminate()
    assert proxy.wait(timeout=10) == 0
    assert not proxy.running
