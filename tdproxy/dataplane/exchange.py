"""One request/response exchange: the request head as parsed, and what became of it.

``parse_head`` applies DESIGN.md's request rules once per request (RFC 9110 §7.6.1 hop-by-hop
fields, RFC 9112 §3.2.2 absolute-form, the X-Forwarded-* family) and keeps the result as bytes,
so sending the request to a backend, or to a second one on retry, is a join. ``response_head``
applies the same rules to the backend's answer and decides how the body is framed to the client.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING

from tdproxy.dataplane.errors import BadResponse
from tdproxy.dataplane.http import (
    CRLF,
    HOP_BY_HOP,
    IDEMPOTENT_METHODS,
    STATUS_LINES,
    connection_tokens,
    split_absolute_form,
    status_line,
)
from tdproxy.dataplane.lifecycle import DONE, EXCHANGE_TRANSITIONS, QUEUED, exchange_state_name

if TYPE_CHECKING:
    from tdproxy.dataplane.context import ProxyContext
    from tdproxy.dataplane.upstream import UpstreamConnection
    from tdproxy.routing.table import RoutingTable, Target

INF = math.inf
BODY_NONE, BODY_LENGTH, BODY_CHUNKED = 0, 1, 2
RESP_NONE, RESP_LENGTH, RESP_CHUNKED, RESP_CLOSE = 0, 1, 2, 3

# The transition table as a list indexed by state (the client checks each move against it).
EXCHANGE_NEXT = [EXCHANGE_TRANSITIONS[state] for state in range(len(EXCHANGE_TRANSITIONS))]

# What parse_head does with a request field (anything not listed is forwarded as it is).
_DROP, _HOST, _LENGTH, _TE, _CONNECTION, _UPGRADE, _XFF, _COOKIE = range(8)
REQUEST_FIELDS = {
    b"host": _HOST,
    b"content-length": _LENGTH,
    b"transfer-encoding": _TE,
    b"connection": _CONNECTION,
    b"upgrade": _UPGRADE,
    b"keep-alive": _DROP,
    b"proxy-connection": _DROP,
    b"te": _DROP,
    b"trailer": _DROP,
    b"x-forwarded-for": _XFF,
    b"x-forwarded-proto": _DROP,
    b"x-forwarded-host": _DROP,
    b"x-real-ip": _DROP,
    b"cookie": _COOKIE,
}
_METHOD_NAMES = {
    m.encode(): m for m in ("GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "TRACE")
}
# What a Host value may contain (RFC 3986 reg-name / IP literal, and a port).
_HOST_CHARS = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~!$&'()*+,;=%:[]"
# Connection options that name no field.
_CONNECTION_OPTIONS = frozenset({b"close", b"keep-alive", b"upgrade"})


# Host values already found valid: a deployment sees few, and checking one costs more than this.
_VALID_HOSTS: set[bytes] = set()
_VALID_HOSTS_LIMIT = 1024


# Response field names as the backend spells them -> the lower-case name when tdproxy acts on the
# field (hop-by-hop ones and Content-Length), else _PLAIN. A backend uses a handful of spellings;
# the map is bounded all the same.
_PLAIN = b""
_RESPONSE_FIELDS: dict[bytes, bytes] = {}
_RESPONSE_FIELDS_LIMIT = 4096


def _response_field(name: bytes) -> bytes:
    lname = name.lower()
    kind = lname if lname in HOP_BY_HOP or lname == b"content-length" else _PLAIN
    if len(_RESPONSE_FIELDS) >= _RESPONSE_FIELDS_LIMIT:
        _RESPONSE_FIELDS.clear()
    _RESPONSE_FIELDS[name] = kind
    return kind


def valid_host(host: bytes) -> bool:
    """RFC 9112 §3.2 / RFC 3986 §3.2.2: a reg-name or ``[IP literal]``, then ``:port``."""
    if host in _VALID_HOSTS:
        return True
    if not _check_host(host):
        return False
    if len(_VALID_HOSTS) >= _VALID_HOSTS_LIMIT:
        _VALID_HOSTS.clear()
    _VALID_HOSTS.add(host)
    return True


def _check_host(host: bytes) -> bool:
    if host.translate(None, _HOST_CHARS):
        return False
    if host[:1] == b"[":
        end = host.find(b"]")
        if end < 0:
            return False
        port = host[end + 1 :]
    else:
        if b"[" in host or b"]" in host:
            return False
        colon = host.find(b":")
        port = host[colon:] if colon >= 0 else b""
    if not port:
        return True
    return port[:1] == b":" and (len(port) == 1 or port[1:].isdigit())


def method_name(method: bytes) -> str:
    name = _METHOD_NAMES.get(method)
    return name if name is not None else method.decode("ascii", "replace")


class PeerFields:
    """The forwarding fields that name one client connection's peer, built once per connection."""

    __slots__ = ("address", "fields", "forwarded", "real_ip", "scheme", "trusted")

    def __init__(self, address: bytes, scheme: bytes) -> None:
        self.address = address
        self.scheme = scheme
        # A peer in entrypoint.trusted_proxies gets forwarded.TrustedPeerFields instead. (A
        # slot, not a class attribute: it is read on every request, and a slot reads faster.)
        self.trusted = False
        self.fields = REQUEST_FIELDS  # what parse_head does with each request field
        # X-Forwarded-For when the request has none, and X-Forwarded-Proto.
        self.forwarded = b"X-Forwarded-For: %s\r\nX-Forwarded-Proto: %s\r\n" % (address, scheme)
        self.real_ip = b"X-Real-IP: %s\r\n" % address

    def trusted_block(
        self, exchange: Exchange, forwarded_for: bytes | None, host: bytes | None
    ) -> bytes:
        """The forwarding fields of a request from a trusted proxy (``trusted`` is True):
        :class:`~tdproxy.dataplane.forwarded.TrustedPeerFields` has them."""
        raise NotImplementedError

    def forwarded_after(self, forwarded_for: bytes) -> bytes:
        """X-Forwarded-For (the request's list, then this peer) and X-Forwarded-Proto."""
        return b"X-Forwarded-For: %s, %s\r\nX-Forwarded-Proto: %s\r\n" % (
            forwarded_for,
            self.address,
            self.scheme,
        )


