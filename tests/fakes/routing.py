"""A router for tests that need routing tables but no running data plane."""

from __future__ import annotations

from typing import Any

from tdproxy.config.model import Config
from tdproxy.dataplane.endpoints import Endpoints
from tdproxy.routing.router import Router


def new_router(config: Config, **kwargs: Any) -> Router:
    """``Router(config, Endpoints(), **kwargs)``; the endpoints are ``router.endpoints``."""
    return Router(config, Endpoints(), **kwargs)
