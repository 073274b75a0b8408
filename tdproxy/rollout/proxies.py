"""The running proxies a rollout drives and judges: their admin servers, read over HTTP.

A :class:`Proxy` is one admin server (``--admin URL``, or the config's own admin address and
port). :meth:`Proxy.look` reads ``/api/v1/status`` and ``/metrics`` once; :func:`preflight` checks,
before anything is written, that every proxy answers, serves this very config file with the
weights it now holds, and sees ``to`` healthy.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from tdproxy.config.model import Config
from tdproxy.controlplane import status_client
from tdproxy.rollout.judge import Counters, counters_from_metrics
from tdproxy.rollout.plan import RolloutError

TIMEOUT = 2.0  # seconds for one admin request


class Unreachable(Exception):
    """The admin server did not answer as a tdproxy does; the message says what happened."""


@dataclass(frozen=True)
class Look:
    """One proxy's status and ``to``'s counters at one moment."""

    generation: int
    started_at: float
    weights: dict[str, int]
    backends: dict[str, dict[str, Any]]
    counters: Counters
    config_path: object  # as the proxy reports it

    def healthy(self, name: str) -> bool:
        return bool(self.backends.get(name, {}).get("healthy"))


def admin_base(text: str) -> str:
    """``http://host:port`` from what ``--admin`` was given (a trailing ``/``, ``/metrics`` or
    ``/api/v1/status`` is dropped); :class:`RolloutError` when it is not an http(s) url."""
    url = text.strip().rstrip("/")
    for suffix in (status_client.STATUS_PATH, status_client.METRICS_PATH):
        url = url.removesuffix(suffix)
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise RolloutError(
            f"--admin {text!r}: expected the admin server's url, e.g. http://127.0.0.1:9901"
        )
    if parts.query or parts.fragment or parts.path not in ("", "/"):
        raise RolloutError(f"--admin {text!r}: give the admin server's base url, without a path")
    return url


class Proxy:
    """One running tdproxy, through its admin server."""

    def __init__(self, base_url: str, token: str | None) -> None:
        self.url = base_url
        self._token = token

    def __repr__(self) -> str:
        return f"<Proxy {self.url}>"

    def status(self) -> dict[str, Any]:
        try:
            body = status_client.fetch(self.url + status_client.STATUS_PATH, TIMEOUT, self._token)
        except OSError as exc:
            raise Unreachable(f"no answer from {self.url}: {_reason(exc)}") from None
        try:
            document = json_object(body)
        except ValueError:
            raise Unreachable(f"{self.url} did not answer with a tdproxy status") from None
        return document

    def look(self, backend: str) -> Look:
        """The status, then the metrics (a metric read just after the status is at least as
        new: never older than the weights it is judged with)."""
        document = self.status()
        try:
            text = status_client.fetch(self.url + status_client.METRICS_PATH, TIMEOUT, self._token)
            counters = counters_from_metrics(text.decode("utf-8", "replace"), backend)
        except OSError as exc:
            raise Unreachable(f"no metrics from {self.url}: {_reason(exc)}") from None
        except ValueError as exc:
            raise Unreachable(f"{self.url}/metrics is not Prometheus text: {exc}") from None
        backends = {
            str(item.get("name")): item for item in document["backends"] if isinstance(item, dict)
        }
        return Look(
            int(document["generation"]),
            float(document.get("started_at") or 0.0),
            {name: int(item.get("weight", -1)) for name, item in backends.items()},
            backends,
            counters,
            document.get("config_path"),
        )


def json_object(body: bytes) -> dict[str, Any]:
    """A tdproxy status document from its bytes; ``ValueError`` when it is none."""
    document = json.loads(body)
    if (
        not isinstance(document, dict)
        or not isinstance(document.get("generation"), int)
        or not isinstance(document.get("backends"), list)
    ):
        raise ValueError("not a tdproxy status document")
    return document


def _reason(exc: OSError) -> str:
    reason = getattr(exc, "reason", None)  # urllib's URLError wraps the socket's error
    return str(reason if reason is not None else exc) or type(exc).__name__


def proxies_for(config: Config, admins: Sequence[str], token: str | None) -> list[Proxy]:
    """The ``--admin`` urls, or the config's own admin server."""
    if admins:
        bases = [admin_base(text) for text in admins]
        if len(set(bases)) != len(bases):
            raise RolloutError("an admin server is given more than once with --admin")
        return [Proxy(base, token) for base in bases]
    base = status_client.admin_url(config.admin)
    if base is None:
        raise RolloutError(
            "admin.port is 0 (chosen when the proxy starts): give the admin server's url "
            "with --admin"
        )
    return [Proxy(base, token)]


def same_file(reported: object, config_path: str) -> bool:
    """The proxy's ``config_path`` is this file (after links; a relative path as seen from here)."""
    if not isinstance(reported, str) or not reported:
        return False
    return os.path.realpath(reported) == os.path.realpath(config_path)


def preflight(
    proxies: Sequence[Proxy], config_path: str, to: str, weights: Mapping[str, int]
) -> list[Look]:
    """Every proxy answers, serves ``config_path`` with ``weights`` and sees ``to`` healthy;
    :class:`RolloutError` naming the first proxy that does not."""
    looks = []
    for proxy in proxies:
        try:
            look = proxy.look(to)
        except Unreachable as exc:
            raise RolloutError(f"{exc}: is tdproxy running there?") from None
        reported = look.config_path
        if not same_file(reported, config_path):
            raise RolloutError(
                f"the proxy at {proxy.url} serves {reported}, not {config_path}: "
                "a rollout changes the file a proxy serves (give that file with --config, "
                "or that proxy's admin url with --admin)"
            )
        if look.weights != dict(weights):
            raise RolloutError(
                f"the proxy at {proxy.url} serves other weights than {config_path} holds "
                f"({_pairs(look.weights)} against {_pairs(weights)}): a change not applied yet, "
                "or a reload that failed (see its /status)"
            )
        if not look.healthy(to):
            reason = look.backends.get(to, {}).get("health_reason", "")
            raise RolloutError(f"backend {to} is not healthy at {proxy.url} ({reason})")
        looks.append(look)
    return looks


def _pairs(weights: Mapping[str, int]) -> str:
    return " ".join(f"{name}={weight}" for name, weight in weights.items())
