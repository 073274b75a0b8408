"""Sticky sessions through real tdproxy processes in front of real fake backends.

issue 3: a client without a valid cookie is placed by weight and the response sets the cookie; a
client with a valid cookie goes to its backend whatever the weights say (weight 0 included); an
unhealthy or removed pinned backend means re-placement and a new cookie; the token is derived from
the backend's name (and the optional secret), so replicas and restarts agree; garbage or forged
values count as no cookie; WebSocket upgrades honour the cookie too.

Which backend answered is read from the fake backend's ``X-Backend`` header. Every client here is
"fresh" unless it sends a cookie: a new connection and no Cookie header.
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Iterator, Mapping
from typing import Any

import pytest

from tests.fakes import client
from tests.fakes.client import RawClient, Response
from tests.fakes.process import (
    BackendFactory,
    BackendProcess,
    ProxyFactory,
    ProxyProcess,
    proxy_config,
    start_backend,
    start_tdproxy,
    wait_until,
)
from tests.fakes.websocket import OP_TEXT

COOKIE = "TDSESSION"
NAMES = ("blue", "green", "red")
SECRETS = (None, "k1-secret", "k2-secret")
FAST_HEALTH = {
    "enabled": True,
    "path": "/health",
    "interval": "200ms",
    "timeout": "200ms",
    "fall": 1,
    "rise": 1,
}

Tokens = dict[str | None, dict[str, str]]  # secret -> backend name -> cookie token


# ---------------------------------------------------------------------------------------------
# Helpers


@pytest.fixture(scope="module")
def backends() -> Iterator[dict[str, BackendProcess]]:
    """blue, green and red, shared by the tests that do not change a backend's behaviour."""
    started: dict[str, BackendProcess] = {}
    try:
        for name in NAMES:
            started[name] = start_backend(name)
        yield started
    finally:
        for backend in started.values():
            backend.stop()


