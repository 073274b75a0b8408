"""Fixtures shared by every test: fake backends and tdproxy processes that always get cleaned up."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.fakes.process import (
    LOCALHOST,
    BackendFactory,
    BackendProcess,
    ProxyFactory,
    ProxyProcess,
    start_backend,
    start_tdproxy,
)


@pytest.fixture
def backend_factory() -> Iterator[BackendFactory]:
    """``backend_factory("blue", **flags) -> BackendProcess``; every backend is stopped after."""
    started: list[BackendProcess] = []

    def start(
        name: str = "backend", *, host: str = LOCALHOST, port: int = 0, **flags: Any
    ) -> BackendProcess:
        backend = start_backend(name, host=host, port=port, **flags)
        started.append(backend)
        return backend

    try:
        yield start
    finally:
        for backend in reversed(started):
            backend.stop()


@pytest.fixture
def proxy_factory(tmp_path: Path) -> Iterator[ProxyFactory]:
    """``proxy_factory(config) -> ProxyProcess`` (config dict or YAML text); every proxy is stopped
    after, and its captured output printed (pytest shows it when the test fails).
    """
    started: list[ProxyProcess] = []

    def start(
        config: Mapping[str, Any] | str,
        *,
        timeout: float = 15.0,
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        wait_admin: bool = False,
    ) -> ProxyProcess:
        proxy = start_tdproxy(
            config, tmp_path, timeout=timeout, args=args, env=env, wait_admin=wait_admin
        )
        started.append(proxy)
        return proxy

    try:
        yield start
    finally:
        for proxy in reversed(started):
            code = proxy.stop()
            print(f"--- {proxy!r} exited {code}; stderr ---\n{proxy.stderr_text()}")
            print(f"--- {proxy!r} stdout ---\n{proxy.stdout_text()}")
