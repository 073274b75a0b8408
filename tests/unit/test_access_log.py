"""Access-log lines: the JSON format is valid JSON with every field, the combined format escapes
its fields as nginx does, and ``flush`` hands the lines to a writer instead of writing."""

from __future__ import annotations

import json
import os
import re
import time

import pytest

from tdproxy.config.loader import parse_config
from tdproxy.dataplane.exchange import Exchange
from tdproxy.observability.access_log import AccessLog, combined_escape
from tdproxy.observability.log_output import LogWriter
from tests.fakes.routing import new_router

BLUE = new_router(
    parse_config({"backends": [{"name": "blue", "url": "http://blue.internal", "weight": 1}]})
).table.targets[0]


def FakeExchange(target: bytes = b"/x?a=1", **fields: bytes) -> Exchange:
    """A real Exchange (the compiled build checks types) with what the access log reads."""
    exchange = Exchange()
    exchange.monotonic_start = time.monotonic() - 0.0123
    exchange.method = "GET"
    exchange.target = target
    exchange.version = "1.1"
    exchange.host = b"example.com"
    exchange.response_bytes = 1234
    exchange.target_backend = BLUE
    exchange.tried = [BLUE]
    exchange.headers = [(name.encode(), name.encode(), value) for name, value in fields.items()]
    return exchange


class FakeClock:
    second = 1_700_000_000


def lines_of(log: AccessLog, exchange: Exchange, status: int = 200) -> str:
    log.log(exchange, b"127.0.0.1", status, FakeClock())  # type: ignore[arg-type]
    return log._pending[-1]


def test_json_line_holds_every_field_as_json() -> None:
    exchange = FakeExchange(**{"user-agent": b'evil"agent\\\x01\xff'})
    entry = json.loads(lines_of(AccessLog("json"), exchange))
    assert entry == {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(FakeClock.second)),
        "remote": "127.0.0.1",
        "method": "GET",
        "target": "/x?a=1",
        "version": "1.1",
        "host": "example.com",
        "status": 200,
        "bytes": 1234,
        "duration_ms": entry["duration_ms"],
        "backend": "blue",
        "attempts": 1,
        "user_agent": 'evil"agent\\\x01\xff',
    }
    assert 12.0 <= entry["duration_ms"] < 1000


def test_json_line_without_backend_host_or_agent_uses_null() -> None:
    exchange = FakeExchange()
    exchange.target_backend = None
    exchange.host = None
    line = lines_of(AccessLog("json"), exchange, 400)
    entry = json.loads(line)
    assert (entry["backend"], entry["host"], entry["user_agent"]) == (None, None, None)
    assert line.isascii()


COMBINED = re.compile(
    r'^(?P<remote>\S+) - - \[(?P<time>[^\]]+)\] "(?P<request>[^"]*)" (?P<status>\d+) '
    r'(?P<bytes>\d+) "(?P<referer>[^"]*)" "(?P<agent>[^"]*)" (?P<backend>\S+) (?P<seconds>\S+)$'
)


def test_combined_line_fields() -> None:
    exchange = FakeExchange(referer=b"https://ref.example/", **{"user-agent": b"curl/8"})
    match = COMBINED.match(lines_of(AccessLog("combined"), exchange, 404))
    assert match is not None
    assert match["request"] == "GET /x?a=1 HTTP/1.1"
    assert (match["status"], match["bytes"], match["backend"]) == ("404", "1234", "blue")
    assert (match["referer"], match["agent"]) == ("https://ref.example/", "curl/8")


def test_combined_escapes_quotes_so_fields_cannot_be_forged() -> None:
    forged = b'x" 200 999 "https://forged.example/" "ua'
    exchange = FakeExchange(
        target=b'/a"b', referer=b"r\\e\x1bf", **{"user-agent": forged + b"\x7f\xe9"}
    )
    line = lines_of(AccessLog("combined"), exchange, 500)
    match = COMBINED.match(line)
    assert match is not None, line
    assert match["status"] == "500"
    assert match["request"] == "GET /a\\x22b HTTP/1.1"
    assert match["referer"] == "r\\x5Ce\\x1Bf"
    assert match["agent"] == ("x\\x22 200 999 \\x22https://forged.example/\\x22 \\x22ua\\x7F\\xE9")


@pytest.mark.parametrize(
    ("raw", "escaped"),
    [("plain text", "plain text"), ('"', "\\x22"), ("\\", "\\x5C"), ("\n\t", "\\x0A\\x09")],
)
def test_combined_escape(raw: str, escaped: str) -> None:
    assert combined_escape(raw) == escaped


def test_flush_hands_the_batch_to_the_writer(pipe: tuple[int, int]) -> None:
    read, write = pipe
    writer = LogWriter(write, "test")
    log = AccessLog("json", writer)
    for _ in range(3):
        lines_of(log, FakeExchange())
    log.flush()
    log.flush()  # nothing pending: nothing written
    assert writer.close(timeout=5)
    os.close(write)
    data = b""
    while chunk := os.read(read, 65536):
        data += chunk
    assert [json.loads(line)["status"] for line in data.decode().splitlines()] == [200] * 3
