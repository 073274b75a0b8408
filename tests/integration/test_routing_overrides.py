"""Overrides for testers: ``routing.override_header`` and ``routing.override_cookie``.

issue 3: off by default; when set and naming a backend, that backend serves the request
regardless of weight (a dark launch at weight 0 that QA can still reach). Precedence: override >
sticky cookie > weight. A value that names no backend is ignored.

"dark" is at weight 0 throughout, so without an override it never gets a request.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

import pytest

from tests.fakes import client
from tests.fakes.client import Response
from tests.fakes.process import (
    BackendProcess,
    ProxyFactory,
    ProxyProcess,
    proxy_config,
    start_backend,
)

HEADER = "X-TD-Backend"
OVERRIDE_COOKIE = "TDBACKEND"
OVERRIDES = {"override_header": HEADER, "override_cookie": OVERRIDE_COOKIE}


@pytest.fixture(scope="module")
def backends() -> Iterator[dict[str, BackendProcess]]:
    started: dict[str, BackendProcess] = {}
    try:
        for name in ("live", "dark"):
            started[name] = start_backend(name)
        yield started
    finally:
        for backend in started.values():
            backend.stop()


def dark_launch(backends: dict[str, BackendProcess], **routing: Any) -> dict[str, Any]:
    specs = [("live", backends["live"].url, 1), ("dark", backends["dark"].url, 0)]
    return proxy_config(specs, routing=routing)


def served(
    proxy: ProxyProcess, headers: Sequence[tuple[str, str]] = (), count: int = 10
) -> Counter[str | None]:
    seen: Counter[str | None] = Counter()
    for _ in range(count):
        response = client.request(proxy.url + "/", headers=headers)
        assert response.status == 200, (response.status, response.text)
        seen[response.header("X-Backend")] += 1
    return seen


def sticky_token(response: Response) -> str:
    for value in response.header_values("Set-Cookie"):
        if value.startswith("TDSESSION="):
            return value.split(";", 1)[0].split("=", 1)[1]
    raise AssertionError(f"no TDSESSION cookie set: {response.headers}")


def test_override_header_reaches_a_weight_zero_backend(
    backends: dict[str, BackendProcess], proxy_factory: ProxyFactory
) -> None:
    proxy = proxy_factory(dark_launch(backends, **OVERRIDES))
    assert served(proxy) == {"live": 10}
    assert served(proxy, [(HEADER, "dark")]) == {"dark": 10}
    assert served(proxy, [(HEADER.lower(), "dark")]) == {"dark": 10}, "header names are any case"
    assert served(proxy, [(HEADER, "live")]) == {"live": 10}
    assert served(proxy, [(HEADER, "no-such-backend")]) == {"live": 10}


def test_override_cookie_reaches_a_weight_zero_backend(
    backends: dict[str, BackendProcess], proxy_factory: ProxyFactory
) -> None:
    proxy = proxy_factory(dark_launch(backends, **OVERRIDES))
    assert served(proxy, [("Cookie", f"{OVERRIDE_COOKIE}=dark")]) == {"dark": 10}
    among_others = f"theme=dark; {OVERRIDE_COOKIE}=dark; lang=en"
    assert served(proxy, [("Cookie", among_others)]) == {"dark": 10}
    assert served(proxy, [("Cookie", f"{OVERRIDE_COOKIE}=nobody")]) == {"live": 10}
    assert served(proxy, [("Cookie", "OTHER=dark")]) == {"live": 10}


def test_overrides_are_off_by_default(
    backends: dict[str, BackendProcess], proxy_factory: ProxyFactory
) -> None:
    proxy = proxy_factory(dark_launch(backends))
    assert served(proxy, [(HEADER, "dark")]) == {"live": 10}
    assert served(proxy, [("Cookie", f"{OVERRIDE_COOKIE}=dark")]) == {"live": 10}


def test_only_the_configured_header_and_cookie_names_count(
    backends: dict[str, BackendProcess], proxy_factory: ProxyFactory
) -> None:
    proxy = proxy_factory(
        dark_launch(backends, override_header="X-QA-Env", override_cookie="QAENV")
    )
    assert served(proxy, [(HEADER, "dark")]) == {"live": 10}
    assert served(proxy, [("Cookie", f"{OVERRIDE_COOKIE}=dark")]) == {"live": 10}
    assert served(proxy, [("X-QA-Env", "dark")]) == {"dark": 10}
    assert served(proxy, [("Cookie", "QAENV=dark")]) == {"dark": 10}


def test_precedence_is_override_then_sticky_cookie_then_weight(
    backends: dict[str, BackendProcess], proxy_factory: ProxyFactory
) -> None:
    proxy = proxy_factory(dark_launch(backends, method="sticky", **OVERRIDES))
    # Weight: a fresh client is placed on live, and pinned there.
    placed = client.request(proxy.url + "/")
    assert placed.header("X-Backend") == "live"
    pinned_live = f"TDSESSION={sticky_token(placed)}"
    # A genuine cookie for dark, from a replica that places new users there, beats weight 0.
    replica_config = dark_launch(backends, method="sticky", **OVERRIDES)
    replica_config["backends"][0]["weight"], replica_config["backends"][1]["weight"] = 0, 1
    replica = proxy_factory(replica_config)
    to_dark = client.request(replica.url + "/")
    assert to_dark.header("X-Backend") == "dark"
    pinned_dark = f"TDSESSION={sticky_token(to_dark)}"
    assert served(proxy, [("Cookie", pinned_dark)]) == {"dark": 10}, "sticky cookie > weight"

    # Override > sticky cookie, in both directions, by header and by cookie.
    assert served(proxy, [("Cookie", pinned_live), (HEADER, "dark")]) == {"dark": 10}
    assert served(proxy, [("Cookie", pinned_dark), (HEADER, "live")]) == {"live": 10}
    both = f"{pinned_live}; {OVERRIDE_COOKIE}=dark"
    assert served(proxy, [("Cookie", both)]) == {"dark": 10}
    both = f"{OVERRIDE_COOKIE}=live; {pinned_dark}"
    assert served(proxy, [("Cookie", both)]) == {"live": 10}


def test_an_override_does_not_re_pin_a_sticky_user(
    backends: dict[str, BackendProcess], proxy_factory: ProxyFactory
) -> None:
    proxy = proxy_factory(dark_launch(backends, method="sticky", **OVERRIDES))
    first = client.request(proxy.url + "/")
    assert first.header("X-Backend") == "live"
    cookie = ("Cookie", f"TDSESSION={sticky_token(first)}")
    visit = client.request(proxy.url + "/", headers=[cookie, (HEADER, "dark")])
    assert visit.header("X-Backend") == "dark", "the tester reaches the dark backend"
    assert not visit.header_values("Set-Cookie"), "a tester's visit must not move the user"
    fresh = client.request(proxy.url + "/", headers=[(HEADER, "dark")])
    assert fresh.header("X-Backend") == "dark"
    assert not fresh.header_values("Set-Cookie"), "nor pin a fresh client to the dark backend"
    assert served(proxy, [cookie]) == {"live": 10}
