"""Backend endpoints as the data plane reaches them: address, TLS client context, connection pool.

The routing layer knows backends by name, weight and the bytes it precomputes for them; how to
reach one is the data plane's business. An :class:`Endpoint` is one ``scheme://host:port`` with
its TLS settings, and holds the pool of idle keep-alive connections to it. :class:`Endpoints`
keeps them across config generations: a reload that keeps a backend's endpoint (name, scheme,
host, port, TLS verification) keeps its pool and TLS context, and retires the others. Preparing
the endpoints of a new config changes nothing until it is committed, so a reload that fails
later loses nothing.
"""

from __future__ import annotations

import ssl

from tdproxy.config.model import Backend, Config
from tdproxy.dataplane.pool import UpstreamPool

EndpointKey = tuple[object, ...]


def endpoint_key(backend: Backend) -> EndpointKey:
    return (backend.name, backend.scheme, backend.host, backend.port, backend.tls_verify)


def tls_client_context(verify: bool) -> ssl.SSLContext:
    context = ssl.create_default_context()
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


class Endpoint:
    """Where one backend is reached, and its idle keep-alive connections."""

    __slots__ = ("host", "key", "pool", "port", "server_hostname", "ssl_context")

    def __init__(self, backend: Backend, max_idle: float) -> None:
        self.key = endpoint_key(backend)
        self.host = backend.host
        self.port = backend.port
        self.ssl_context: ssl.SSLContext | None = None
        self.server_hostname: str | None = None
        if backend.scheme == "https":
            self.ssl_context = tls_client_context(backend.tls_verify)
            self.server_hostname = backend.host
        self.pool = UpstreamPool(self.key, max_idle)

    def __repr__(self) -> str:
        return f"<Endpoint {self.key} idle={len(self.pool)}>"


class EndpointSet:
    """The endpoints one config needs, prepared but not yet in use (see :meth:`commit`)."""

    __slots__ = ("_max_idle", "_owner", "chosen")

    def __init__(self, owner: Endpoints, config: Config) -> None:
        self._owner = owner
        self._max_idle = config.timeouts.upstream_idle
        self.chosen: dict[EndpointKey, Endpoint] = {}

    def for_backend(self, backend: Backend) -> Endpoint:
        key = endpoint_key(backend)
        endpoint = self.chosen.get(key) or self._owner.by_key.get(key)
        if endpoint is None:
            endpoint = Endpoint(backend, self._max_idle)
        self.chosen[key] = endpoint
        return endpoint

    def commit(self) -> None:
        """Make these the endpoints in use; close the pools of the ones no longer needed."""
        owner = self._owner
        retired = [e for key, e in owner.by_key.items() if key not in self.chosen]
        for endpoint in self.chosen.values():
            endpoint.pool.max_idle = self._max_idle  # upstream_idle applies to kept pools too
        owner.by_key = self.chosen
        for endpoint in retired:
            endpoint.pool.close()


class Endpoints:
    """Every endpoint in use, by key; what the router's tables point their targets at."""

    def __init__(self) -> None:
        self.by_key: dict[EndpointKey, Endpoint] = {}

    def prepare(self, config: Config) -> EndpointSet:
        return EndpointSet(self, config)

    def expire_idle(self, now: float) -> None:
        for endpoint in self.by_key.values():
            endpoint.pool.expire(now)

    def close(self) -> None:
        for endpoint in self.by_key.values():
            endpoint.pool.close()

    @property
    def pools(self) -> list[UpstreamPool]:
        return [endpoint.pool for endpoint in self.by_key.values()]
