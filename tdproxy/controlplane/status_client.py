"""Ask a running tdproxy's admin server for its status and metrics: used by ``tdproxy weights``
to tell whether the proxy has applied a changed file, and by ``tdproxy rollout`` to judge a step.

GET endpoints need no token (see :mod:`.admin`); a token given here is sent anyway, as a bearer
token, for an admin server behind a guard that asks for one on every request. Everything blocks
with short timeouts: this runs in the command line tool, never inside the proxy.
"""

from __future__ import annotations

import http.client
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


STATUS_PATH = "/api/v1/status"
METRICS_PATH = "/metrics"
MAX_ANSWER_BYTES = 16 * 1024 * 1024  # a status document or scrape bigger than this is refused


def admin_url(admin: Admin) -> str | None:
    """The base url of a config's admin server, or ``None`` when its port is chosen at start."""
    if admin.port == 0:
        return None
    host = _LOOPBACK.get(admin.address, admin.address)
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{admin.port}"


def status_url(admin: Admin) -> str | None:
    """Where the admin server of a config answers, or ``None`` when its port is chosen at start."""
    base = admin_url(admin)
    return None if base is None else base + STATUS_PATH


def fetch(url: str, timeout: float = 1.0, token: str | None = None) -> bytes:
    """The body of a GET to ``url``; ``OSError`` when it fails (refused, timed out, not 200)."""
    request = urllib.request.Request(url)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with _OPENER.open(request, timeout=timeout) as response:
            body: bytes = response.read(MAX_ANSWER_BYTES + 1)
    except http.client.HTTPException as exc:  # a broken answer: IncompleteRead, BadStatusLine
        raise OSError(f"broken answer from {url}: {exc!r}") from None
    if len(body) > MAX_ANSWER_BYTES:
        raise OSError(f"the answer from {url} is larger than {MAX_ANSWER_BYTES} bytes")
    return body


def fetch_status(url: str, timeout: float = 1.0, token: str | None = None) -> dict[str, Any] | None:
    """The status document, or ``None`` when nothing answers there as a tdproxy would."""
    try:
        document = json.loads(fetch(url, timeout, token))
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
