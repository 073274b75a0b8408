"""The sticky-session cookie: stable opaque tokens, cookie parsing and the Set-Cookie line."""

from __future__ import annotations

import hashlib
import hmac
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tdproxy.config import parse_config
from tdproxy.routing.sticky import StickyCodec, cookie_value, set_cookie_header
from tests.fakes.routing import new_router

REPO = Path(__file__).resolve().parents[2]


# -- tokens ----------------------------------------------------------------------------------


def test_token_round_trips() -> None:
    codec = StickyCodec(["blue", "green"])
    assert codec.decode(codec.token("blue")) == "blue"
    assert codec.decode(codec.token("green")) == "green"
    assert codec.token("blue") != codec.token("green")


def test_token_is_the_same_in_every_codec_instance() -> None:
    # Replicas (and restarts) build their own codecs, in any order, with more or fewer backends.
    first = StickyCodec(["blue", "green"])
    second = StickyCodec(["green", "canary", "blue"])
    assert first.token("blue") == second.token("blue")
    assert second.decode(first.token("green")) == "green"


def test_token_is_stable_across_processes() -> None:
    # Guards against anything seeded per process (e.g. Python's randomized hash()).
    code = (
        "from tdproxy.routing.sticky import StickyCodec;"
        "print(StickyCodec(['blue']).token('blue'), StickyCodec(['blue'], 's').token('blue'))"
    )
    outputs = set()
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(REPO)}
        result = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
        )
        outputs.add(result.stdout)
    local = f"{StickyCodec(['blue']).token('blue')} {StickyCodec(['blue'], 's').token('blue')}\n"
    assert outputs == {local}


def test_token_value_is_pinned() -> None:
    # Changing the derivation would re-place every pinned user on upgrade: keep it stable.
    expected = hashlib.sha256(b"tdproxy-sticky:blue").hexdigest()[:24]
    assert StickyCodec(["blue"]).token("blue") == expected


def test_token_with_secret_is_an_hmac() -> None:
    expected = hmac.new(b"s3cret", b"tdproxy-sticky:blue", hashlib.sha256).hexdigest()[:32]
    assert StickyCodec(["blue"], secret="s3cret").token("blue") == expected


def test_token_reveals_neither_name_nor_address() -> None:
    config = parse_config({"backends": [{"name": "blue", "url": "http://10.1.2.3:8080"}]})
    token = StickyCodec([b.name for b in config.backends]).token("blue")
    assert "blue" not in token
    assert "10.1.2.3" not in token
    assert all(c in "0123456789abcdef" for c in token)


def test_token_derives_from_the_name_not_the_url() -> None:
    def token_for(url: str) -> bytes:
        config = parse_config(
            {"routing": {"method": "sticky"}, "backends": [{"name": "blue", "url": url}]}
        )
        return new_router(config).table.by_name["blue"].set_cookie

    assert token_for("http://10.0.0.1") == token_for("https://blue.internal:8443")


def test_secret_changes_every_token() -> None:
    plain = StickyCodec(["blue", "green"])
    signed = StickyCodec(["blue", "green"], secret="one")
    other = StickyCodec(["blue", "green"], secret="two")
    for name in ("blue", "green"):
        assert len({plain.token(name), signed.token(name), other.token(name)}) == 3


def test_same_secret_same_token_across_instances() -> None:
    assert StickyCodec(["a"], secret="k").token("a") == StickyCodec(["b", "a"], "k").token("a")


def test_unsigned_token_is_refused_when_a_secret_is_set() -> None:
    # A user who knows the unsigned derivation cannot forge a token for another backend.
    signed = StickyCodec(["blue", "green"], secret="s3cret")
    forged = hashlib.sha256(b"tdproxy-sticky:green").hexdigest()[:24]
    assert signed.decode(forged) is None
    assert signed.decode(StickyCodec(["green"], secret="guess").token("green")) is None


@pytest.mark.parametrize(
    "token",
    ["", "blue", "garbage", "0" * 24, "0" * 32, "../../etc/passwd", "\x00", "é" * 24],
)
def test_garbage_tokens_decode_to_none(token: str) -> None:
    codec = StickyCodec(["blue", "green"])
    assert codec.decode(token) is None


