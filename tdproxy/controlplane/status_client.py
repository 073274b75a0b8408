"""Ask a running tdproxy's admin server for its status: used by ``tdproxy weights`` to tell
whether the proxy has applied a changed file.

GET endpoints need no token (see :mod:`.admin`), so none is sent. Everything blocks with short
timeouts: this runs in the command line tool, never inside the proxy.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from typing import Any

from tdproxy.config.model import Admin

WAIT_SECONDS = 5.0  # how long `tdproxy weights set` waits for the proxy to apply the file
POLL_SECONDS = 0.1

# The admin server is a direct neighbour: never go through an http_proxy from the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))

_LOOPBACK = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}


def status_url(admin: Admin) -> str | None:
    """Where the admin server of a config answers, or ``None`` when its port is chosen at start."""
    if admin.port == 0:
        return None
    host = _LOOPBACK.get(admin.address, admin.address)
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{admin.port}/api/v1/status"


def fetch_status(url: str, timeout: float = 1.0) -> dict[str, Any] | None:
    """The status document, or ``None`` when nothing answers there as a tdproxy would."""
    try:
        with _OPENER.open(url, timeout=timeout) as response:
            document = json.loads(response.read())
    except (OSError, ValueError):  # refused, timed out, an HTTP error, not JSON
        return None
    if not isinstance(document, dict) or not isinstance(document.get("generation"), int):
        return None
    return document


def reports(document: Mapping[str, Any], after: int, weights: Mapping[str, int]) -> bool:
    """The status shows a generation newer than ``after`` with exactly these weights."""
    backends = document.get("backends") or []
    seen = {b.get("name"): b.get("weight") for b in backends if isinstance(b, dict)}
    return int(document.get("generation", 0)) > after and seen == dict(weights)


def wait_for_weights(
    url: str,
    after: int,
    weights: Mapping[str, int],
    timeout: float = WAIT_SECONDS,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, Any] | None:
    """Poll until the proxy reports ``weights`` in a generation after ``after``; the status
    then, or ``None`` if it did not within ``timeout`` seconds."""
    deadline = clock() + timeout
    while True:
        document = fetch_status(url)
        if document is not None and reports(document, after, weights):
            return document
        if clock() >= deadline:
            return None
        sleep(POLL_SECONDS)
