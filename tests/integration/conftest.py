"""Fixtures shared by the integration modules.

``blue`` and ``green`` are module-scoped: each test module gets backends of its own, so their
counters see only that module's traffic. ``client`` connects to whatever ``proxy`` fixture the
requesting module defines.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.fakes.client import RawClient
from tests.fakes.process import BackendProcess, ProxyProcess, start_backend


@pytest.fixture(scope="module")
def blue() -> Iterator[BackendProcess]:
    with start_backend("blue") as backend:
        yield backend


@pytest.fixture(scope="module")
def green() -> Iterator[BackendProcess]:
    with start_backend("green") as backend:
        yield backend


@pytest.fixture
def client(proxy: ProxyProcess) -> Iterator[RawClient]:
    """A raw connection to the requesting module's ``proxy``."""
    with RawClient(proxy.host, proxy.port) as raw:
        yield raw