class Exchange:
    """One request and what became of it. Its state (``lifecycle``: QUEUED -> ... -> DONE or
    ABORTED) and its deadline are its own: nothing of one request's timing leaks into the next
    one's on the same connection."""

    __slots__ = (
        "batch",
        "batch_mark",
        "body",
        "body_buffered",
        "body_mode",
        "body_received",
        "chunk_overhead",
        "chunks",
        "client",
        "content_length",
        "cookie",
        "counted",
        "deadline",
        "generated",
        "head_done",
        "head_only",
        "headers",
        "host",
        "keep_alive",
        "keep_client",
        "method",
        "middle",
        "monotonic_start",
        "override",
        "refusal",
        "replay",
        "replay_bytes",
        "replayed",
        "request_done",
        "request_line",
        "response_bytes",
        "response_mode",
        "set_cookie",
        "state",
        "status",
        "table",
        "target",
        "target_backend",
        "tried",
        "tunnel_data",
        "until_close",
        "upgrade_body",
        "upstream",
        "version",
        "websocket",
    )

    def __init__(self) -> None:
        self.state = QUEUED
        self.deadline = INF
        self.refusal = 0  # a status tdproxy answers with when this request's turn comes
        self.monotonic_start = time.monotonic()
        self.target = b""
        self.headers: list[tuple[bytes, bytes, bytes]] = []
        self.head_done = False
        self.method = "-"
        self.version = "1.1"
        self.keep_alive = True
        self.head_only = False
        self.websocket = False
        self.body_mode = BODY_NONE
        self.host: bytes | None = None
        self.cookie: bytes | None = None
        self.override: bytes | None = None
        self.request_line = b""
        self.middle = b""
        self.body: list[bytes] = []
        self.body_buffered = 0
        self.body_received = 0
        self.chunks = 0
        self.client: bytes | None = None  # behind a trusted proxy: the address it forwarded for
        self.content_length = 0
        self.upgrade_body = False
        self.chunk_overhead = 0
        self.request_done = False
        self.replay: list[bytes] | None = []
        self.replay_bytes = 0
        self.replayed = False
        self.table: RoutingTable | None = None
        self.target_backend: Target | None = None
        self.tried: list[Target] = []
        self.upstream: UpstreamConnection | None = None
        self.counted = False
        self.status = 0
        self.batch: list[bytes] | None = None
        self.batch_mark = 0
        self.response_mode = RESP_NONE
        self.response_bytes = 0
        self.until_close = False
        self.keep_client = True
        self.generated = False
        self.set_cookie = b""
        self.tunnel_data = b""

    @property
    def finished(self) -> bool:
        return self.state >= DONE

    # -- request --------------------------------------------------------------------------

    def parse_head(
        self,
        method: bytes,
        version: str,
        keep_alive: bool,
        upgrade: bool,
        ctx: ProxyContext,
        peer: PeerFields,
    ) -> int:
        """Check the request head and prepare what goes upstream; return an error status or 0."""
        self.method = method_name(method)
        self.version = version
        self.keep_alive = keep_alive
        self.head_only = method == b"HEAD"
        if version != "1.1" and version != "1.0":
            return 400
        if method == b"CONNECT":
            return 405
        target = self.target
        authority = None
        if target[:1] != b"/" and not (target == b"*" and method == b"OPTIONS"):
            split = split_absolute_form(target)
            if split is None:
                return 400
            authority, target = split
        override_name = ctx.router.table.override_header
        out: list[bytes] = []
        host = upgrade_value = forwarded_for = None
        tokens: list[bytes] | None = None
        length = 0
        has_length = chunked = False
        fields = peer.fields
        for lname, name, value in self.headers:
            action = fields.get(lname)
            if action is None:
                if lname == override_name:
                    self.override = value
                out.append(name + b": " + value + CRLF)
            elif action == _HOST:
                if host is not None:
                    return 400
                host = value
            elif action == _LENGTH:
                length = int(value)
                has_length = True
            elif action == _TE:
                # llhttp already insists on a final "chunked"; anything but exactly that one
                # coding (odd case, other codings before it) is refused rather than re-framed.
                if value != b"chunked":
                    return 400
                chunked = True
            elif action == _CONNECTION:
                tokens = (tokens or []) + connection_tokens(value)
            elif action == _UPGRADE:
                upgrade_value = value
            elif action == _XFF:
                forwarded_for = value if forwarded_for is None else forwarded_for + b", " + value
            elif action == _COOKIE:
                self.cookie = value if self.cookie is None else self.cookie + b"; " + value
                out.append(name + b": " + value + CRLF)
        if authority is not None:
            host = authority
        elif host is None and version == "1.1":
            return 400
        if host is not None and host not in _VALID_HOSTS and not valid_host(host):
            return 400  # RFC 9112 §3.2: Host is uri-host [":" port], nothing else
        self.host = host
        if tokens and not _CONNECTION_OPTIONS.issuperset(tokens):
            # Rare: drop the fields the client's Connection header names (RFC 9110 §7.6.1).
            named = set(tokens)
            out = [
                name + b": " + value + CRLF
                for lname, name, value in self.headers
                if lname not in named and fields.get(lname, _COOKIE) == _COOKIE
            ]
        limit = ctx.settings.max_body_bytes
        if chunked:
            self.body_mode = BODY_CHUNKED
        elif length:
            if limit is not None and length > limit:
                return 413
            self.body_mode = BODY_LENGTH
            self.content_length = length
        if peer.trusted:
            out.append(peer.trusted_block(self, forwarded_for, host))
        else:
            if forwarded_for is None:
                out.append(peer.forwarded)
            else:
                out.append(peer.forwarded_after(forwarded_for))
            if host is not None:
                out.append(b"X-Forwarded-Host: %s\r\n" % host)
            out.append(peer.real_ip)
        if self.body_mode == BODY_LENGTH or has_length:
            out.append(b"Content-Length: %d\r\n" % length)
        elif self.body_mode == BODY_CHUNKED:
            out.append(b"Transfer-Encoding: chunked\r\n")
        if upgrade and upgrade_value is not None and method == b"GET" and not self.body_mode:
            self.websocket = b"websocket" in upgrade_value.lower()
            if self.websocket:
                out.append(b"Connection: Upgrade\r\nUpgrade: websocket\r\n")
        out.append(CRLF)
        self.request_line = b"%s %s HTTP/1.1\r\nHost: " % (method, target)
        self.middle = b"".join(out)
        return 0

    def note_refused(self, method: bytes | None, version: str | None) -> None:
        """A request refused before its head was checked: keep what was read of it for the
        access log (``method`` once the request line's target began, ``version`` once its
        fields began, the first ``Host`` field)."""
        if self.method == "-" and method is not None:
            self.method = method_name(method)
        if version is not None and not self.head_done:
            self.version = version
        if self.host is None:
            self.host = self.field(b"host")

    def field(self, lname: bytes) -> bytes | None:
        """The first value of a request field (lower-case name), for the access log."""
        for lower, _, value in self.headers:
            if lower == lname:
                return value
        return None

    def request_head(self, target: Target) -> bytes:
        host = target.host_header or self.host or target.backend.authority.encode("idna")
        return b"%s%s\r\n%s" % (self.request_line, host, self.middle)

    def take_replay(self) -> list[bytes]:
        """The body bytes kept for a replay, handed over (and counted afresh as they go)."""
        body = list(self.replay or ())
        self.replay = []
        self.replay_bytes = 0
        return body

    def capture_replay(self, data: bytes, limit: int) -> None:
        """Keep a copy of body bytes sent upstream, while small enough to send again."""
        replay = self.replay
        if replay is None:
            return
        self.replay_bytes += len(data)
        if self.replay_bytes > limit:
            self.replay = None
        else:
            replay.append(data)

    def replayable(self) -> bool:
        """May this request be sent again after a backend took (some of) it?"""
        return self.request_done and self.replay is not None and self.method in IDEMPOTENT_METHODS

    def end_attempt(self) -> None:
        """The current backend no longer holds this request: it leaves its in-flight count."""
        if self.counted and self.target_backend is not None:
            self.target_backend.state.in_flight -= 1
        self.counted = False

    # -- response -------------------------------------------------------------------------

    def response_head(
        self, status: int, headers: list[tuple[bytes, bytes]], closing: bool
    ) -> bytes:
        """The head sent to the client; sets how its body is framed and whether to keep alive."""
        out = [STATUS_LINES.get(status) or status_line(status)]
        length = chunked = False
        tokens = None
        for name, value in headers:
            lname = _RESPONSE_FIELDS.get(name)
            if lname is None:
                lname = _response_field(name)
            if not lname:  # a field forwarded as it is
                out.append(name + b": " + value + CRLF)
                continue
            if lname in HOP_BY_HOP:
                if lname == b"transfer-encoding":
                    # RFC 9112 §6.1: tdproxy decodes "chunked" and re-frames the body; any other
                    # coding would reach the client still applied, with no header to say so.
                    if connection_tokens(value) != [b"chunked"]:
                        raise BadResponse("transfer-encoding other than chunked")
                    chunked = True
                elif lname == b"connection" and value.lower() not in _CONNECTION_OPTIONS:
                    # A plain "keep-alive" or "close" names no field; anything else may.
                    tokens = (tokens or []) + connection_tokens(value)
                continue
            length = True  # the one other field that matters here: Content-Length
            out.append(name + b": " + value + CRLF)
        http11 = self.version == "1.1"
        if self.head_only or status == 204 or status == 304:
            mode = RESP_NONE
        elif chunked or not length:
            self.until_close = not chunked
            mode = RESP_CHUNKED if http11 else RESP_CLOSE
        else:
            mode = RESP_LENGTH
        drop = set(tokens) - _CONNECTION_OPTIONS if tokens else None
        if length and mode != RESP_LENGTH and mode != RESP_NONE:
            drop = drop or set()
            drop.add(b"content-length")  # the body is re-framed
        if drop:
            # Rare: fields named in Connection, or a length the new framing replaces.
            out = [out[0]]
            out.extend(
                name + b": " + value + CRLF
                for name, value in headers
                if name.lower() not in HOP_BY_HOP and name.lower() not in drop
            )
        self.response_mode = mode
        keep = self.keep_alive and not closing and mode != RESP_CLOSE
        self.keep_client = keep
        if not keep:
            out.append(b"Connection: close\r\n")
        elif not http11:
            out.append(b"Connection: keep-alive\r\n")
        if mode == RESP_CHUNKED:
            out.append(b"Transfer-Encoding: chunked\r\n")
        if self.set_cookie:
            out.append(self.set_cookie)
        out.append(CRLF)
        return b"".join(out)

    def __repr__(self) -> str:
        return (
            f"<Exchange {self.method} {self.target[:60]!r} {exchange_state_name(self.state)} "
            f"status={self.status}>"
        )