def test_near_miss_tokens_decode_to_none() -> None:
    codec = StickyCodec(["blue"])
    token = codec.token("blue")
    for variant in (token.upper(), token[:-1], token + "0", " " + token, token[::-1]):
        assert codec.decode(variant) is None


def test_token_of_a_backend_not_in_this_codec_is_none() -> None:
    old = StickyCodec(["blue", "retired"])
    new = StickyCodec(["blue"])
    assert new.decode(old.token("retired")) is None


def test_token_for_unknown_name_raises() -> None:
    with pytest.raises(KeyError):
        StickyCodec(["blue"]).token("green")


# -- cookie_value ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "value"),
    [
        (b"TDSESSION=abc", b"abc"),
        (b"a=1; TDSESSION=abc; b=2", b"abc"),
        (b"a=1;TDSESSION=abc;b=2", b"abc"),
        (b"a=1;   TDSESSION=abc   ;b=2", b"abc"),
        (b"  TDSESSION=abc", b"abc"),
        (b'TDSESSION="abc"', b"abc"),
        (b'a="x;y"; TDSESSION="abc"', b"abc"),
        (b"TDSESSION=a=b", b"a=b"),
        (b"TDSESSION=", b""),
        (b"TDSESSION=first; TDSESSION=second", b"first"),
        (b"XTDSESSION=no; TDSESSION=yes", b"yes"),
        (b"TDSESSIONX=no; TDSESSION=yes", b"yes"),
    ],
)
def test_cookie_value_found(header: bytes, value: bytes) -> None:
    assert cookie_value(header, b"TDSESSION") == value


@pytest.mark.parametrize(
    "header",
    [
        b"",
        b"a=1; b=2",
        b"TDSESSION",
        b"XTDSESSION=abc",
        b"TDSESSIONX=abc",
        b"tdsession=abc",
        b"a=TDSESSION=abc",
        b";;;",
    ],
)
def test_cookie_value_missing(header: bytes) -> None:
    assert cookie_value(header, b"TDSESSION") is None


# -- set_cookie_header -----------------------------------------------------------------------


def test_set_cookie_session_cookie() -> None:
    line = set_cookie_header("TDSESSION", "tok", secure=False, max_age=None)
    assert line == b"Set-Cookie: TDSESSION=tok; Path=/; HttpOnly; SameSite=Lax\r\n"


def test_set_cookie_secure_only_when_asked() -> None:
    assert b"Secure" in set_cookie_header("TD", "t", secure=True, max_age=None)
    assert b"Secure" not in set_cookie_header("TD", "t", secure=False, max_age=None)


def test_set_cookie_max_age_when_set() -> None:
    line = set_cookie_header("TD", "t", secure=True, max_age=3600.0)
    assert line == b"Set-Cookie: TD=t; Path=/; HttpOnly; SameSite=Lax; Secure; Max-Age=3600\r\n"
    assert b"Max-Age" not in set_cookie_header("TD", "t", secure=False, max_age=None)


def test_set_cookie_max_age_is_whole_seconds() -> None:
    assert set_cookie_header("TD", "t", secure=False, max_age=90.7).endswith(b"; Max-Age=90\r\n")


def test_set_cookie_attributes_parse_back() -> None:
    line = set_cookie_header("TDSESSION", "abc123", secure=True, max_age=60)
    assert line.endswith(b"\r\n")
    assert line.count(b"\r\n") == 1
    name, _, value = line.rstrip(b"\r\n").partition(b": ")
    assert name == b"Set-Cookie"
    attributes = [part.strip() for part in value.split(b";")]
    assert attributes[0] == b"TDSESSION=abc123"
    assert set(attributes[1:]) == {
        b"Path=/",
        b"HttpOnly",
        b"SameSite=Lax",
        b"Secure",
        b"Max-Age=60",
    }
    # What the browser will send back is what the proxy reads.
    assert cookie_value(attributes[0], b"TDSESSION") == b"abc123"
