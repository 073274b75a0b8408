"""One access-log line per request, JSON by default, written to stdout off the event loop.

Lines are formatted when a request ends and collected in a list; :meth:`AccessLog.flush`, which
the server's sweeper calls a few times a second (and once more at shutdown), hands the batch to
the stdout :class:`~tdproxy.observability.log_output.LogWriter`, whose thread writes it. A
stalled reader therefore costs log lines (dropped and counted), never the event loop's time.

Formatting is the per-request cost, so it is kept small: the timestamp is formatted once per
second of the data plane's coarse clock, JSON strings are escaped by the C encoder the ``json``
module itself uses, and a line is one f-string rather than a dict passed through ``json.dumps``.
The ``combined`` format escapes ``"``, ``\\`` and bytes outside printable ASCII in its fields as
nginx does (``\\x22``), so a client cannot forge fields with a crafted User-Agent or Referer.
"""

from __future__ import annotations

import re
import time
from json.encoder import encode_basestring_ascii
from typing import TYPE_CHECKING

from tdproxy.observability.log_output import LogWriter, stdout_writer

if TYPE_CHECKING:
    from tdproxy.dataplane.context import Clock
    from tdproxy.dataplane.exchange import Exchange

MAX_PENDING = 10_000  # lines held between flushes before they are handed over early

_JSON_TIME = "%Y-%m-%dT%H:%M:%S%z"
_COMBINED_TIME = "%d/%b/%Y:%H:%M:%S %z"
_UNSAFE = re.compile(r'[\x00-\x1f"\\\x7f-\xff]')


def _json(value: bytes | None) -> str:
    """A JSON string (quoted, ASCII-only) for raw request bytes, or ``null``."""
    return encode_basestring_ascii(value.decode("latin-1")) if value is not None else "null"


# Values that repeat from request to request (client addresses, Host, User-Agent, method) are
# escaped once and then looked up; each cache is bounded (cleared when full), so a client that
# sends a new User-Agent every time costs the escaping it would cost anyway, and no memory.
CACHE_LIMIT = 512


def _cached_json(cache: dict[bytes, str], value: bytes | None) -> str:
    if value is None:
        return "null"
    found = cache.get(value)
    if found is None:
        if len(cache) >= CACHE_LIMIT:
            cache.clear()
        found = cache[value] = encode_basestring_ascii(value.decode("latin-1"))
    return found


def _hex_escape(match: re.Match[str]) -> str:
    return f"\\x{ord(match.group()):02X}"


def combined_escape(value: str) -> str:
    """nginx's access-log escaping: ``"``, ``\\``, control bytes and bytes >= 0x7f as ``\\xHH``."""
    if _UNSAFE.search(value) is None:
        return value
    return _UNSAFE.sub(_hex_escape, value)


def _text(value: bytes | None) -> str:
    return value.decode("latin-1") if value else "-"


class AccessLog:
    __slots__ = (
        "_agents",
        "_backend_json",
        "_hosts",
        "_line",
        "_peers",
        "_pending",
        "_stamp",
        "_stamp_second",
        "_strings",
        "_writer",
        "format",
    )

    def __init__(self, fmt: str = "json", writer: LogWriter | None = None) -> None:
        self.format = fmt
        self._writer = writer
        self._pending: list[str] = []
        self._stamp_second = -1
        self._stamp = ""
        self._backend_json: dict[str, str] = {}
        self._peers: dict[bytes, str] = {}
        self._hosts: dict[bytes, str] = {}
        self._agents: dict[bytes, str] = {}
        self._strings: dict[str, str] = {}  # method and version
        self._line = self._json_line if fmt == "json" else self._combined_line

    def log(self, exchange: Exchange, peer: bytes, status: int, clock: Clock) -> None:
        pending = self._pending
        pending.append(self._line(exchange, peer, status, clock))
        if len(pending) >= MAX_PENDING:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        lines, self._pending = self._pending, []
        (self._writer or stdout_writer()).write_lines(lines)

    # -- formats ------------------------------------------------------------------------

    def _timestamp(self, second: int) -> str:
        if second != self._stamp_second:
            fmt = _JSON_TIME if self.format == "json" else _COMBINED_TIME
            self._stamp = time.strftime(fmt, time.localtime(second))
            self._stamp_second = second
        return self._stamp

    def _json_line(self, exchange: Exchange, peer: bytes, status: int, clock: Clock) -> str:
        duration = time.monotonic() - exchange.monotonic_start
        target = exchange.target_backend
        if target is None:
            backend = "null"
        else:
            backend = self._backend_json.get(target.name) or self._remember(target.name)
        strings = self._strings
        method = strings.get(exchange.method) or self._string(exchange.method)
        version = strings.get(exchange.version) or self._string(exchange.version)
        return (
            f'{{"time":"{self._timestamp(clock.second)}",'
            f'"remote":{_cached_json(self._peers, peer)},'
            f'"method":{method},'
            f'"target":{_json(exchange.target)},'
            f'"version":{version},'
            f'"host":{_cached_json(self._hosts, exchange.host)},'
            f'"status":{status},'
            f'"bytes":{exchange.response_bytes},'
            f'"duration_ms":{duration * 1000:.3f},'
            f'"backend":{backend},'
            f'"attempts":{len(exchange.tried)},'
            f'"user_agent":{_cached_json(self._agents, exchange.field(b"user-agent"))}}}'
        )

    def _string(self, value: str) -> str:
        strings = self._strings
        if len(strings) >= CACHE_LIMIT:
            strings.clear()
        encoded = strings[value] = encode_basestring_ascii(value)
        return encoded

    def _remember(self, name: str) -> str:
        encoded = self._backend_json[name] = encode_basestring_ascii(name)
        return encoded

    def _combined_line(self, exchange: Exchange, peer: bytes, status: int, clock: Clock) -> str:
        duration = time.monotonic() - exchange.monotonic_start
        target = exchange.target_backend
        request = f"{exchange.method} {exchange.target.decode('latin-1')} HTTP/{exchange.version}"
        referer = _text(exchange.field(b"referer"))
        agent = _text(exchange.field(b"user-agent"))
        if _UNSAFE.search(request + referer + agent) is not None:  # rare: one check for all
            request, referer, agent = (combined_escape(f) for f in (request, referer, agent))
        return (
            f"{peer.decode('latin-1')} - - [{self._timestamp(clock.second)}] "
            f'"{request}" {status} {exchange.response_bytes} "{referer}" "{agent}" '
            f"{target.name if target is not None else '-'} {duration:.3f}"
        )
