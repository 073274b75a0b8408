"""Weighted splitting through a real tdproxy process: smooth weighted round robin, end to end.

DESIGN.md: at 70/30 every 10 consecutive requests hold exactly 7 and 3, 50/50 alternates
strictly, weight 0 gets no traffic, weights are relative and N backends are allowed. The backend
that answered is read from the fake backend's ``X-Backend`` response header, and cross-checked
against each backend's own request counter.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable, Iterator

import pytest

from tests.fakes.client import RawClient
from tests.fakes.process import (
    BackendProcess,
    ProxyFactory,
    ProxyProcess,
    proxy_config,
    start_backend,
)

NAMES = ("blue", "green", "red")
StartProxy = Callable[..., ProxyProcess]


@pytest.fixture(scope="module")
def backends() -> Iterator[dict[str, BackendProcess]]:
    started: dict[str, BackendProcess] = {}
    try:
        for name in NAMES:
            started[name] = start_backend(name)
        yield started
    finally:
        for backend in started.values():
            backend.stop()


@pytest.fixture
def weighted_proxy(backends: dict[str, BackendProcess], proxy_factory: ProxyFactory) -> StartProxy:
    """``weighted_proxy(blue=70, green=30)``: a fresh tdproxy (fresh rotation) over those
    backends; the backends' counters are zeroed first."""

    def start(**weights: int) -> ProxyProcess:
        for backend in backends.values():
            backend.reset_stats()
        specs = [(name, backends[name].url, weight) for name, weight in weights.items()]
        return proxy_factory(proxy_config(specs))

    return start


def backend_sequence(proxy: ProxyProcess, count: int) -> list[str]:
    """Which backend answered each of ``count`` GETs sent one after another on one connection."""
    sequence = []
    with RawClient(proxy.host, proxy.port) as client:
        for number in range(count):
            response = client.request("GET", f"/?n={number}")
            assert response.status == 200
            name = response.header("X-Backend")
            assert name is not None
            assert response.body == f"hello from {name}\n".encode()
            sequence.append(name)
    return sequence


def windows(sequence: list[str], size: int) -> Iterator[Counter[str]]:
    """The counts in every run of ``size`` consecutive items (sliding, not only aligned)."""
    for start in range(len(sequence) - size + 1):
        yield Counter(sequence[start : start + size])


def served(backends: dict[str, BackendProcess], name: str) -> int:
    return int(backends[name].stats()["requests_total"])


def test_70_30_is_exact_over_100_and_in_every_window_of_10(
    weighted_proxy: StartProxy, backends: dict[str, BackendProcess]
) -> None:
    proxy = weighted_proxy(blue=70, green=30)
    sequence = backend_sequence(proxy, 100)
    assert Counter(sequence) == {"blue": 70, "green": 30}
    for position, window in enumerate(windows(sequence, 10)):
        assert window == {"blue": 7, "green": 3}, (position, sequence)
    assert (served(backends, "blue"), served(backends, "green")) == (70, 30)


def test_50_50_alternates_strictly(weighted_proxy: StartProxy) -> None:
    proxy = weighted_proxy(blue=50, green=50)
    sequence = backend_sequence(proxy, 40)
    assert all(a != b for a, b in itertools.pairwise(sequence)), sequence
    assert Counter(sequence) == {"blue": 20, "green": 20}


def test_weights_are_relative(weighted_proxy: StartProxy) -> None:
    """7/3 splits exactly like 70/30."""
    proxy = weighted_proxy(blue=7, green=3)
    sequence = backend_sequence(proxy, 30)
    for window in windows(sequence, 10):
        assert window == {"blue": 7, "green": 3}, sequence


def test_weight_zero_gets_no_traffic(
    weighted_proxy: StartProxy, backends: dict[str, BackendProcess]
) -> None:
    proxy = weighted_proxy(blue=1, green=0, red=1)
    sequence = backend_sequence(proxy, 30)
    assert Counter(sequence) == {"blue": 15, "red": 15}
    assert served(backends, "green") == 0


def test_three_backends_split_5_3_2_in_every_window_of_10(
    weighted_proxy: StartProxy, backends: dict[str, BackendProcess]
) -> None:
    proxy = weighted_proxy(blue=5, green=3, red=2)
    sequence = backend_sequence(proxy, 100)
    assert Counter(sequence) == {"blue": 50, "green": 30, "red": 20}
    for window in windows(sequence, 10):
        assert window == {"blue": 5, "green": 3, "red": 2}, sequence
    assert [served(backends, name) for name in NAMES] == [50, 30, 20]


def test_the_rotation_is_shared_by_all_client_connections(weighted_proxy: StartProxy) -> None:
    """One request per new connection still follows the one weighted rotation."""
    proxy = weighted_proxy(blue=70, green=30)
    sequence = []
    for number in range(50):
        with RawClient(proxy.host, proxy.port) as client:
            response = client.request("GET", f"/?n={number}", headers=[("Connection", "close")])
            assert response.status == 200
            sequence.append(response.header("X-Backend") or "?")
    assert Counter(sequence) == {"blue": 35, "green": 15}
    for window in windows(sequence, 10):
        assert window == {"blue": 7, "green": 3}, sequence