def sticky_config(
    backends: Mapping[str, BackendProcess],
    weights: Mapping[str, int],
    *,
    sticky: Mapping[str, Any] | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    specs = [(name, backends[name].url, weight) for name, weight in weights.items()]
    routing = {"method": "sticky", "sticky": dict(sticky or {})}
    return proxy_config(specs, routing=routing, **overrides)


def get(proxy: ProxyProcess, cookie: str | None = None, path: str = "/") -> Response:
    """One GET from a fresh connection, with ``cookie`` as the whole Cookie header if given."""
    headers = [] if cookie is None else [("Cookie", cookie)]
    response = client.request(proxy.url + path, headers=headers)
    assert response.status == 200, (response.status, response.text)
    return response


def pin(token: str) -> str:
    return f"{COOKIE}={token}"


def served_by(response: Response) -> str:
    name = response.header("X-Backend")
    assert name is not None, response.headers
    return name


def set_cookie(response: Response, name: str = COOKIE) -> str | None:
    """The whole Set-Cookie value for cookie ``name``; None when the response sets none."""
    values = [v for v in response.header_values("Set-Cookie") if v.split("=", 1)[0] == name]
    assert len(values) <= 1, values
    return values[0] if values else None


def token_of(response: Response, name: str = COOKIE) -> str | None:
    value = set_cookie(response, name)
    return None if value is None else value.split(";", 1)[0].split("=", 1)[1]


def attributes(set_cookie_value: str) -> dict[str, str | None]:
    """Set-Cookie attributes by lower-cased name (RFC 6265 §5.2); value None for flags."""
    result: dict[str, str | None] = {}
    for part in set_cookie_value.split(";")[1:]:
        key, sep, value = part.strip().partition("=")
        result[key.lower()] = value if sep else None
    return result


def tokens_by_backend(proxy: ProxyProcess, names: tuple[str, ...]) -> dict[str, str]:
    """Fresh clients until each of ``names`` has been placed once: backend -> its token."""
    found: dict[str, str] = {}
    for _ in range(50):
        response = get(proxy)
        token = token_of(response)
        assert token, f"a fresh client got no {COOKIE} cookie: {response.headers}"
        assert found.setdefault(served_by(response), token) == token, "two tokens for one backend"
        if set(found) >= set(names):
            return found
    raise AssertionError(f"not every backend was placed on: {found}")


def wait_for_reloads(proxy: ProxyProcess, count: int) -> None:
    """Wait until tdproxy has logged ``count`` successful reloads (the file is polled ~1/s)."""
    wait_until(
        lambda: proxy.stderr_text().count("config reloaded") >= count,
        timeout=15,
        message=f"{count} reload(s) in tdproxy's log",
    )


@pytest.fixture(scope="module")
def tokens(backends: dict[str, BackendProcess], tmp_path_factory: pytest.TempPathFactory) -> Tokens:
    """The genuine tokens, per secret, as real tdproxy processes hand them out (then stopped)."""
    result: Tokens = {}
    for secret in SECRETS:
        config = sticky_config(backends, dict.fromkeys(NAMES, 1), sticky={"secret": secret})
        with start_tdproxy(config, tmp_path_factory.mktemp("tokens")) as proxy:
            result[secret] = tokens_by_backend(proxy, NAMES)
    return result


# ---------------------------------------------------------------------------------------------
# Placement and pinning


def test_fresh_clients_are_placed_70_30_within_5_points(
    backends: dict[str, BackendProcess], proxy_factory: ProxyFactory
) -> None:
    proxy = proxy_factory(sticky_config(backends, {"blue": 70, "green": 30}))
    placed: Counter[str] = Counter()
    token_for: dict[str, str] = {}
    for _ in range(400):
        response = get(proxy)
        name = served_by(response)
        token = token_of(response)
        assert token, f"a fresh client got no {COOKIE} cookie: {response.headers}"
        assert token_for.setdefault(name, token) == token, "one backend, two tokens"
        placed[name] += 1
    assert set(placed) == {"blue", "green"}
    assert token_for["blue"] != token_for["green"]
    assert abs(placed["blue"] / 400 - 0.70) <= 0.05, placed


def test_50_requests_with_a_cookie_never_move(
    backends: dict[str, BackendProcess], proxy_factory: ProxyFactory
) -> None:
    proxy = proxy_factory(sticky_config(backends, {"blue": 70, "green": 30}))
    pinned = tokens_by_backend(proxy, ("blue", "green"))
    for name, token in pinned.items():
        seen: Counter[str] = Counter()
        for number in range(50):
            # Other cookies around ours must not matter; half the requests carry some.
            cookie = pin(token) if number % 2 else f"theme=dark; {pin(token)}; lang=en"
            response = get(proxy, cookie)
            seen[served_by(response)] += 1
            assert token_of(response) in (None, token), response.headers
            served_by(get(proxy))  # a fresh client in between keeps the rotation turning
        assert seen == {name: 50}


def test_keep_alive_requests_with_a_cookie_never_move(
    backends: dict[str, BackendProcess], proxy_factory: ProxyFactory
) -> None:
    proxy = proxy_factory(sticky_config(backends, {"blue": 50, "green": 50}))
    pinned = tokens_by_backend(proxy, ("blue", "green"))
    with RawClient(proxy.host, proxy.port) as connection:
        for number in range(40):
            name = ("blue", "green")[number % 3 == 0]
            response = connection.request("GET", "/", headers=[("Cookie", pin(pinned[name]))])
            assert response.status == 200
            assert served_by(response) == name


def test_set_cookie_attributes_on_plain_http(
    backends: dict[str, BackendProcess], proxy_factory: ProxyFactory
) -> None:
    proxy = proxy_factory(sticky_config(backends, {"blue": 1, "green": 1}))
    for _ in range(2):
        response = get(proxy)
        value = set_cookie(response)
        assert value is not None, response.headers
        token = value.split(";", 1)[0].split("=", 1)[1]
        assert token and served_by(response) not in token and "127.0.0.1" not in token
        attrs = attributes(value)
        # A session cookie (no Max-Age, no Expires); no Secure on a plain-HTTP entrypoint.
        assert attrs == {"path": "/", "httponly": None, "samesite": "Lax"}, value


def test_cookie_name_and_max_age_follow_the_config(
    backends: dict[str, BackendProcess], proxy_factory: ProxyFactory
) -> None:
    config = sticky_config(
        backends, {"blue": 1, "green": 1}, sticky={"cookie": "ENVSESSION", "max_age": "2h"}
    )
    proxy = proxy_factory(config)
    response = get(proxy)
    assert set_cookie(response) is None, "the default cookie name is still used"
    value = set_cookie(response, "ENVSESSION")
    assert value is not None, response.headers
    assert attributes(value) == {
        "path": "/",
        "httponly": None,
        "samesite": "Lax",
        "max-age": "7200",
    }, value
    # The renamed cookie is the one that pins.
    token = value.split(";", 1)[0].split("=", 1)[1]
    name = served_by(response)
    for _ in range(10):
        assert served_by(get(proxy, f"ENVSESSION={token}")) == name


# ---------------------------------------------------------------------------------------------
# Weight changes, removal and health


def test_weight_zero_drains_new_users_and_keeps_cookie_holders(
    backends: dict[str, BackendProcess], proxy_factory: ProxyFactory
) -> None:
    config = sticky_config(backends, {"blue": 50, "green": 50})
    proxy = proxy_factory(config)
    pinned = tokens_by_backend(proxy, ("blue", "green"))

    drained = copy.deepcopy(config)
    drained["backends"][1]["weight"] = 0  # green: no new users
    proxy.write_config(drained)
    wait_for_reloads(proxy, 1)
    for _ in range(25):
        holder = get(proxy, pin(pinned["green"]))
        assert served_by(holder) == "green"
        assert token_of(holder) in (None, pinned["green"])
        fresh = get(proxy)
        assert served_by(fresh) == "blue"
        assert token_of(fresh) == pinned["blue"]

    # Green leaves the config: its cookie holders are re-placed and re-pinned.
    removed = copy.deepcopy(config)
    removed["backends"] = [config["backends"][0]]
    proxy.write_config(removed)
    wait_for_reloads(proxy, 2)
    moved = get(proxy, pin(pinned["green"]))
    assert served_by(moved) == "blue"
    assert token_of(moved) == pinned["blue"]


def test_unhealthy_pinned_backend_means_a_new_placement_and_cookie(
    backend_factory: BackendFactory, proxy_factory: ProxyFactory
) -> None:
    own = {name: backend_factory(name) for name in ("blue", "green")}
    proxy = proxy_factory(sticky_config(own, {"blue": 1, "green": 1}, health_check=FAST_HEALTH))
    pinned = tokens_by_backend(proxy, ("blue", "green"))

    own["green"].set_health(500)
    proxy.wait_for_output("backend green: up -> down", stream="stderr")
    moved = get(proxy, pin(pinned["green"]))
    assert served_by(moved) == "blue"
    assert token_of(moved) == pinned["blue"], moved.headers
    for _ in range(10):
        assert served_by(get(proxy, pin(pinned["green"]))) == "blue"

    own["green"].set_health(200)
    proxy.wait_for_output("backend green: down -> up", stream="stderr")
    for _ in range(10):
        # The re-pinned client stays where it was re-pinned; the old cookie is valid again.
        assert served_by(get(proxy, pin(pinned["blue"]))) == "blue"
        assert served_by(get(proxy, pin(pinned["green"]))) == "green"


# ---------------------------------------------------------------------------------------------
# The token: replicas, secrets, garbage


def test_two_replicas_honour_each_others_cookies(
    backends: dict[str, BackendProcess], proxy_factory: ProxyFactory, tokens: Tokens
) -> None:
    weights = {"blue": 1, "green": 1}
    first = proxy_factory(sticky_config(backends, weights))
    second = proxy_factory(sticky_config(backends, weights))
    from_first = tokens_by_backend(first, ("blue", "green"))
    from_second = tokens_by_backend(second, ("blue", "green"))
    # The same on every replica, and across restarts (the ``tokens`` processes are gone).
    assert from_first == from_second
    assert from_first == {name: tokens[None][name] for name in weights}
    for name in weights:
        for _ in range(25):
            assert served_by(get(second, pin(from_first[name]))) == name
            assert served_by(get(first, pin(from_second[name]))) == name


def test_a_secret_makes_a_different_token(tokens: Tokens) -> None:
    every = [tokens[secret][name] for secret in SECRETS for name in NAMES]
    assert len(set(every)) == len(every), tokens


def forged_values(tokens: Tokens, secret: str | None) -> list[str]:
    """Cookie headers that must count as no cookie on a proxy with ``secret`` over blue/green."""
    green = tokens[secret]["green"]
    flipped = green[:-1] + ("1" if green[-1] != "1" else "2")
    others = [tokens[other]["green"] for other in SECRETS if other != secret]
    return [
        f"{COOKIE}=garbage",
        f"{COOKIE}=",
        COOKIE,
        f"{COOKIE}={flipped}",
        f"{COOKIE}={green}0",
        f"{COOKIE}={green[:-1]}",
        f"{COOKIE}=green",
        f"{COOKIE}={tokens[secret]['red']}",  # a backend that is not in this config
        f"OTHER={green}",  # the right token under another cookie name
        *(pin(token) for token in others),  # green's token under another (or no) secret
    ]


@pytest.mark.parametrize("secret", [None, "k1-secret"], ids=["no-secret", "secret"])
def test_garbage_or_forged_cookie_counts_as_no_cookie(
    backends: dict[str, BackendProcess],
    proxy_factory: ProxyFactory,
    tokens: Tokens,
    secret: str | None,
) -> None:
    # Green at weight 0: only a genuine green cookie can reach it.
    config = sticky_config(backends, {"blue": 1, "green": 0}, sticky={"secret": secret})
    proxy = proxy_factory(config)
    genuine = get(proxy, pin(tokens[secret]["green"]))
    assert served_by(genuine) == "green"
    assert token_of(genuine) is None
    for cookie in forged_values(tokens, secret):
        response = get(proxy, cookie)
        assert served_by(response) == "blue", cookie
        assert token_of(response) == tokens[secret]["blue"], (cookie, response.headers)


# ---------------------------------------------------------------------------------------------
# WebSocket


def websocket_backend(proxy: ProxyProcess, cookie: str | None) -> str:
    """Open /ws through the proxy (with ``cookie``), echo one message, close; who answered."""
    headers = [] if cookie is None else [("Cookie", cookie)]
    with RawClient(proxy.host, proxy.port) as connection:
        response = connection.websocket_handshake("/ws", headers)
        assert response.status == 101, (response.status, response.body)
        connection.ws_send(OP_TEXT, b"ping through the tunnel")
        assert connection.ws_recv() == (OP_TEXT, b"ping through the tunnel")
        connection.ws_close()
        return served_by(response)


def test_websocket_upgrade_honours_the_cookie(
    backends: dict[str, BackendProcess], proxy_factory: ProxyFactory, tokens: Tokens
) -> None:
    proxy = proxy_factory(sticky_config(backends, {"blue": 1, "green": 1}))
    unpinned = Counter(websocket_backend(proxy, None) for _ in range(4))
    assert set(unpinned) == {"blue", "green"}, "without a cookie the rotation moves"
    for name in ("blue", "green"):
        for _ in range(6):
            assert websocket_backend(proxy, pin(tokens[None][name])) == name


def test_websocket_handshake_without_a_cookie_is_pinned_by_the_101(
    backends: dict[str, BackendProcess], proxy_factory: ProxyFactory, tokens: Tokens
) -> None:
    proxy = proxy_factory(sticky_config(backends, {"blue": 1, "green": 1}))
    with RawClient(proxy.host, proxy.port) as connection:
        response = connection.websocket_handshake("/ws", [])
        assert response.status == 101, (response.status, response.body)
        name = served_by(response)
        cookies = [v for v in response.header_values("Set-Cookie") if v.startswith(COOKIE)]
        connection.ws_close()
    assert cookies == [f"{pin(tokens[None][name])}; Path=/; HttpOnly; SameSite=Lax"]
    for _ in range(4):
        assert websocket_backend(proxy, pin(tokens[None][name])) == name
