"""One HTTP/2 stream: one exchange, carried to a backend over the HTTP/1.1 keep-alive pools.

Theory of operation
-------------------
An :class:`H2Stream` is to an HTTP/2 request what a :class:`ClientConnection` is to an HTTP/1.1
one: it holds the stream's single :class:`Exchange`, chooses, connects and retries through the
shared :class:`BackendDispatch`, and is the :class:`UpstreamClient` its backend connection
reports to. Routing, sticky cookies, overrides, retries, limits, timeouts, forwarded fields,
metrics and the access log are therefore the HTTP/1.1 ones; only the framing differs.

The request is translated once (:func:`request_exchange`): pseudo-fields become the request line
and ``Host``, every name and value is checked for bytes that HTTP/1.1 would read as framing
(RFC 9113 §8.2.1), and a body without ``content-length`` is sent upstream chunked.

Flow control is backpressure in both directions:

* request body: received bytes are acknowledged (the client's window reopened) only once the
  backend connection has taken them, so a client can never have more than its stream window
  buffered here, and a slow backend slows the upload;
* response body: data goes out only as far as the client's window allows; the rest (at most
  one backend read) waits in ``_out``, and reading from the backend pauses until the client
  opens its window again. ``client_send`` bounds how long a stream may wait for that.

The answer's head is held until the end of the backend read that brought it (``begin_batch`` /
``flush_batch``), so a response that breaks within that read can still become a clean 502 or a
retry, as on HTTP/1.1. The exchange ends (counted, logged) when the backend's answer ends; the
stream stays until the last of it has been sent to the client.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from h2.errors import ErrorCodes
from h2.exceptions import ProtocolError

from tdproxy.dataplane.client_io import INF, PAUSE_BUFFER
from tdproxy.dataplane.dispatch import REPLAY_LIMIT, BackendDispatch, account
from tdproxy.dataplane.errors import BadResponse
from tdproxy.dataplane.exchange import BODY_CHUNKED, Exchange, PeerFields
from tdproxy.dataplane.http import HOP_BY_HOP, LAST_CHUNK, connection_tokens, error_body
from tdproxy.dataplane.lifecycle import ABORTED, DONE, RELAYING, WAITING, exchange_state_name
from tdproxy.dataplane.upstream import UpstreamConnection

if TYPE_CHECKING:
    from tdproxy.dataplane.context import ProxyContext
    from tdproxy.dataplane.h2_server import H2ClientConnection

log = logging.getLogger("tdproxy.dataplane")

# Bytes allowed in a field name: lower-case tchar (RFC 9110 §5.6.2); HTTP/2 forbids upper case.
_NAME_CHARS = b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyz"
# Bytes never allowed in a field value (RFC 9113 §8.2.1): they would end the line upstream.
_VALUE_FORBIDDEN = b"\r\n\x00"
# Bytes never allowed in a method or a path: controls, space, DEL.
_TARGET_FORBIDDEN = bytes(range(0x21)) + b"\x7f"
_STATUS = {code: b"%d" % code for code in range(100, 600)}
_ERROR_FIELDS = [
    (b"content-type", b"text/plain; charset=utf-8"),
    (b"cache-control", b"no-store"),
]


def request_exchange(
    headers: list[tuple[bytes, bytes]],
    body_follows: bool,
    ctx: ProxyContext,
    peer: PeerFields,
) -> tuple[Exchange, int]:
    """An HTTP/2 request head as an exchange, and the status that refuses it (0: none)."""
    exchange = Exchange()
    method = path = authority = None
    fields: list[tuple[bytes, bytes, bytes]] = []
    cookies: list[bytes] = []
    size = 0
    has_length = False
    settings = ctx.settings
    for name, value in headers:
        size += len(name) + len(value) + 4
        if value.translate(None, _VALUE_FORBIDDEN) != value:
            return exchange, 400
        if name[:1] == b":":
            if name == b":method":
                method = value
            elif name == b":path":
                path = value
            elif name == b":authority":
                authority = value
            continue  # :scheme and :protocol say nothing the backend needs
        if name.translate(None, _NAME_CHARS):
            return exchange, 400
        if name == b"cookie":
            cookies.append(value)  # RFC 9113 §8.2.3: one field again for HTTP/1.1
            continue
        if name == b"content-length":
            has_length = True
        elif name == b"host" and authority is not None:
            continue  # :authority wins (RFC 9113 §8.3.1)
        fields.append((name, name, value))
    if method is None or not method or method.translate(None, _TARGET_FORBIDDEN) != method:
        return exchange, 400
    exchange.method = method.decode("ascii", "replace")
    if path is not None:
        if path.translate(None, _TARGET_FORBIDDEN) != path:
            return exchange, 400
        exchange.target = path
        if len(path) > settings.max_url_bytes:
            return exchange, 414
    if len(fields) > settings.max_headers or size > settings.max_header_bytes:
        return exchange, 431
    if authority is not None:
        fields = [f for f in fields if f[0] != b"host"]
        fields.append((b"host", b"Host", authority))
    if cookies:
        fields.append((b"cookie", b"Cookie", b"; ".join(cookies)))
    if body_follows and not has_length:
        fields.append((b"transfer-encoding", b"Transfer-Encoding", b"chunked"))
    exchange.headers = fields
    exchange.head_done = True
    code = exchange.parse_head(method, "1.1", True, False, ctx, peer)
    exchange.version = "2.0"
    if code == 0 and path is None:
        code = 405 if method == b"CONNECT" else 400
    return exchange, code


def response_fields(
    status: int, headers: list[tuple[bytes, bytes]], exchange: Exchange
) -> list[tuple[bytes, bytes]]:
    """The backend's response head as HTTP/2 fields: connection-specific fields dropped
    (RFC 9113 §8.2.2); records on the exchange whether the body runs until the backend closes."""
    out = [(b":status", _STATUS.get(status) or b"%d" % status)]
    named: list[bytes] | None = None
    length = chunked = False
    for name, value in headers:
        lname = name.lower()
        if lname in HOP_BY_HOP:
            if lname == b"transfer-encoding":
                if connection_tokens(value) != [b"chunked"]:
                    raise BadResponse("transfer-encoding other than chunked")
                chunked = True
            elif lname == b"connection":
                named = (named or []) + connection_tokens(value)
            continue
        if lname == b"content-length":
            length = True
        out.append((lname, value))
    if named:
        out = [field for field in out if field[0] not in named]
    if exchange.set_cookie:
        out.append((b"set-cookie", exchange.set_cookie[12:-2]))  # "Set-Cookie: " ... CRLF
    exchange.until_close = not (length or chunked)
    return out


class H2Stream(BackendDispatch):
    """One client stream and its exchange; see the module's theory of operation."""

    __slots__ = (
        "_head",
        "_head_sent",
        "_out",
        "_out_end",
        "batching",
        "body_deadline",
        "closed",
        "conn",
        "exchange",
        "id",
        "progress",
        "send_deadline",
        "unacked",
        "upstream_paused",
    )

    def __init__(self, conn: H2ClientConnection, stream_id: int, exchange: Exchange) -> None:
        super().__init__(conn.ctx)
        self.conn = conn
        self.id = stream_id
        self.exchange = exchange
        self._active = exchange  # None once the exchange has ended
        self._head: list[tuple[bytes, bytes]] | None = None  # held until the read ends
        self._head_sent = False
        self._out = bytearray()  # response bytes the client's window has no room for yet
        self._out_end = False  # the response is complete: end the stream after _out
        self.batching = False
        self.closed = False  # the stream is over here (ended, reset, or lost)
        self.upstream_paused = False  # the backend's write buffer is full
        self.unacked = 0  # request body bytes received and not yet acknowledged
        self.progress = self.ctx.clock.now
        self.body_deadline = INF  # client_body while the request body is arriving
        self.send_deadline = INF  # client_send while the client's window is shut

    # -- the request side ---------------------------------------------------------------------

    def start(self) -> None:
        exchange = self.exchange
        if not exchange.request_done:
            self.body_deadline = self.ctx.clock.now + self.ctx.settings.client_body
        self._route(exchange)

    def receive_body(self, data: bytes, flow_length: int) -> None:
        exchange = self.exchange
        self.progress = now = self.ctx.clock.now
        if self._active is None or exchange.request_done:
            self.conn.acknowledge(self.id, flow_length)  # answered already: discarded
            return
        exchange.body_received += len(data)
        limit = self.ctx.settings.max_body_bytes
        if limit is not None and exchange.body_received > limit:
            self.conn.acknowledge(self.id, flow_length)
            self._refuse(413)
            return
        if not self.upstream_paused:
            self.body_deadline = now + self.ctx.settings.client_body
        if exchange.body_mode == BODY_CHUNKED:
            data = b"%x\r\n%b\r\n" % (len(data), data)
        up = exchange.upstream
        if up is not None:
            up.write(data)
            exchange.capture_replay(data, REPLAY_LIMIT)
            if self.upstream_paused:
                self.unacked += flow_length
            else:
                self.conn.acknowledge(self.id, flow_length)
            return
        exchange.body.append(data)  # bounded by the stream window: nothing is acknowledged
        exchange.body_buffered += len(data)
        self.unacked += flow_length

    def request_ended(self) -> None:
        exchange = self.exchange
        self.body_deadline = INF
        if self._active is None or exchange.request_done:
            return
        exchange.request_done = True
        if exchange.body_mode == BODY_CHUNKED:
            up = exchange.upstream
            if up is not None:
                up.write(LAST_CHUNK)
                exchange.capture_replay(LAST_CHUNK, REPLAY_LIMIT)
            else:
                exchange.body.append(LAST_CHUNK)
        if exchange.state == WAITING and not self.write_paused:
            exchange.deadline = self.ctx.clock.now + self.ctx.settings.response_header

    def _set_pause(self, bit: int, on: bool) -> None:
        """BackendDispatch sent the buffered body upstream: reopen the window it held."""
        if bit == PAUSE_BUFFER and not on and self.unacked and not self.upstream_paused:
            self._acknowledge_body()

    def _acknowledge_body(self) -> None:
        unacked, self.unacked = self.unacked, 0
        self.conn.acknowledge(self.id, unacked)

    # -- events from the upstream (UpstreamClient) ----------------------------------------------

    def begin_batch(self) -> bool:
        self.batching = True
        return True

    def flush_batch(self) -> None:
        self.batching = False
        self.send()

    def upstream_head(
        self, up: UpstreamConnection, status: int, headers: list[tuple[bytes, bytes]]
    ) -> None:
        exchange = self._active
        if exchange is None or exchange.upstream is not up or exchange.state != WAITING:
            up.abort()
            self.bug("upstream head outside WAITING")
            return
        if status < 200:
            if status == 101:
                self.upstream_failed(up, "protocol")  # HTTP/2 has no upgrade
                return
            self.conn.informational(self.id, status, headers)
            exchange.deadline = self.ctx.clock.now + self.ctx.settings.response_header
            return
        self._head = response_fields(status, headers, exchange)
        exchange.status = status
        exchange.state = RELAYING  # WAITING -> RELAYING, checked above
        if exchange.head_only or status == 204 or status == 304:
            exchange.until_close = False
        exchange.deadline = (
            INF if self.write_paused else self.ctx.clock.now + self.ctx.settings.response_header
        )
        if not self.batching:
            self.send()

    def upstream_body(self, body: bytes) -> None:
        exchange = self._active
        if exchange is None or exchange.state != RELAYING:
            self.bug("upstream body outside RELAYING")
            return
        exchange.response_bytes += len(body)
        if not self.write_paused:
            exchange.deadline = self.ctx.clock.now + self.ctx.settings.response_header
        self._out += body
        if not self.batching:
            self.send()

    def upstream_done(self, up: UpstreamConnection, keep_alive: bool) -> None:
        exchange = self._active
        if exchange is None or exchange.upstream is not up or exchange.state != RELAYING:
            up.abort()
            self.bug("upstream end of response outside RELAYING")
            return
        exchange.upstream = None
        exchange.deadline = INF
        if keep_alive and exchange.request_done and not exchange.until_close:
            up.release(self.ctx.clock.now)
        else:
            up.detach()
        self._out_end = True
        self._finish(exchange, DONE, keep=True)
        if not self.batching:
            self.send()

    def _take_back_head(self, exchange: Exchange) -> None:
        if not self._head_sent:
            # The head has not left yet (it waits for the end of this read): take it back.
            exchange.state = WAITING  # RELAYING -> WAITING: as if no head had come
            self._head = None
            self._out.clear()
            exchange.response_bytes = 0

    def _cut(self, exchange: Exchange) -> None:
        self._finish(exchange, ABORTED, keep=False)
        self.reset(ErrorCodes.INTERNAL_ERROR)

    def upstream_upgraded(self, up: UpstreamConnection, rest: bytes) -> bool:
        return False  # never asked for: an HTTP/2 request carries no Upgrade

    def upstream_write_paused(self, up: UpstreamConnection, paused: bool) -> None:
        """The backend's write buffer filled (or drained): stop reopening the client's window
        meanwhile, and give the backend ``response_header`` to take what waits."""
        self.upstream_paused = paused
        exchange = self._active
        if exchange is not None and not exchange.request_done:
            # The client cannot send while its window is held: not the client's delay.
            self.body_deadline = (
                INF if paused else self.ctx.clock.now + self.ctx.settings.client_body
            )
        if not paused and self.unacked:
            self._acknowledge_body()
            self.conn.flush()
        if exchange is None or exchange.upstream is not up or exchange.state != WAITING:
            return
        if paused:
            exchange.deadline = self.ctx.clock.now + self.ctx.settings.response_header
        elif not exchange.request_done:
            exchange.deadline = INF

    # -- answering ----------------------------------------------------------------------------

    def _respond_error(self, exchange: Exchange, code: int) -> None:
        body = error_body(code)
        up = exchange.upstream
        if up is not None:
            exchange.upstream = None
            up.abort()
        exchange.status = code
        exchange.generated = True
        exchange.response_bytes = len(body)
        self._head = [
            (b":status", _STATUS[code]),
            *_ERROR_FIELDS,
            (b"content-length", b"%d" % len(body)),
        ]
        self._out = bytearray(body)
        self._out_end = True
        self._finish(exchange, DONE, keep=True)
        if not self.batching:
            self.send()

    def _refuse(self, code: int) -> None:
        """Refuse the request mid-body: an error answer if none has begun, else a reset."""
        exchange = self._active
        if exchange is None:
            return
        if exchange.state == RELAYING or self._head_sent:
            self._finish(exchange, ABORTED, keep=False)
            self.reset(ErrorCodes.CANCEL)
        else:
            self._respond_error(exchange, code)

    def _finish(self, exchange: Exchange, state: int, keep: bool) -> None:
        if not self._enter(exchange, state):
            return
        exchange.deadline = INF
        self._active = None
        account(self.ctx, exchange, self.conn.peer)

    def send(self) -> None:
        """Send what the client's window allows; hold the backend back while data waits."""
        conn = self.conn
        if self.closed or conn.closed:
            return
        h2 = conn.h2
        stream_id = self.id
        out = self._out
        try:
            head = self._head
            if head is not None:
                self._head = None
                self._head_sent = True
                end = self._out_end and not out
                h2.send_headers(stream_id, head, end_stream=end)
                if end:
                    self._ended()
                    return
            while out and not conn.write_paused:
                room = min(h2.local_flow_control_window(stream_id), h2.max_outbound_frame_size)
                if room <= 0:
                    break
                chunk = bytes(out[:room])
                del out[:room]
                end = self._out_end and not out
                h2.send_data(stream_id, chunk, end_stream=end)
                if end:
                    self._ended()
                    return
            if self._out_end and not out and self._head_sent:
                h2.end_stream(stream_id)  # the last data left before the end was known
                self._ended()
                return
        except ProtocolError:
            self.lost()  # the stream closed under us (the client reset it)
            return
        finally:
            conn.flush()
        self._hold(bool(out))

    def _hold(self, blocked: bool) -> None:
        """Pause the backend while data waits for the client's window (or the connection's
        write buffer); client_send bounds the wait."""
        if blocked == self.write_paused:
            return
        self.write_paused = blocked
        exchange = self._active
        up = exchange.upstream if exchange is not None else None
        if blocked:
            self.send_deadline = self.ctx.clock.now + self.ctx.settings.client_send
            if exchange is not None and exchange.state in (WAITING, RELAYING):
                exchange.deadline = INF  # the client is slow, not the backend
        else:
            self.send_deadline = INF
            self.progress = self.ctx.clock.now
            if exchange is not None and exchange.state == RELAYING:
                exchange.deadline = self.ctx.clock.now + self.ctx.settings.response_header
        if up is not None:
            up.set_reading(not blocked)

    def _ended(self) -> None:
        """The whole answer has been handed to the connection: the stream is done here."""
        conn = self.conn
        if not self.exchange.request_done and self._active is None:
            # Answered before the client finished its body: tell it to stop (RFC 9113 §8.1).
            conn.reset_stream(self.id, ErrorCodes.NO_ERROR)
        self._close(answered=True)

    def _close(self, answered: bool = False) -> None:
        if not self.closed:
            self.closed = True
            self.conn.stream_done(self, answered)

    # -- ending ---------------------------------------------------------------------------------

    def reset(self, code: int) -> None:
        """End the stream now, in whatever state, with RST_STREAM ``code``."""
        if self.closed:
            return
        self._abandon(499)
        self.conn.reset_stream(self.id, code)
        self._close()

    def lost(self) -> None:
        """The client reset the stream, or the connection is gone."""
        self._abandon(499)
        self._close()

    def _abandon(self, status: int) -> None:
        exchange = self._active
        if exchange is None:
            return
        up = exchange.upstream
        if up is not None:
            exchange.upstream = None
            up.abort()
        if exchange.state != RELAYING:
            exchange.status = status  # the client left before any answer
        self._finish(exchange, ABORTED, keep=False)

    def bug(self, what: str) -> None:
        log.error(
            "bug: %s on stream %d from %s; resetting it", what, self.id, self.conn.peer.decode()
        )
        self._abandon(500)
        if not self.closed:
            self.conn.reset_stream(self.id, ErrorCodes.INTERNAL_ERROR)
        self._close()

    def check_deadline(self, now: float) -> None:
        exchange = self._active
        if exchange is not None and exchange.deadline <= now:
            up = exchange.upstream
            if up is not None:
                self.upstream_failed(up, "timeout")
            else:
                self.bug(f"deadline of an exchange in state {exchange_state_name(exchange.state)}")
        elif self.send_deadline <= now:
            log.info(
                "client %s took no data on stream %d for %gs (timeouts.client_send): resetting",
                self.conn.peer.decode(),
                self.id,
                self.ctx.settings.client_send,
            )
            self.reset(ErrorCodes.CANCEL)
        elif self.body_deadline <= now:
            self.body_deadline = INF
            self._refuse(408)

    def __repr__(self) -> str:
        return f"<H2Stream {self.id} {self.exchange!r}>"


if TYPE_CHECKING:
    from tdproxy.dataplane.client import ClientConnection
    from tdproxy.dataplane.upstream import UpstreamClient

    def _conforms(stream: H2Stream, client: ClientConnection) -> list[UpstreamClient]:
        """Both carriers are what an upstream connection reports to (checked by mypy)."""
        return [stream, client]
