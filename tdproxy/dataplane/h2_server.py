"""An HTTP/2 client connection (TLS with ALPN ``h2``): frames in, streams out.

Theory of operation
-------------------
The TLS entrypoint offers ``h2`` by ALPN when ``entrypoint.http2`` is on. A connection that
chose it starts as a :class:`~tdproxy.dataplane.client.ClientConnection`, which hands its
transport to an :class:`H2ClientConnection` as soon as it is made. The frame layer is the
``h2`` package (sans-I/O); this class feeds it bytes, turns its events into work for
:class:`~tdproxy.dataplane.h2_stream.H2Stream` objects (one per request stream), and writes
what it has to send once per read.

Hostile input is bounded here:

* at most ``MAX_CONCURRENT_STREAMS`` streams at once (a client that opens more breaks the
  protocol and the connection is closed);
* the decoded header list of a request is at most ``MAX_HEADER_LIST`` bytes (``h2``'s HPACK
  decoder enforces it while inflating, so a compression bomb stops early) and CONTINUATION
  frames per header block are capped by ``h2``;
* streams the client resets before they are answered (the "rapid reset" attack), and control
  frames (PING, SETTINGS, PRIORITY, empty DATA) are counted; past their limits the connection
  gets GOAWAY ``ENHANCE_YOUR_CALM`` and is closed;
* while the connection's write buffer is full, reading pauses (nothing the client sends can
  make tdproxy queue answers without bound), and ``client_send`` bounds the wait.

Deadlines: ``idle`` while no stream is open; each stream has its own (see H2Stream); the sweeper
calls :meth:`check_deadline` as for HTTP/1.1 connections. Shutdown sends GOAWAY naming the last
stream taken, lets those finish within the grace, and closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import cast

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    PingReceived,
    PriorityUpdated,
    RemoteSettingsChanged,
    RequestReceived,
    StreamEnded,
    StreamReset,
    WindowUpdated,
)
from h2.exceptions import ProtocolError
from h2.settings import SettingCodes, Settings
from hyperframe.frame import GoAwayFrame

from tdproxy.dataplane.client_io import INF
from tdproxy.dataplane.context import ProxyContext
from tdproxy.dataplane.exchange import PeerFields
from tdproxy.dataplane.h2_stream import H2Stream, request_exchange
from tdproxy.dataplane.http import HOP_BY_HOP

log = logging.getLogger("tdproxy.dataplane")

MAX_CONCURRENT_STREAMS = 128
MAX_HEADER_LIST = 65536
# The client's send window per stream: what one stream may have in flight towards a backend
# that has not taken it yet.
STREAM_WINDOW = 256 * 1024
CONNECTION_WINDOW = 1024 * 1024
# Streams the client may reset before they are answered, beyond the streams it let finish.
RESET_ALLOWANCE = 200
# Control frames (PING, SETTINGS, PRIORITY, empty DATA) per sweep interval.
CONTROL_FRAME_LIMIT = 500


_SETTINGS = {
    SettingCodes.MAX_CONCURRENT_STREAMS: MAX_CONCURRENT_STREAMS,
    SettingCodes.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST,
    SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
    SettingCodes.ENABLE_CONNECT_PROTOCOL: 0,  # no WebSockets over HTTP/2 (RFC 8441)
}


def _config() -> H2Configuration:
    return H2Configuration(
        client_side=False,
        header_encoding=None,
        validate_inbound_headers=True,
        normalize_inbound_headers=True,
        validate_outbound_headers=False,
        normalize_outbound_headers=False,
    )


class H2ClientConnection(asyncio.Protocol):
    __slots__ = (
        "answered",
        "closed",
        "control_frames",
        "ctx",
        "deadline",
        "going_away",
        "h2",
        "peer",
        "peer_fields",
        "progress",
        "resets",
        "send_deadline",
        "streams",
        "transport",
        "write_paused",
    )

    def __init__(self, ctx: ProxyContext, peer: bytes, peer_fields: PeerFields) -> None:
        self.ctx = ctx
        self.peer = peer
        self.peer_fields = peer_fields
        self.transport: asyncio.Transport | None = None
        self.h2 = H2Connection(config=_config())
        self.streams: dict[int, H2Stream] = {}
        self.closed = False
        self.going_away = False
        self.write_paused = False
        self.deadline = ctx.clock.now + ctx.settings.idle
        self.send_deadline = INF
        self.progress = ctx.clock.now
        self.resets = 0  # streams the client reset before they were answered
        self.answered = 0
        self.control_frames = 0

    # -- asyncio.Protocol -----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.ctx.connections.add(self)
        h2 = self.h2
        # In force from the first frame (not pending an acknowledgement), and sent in the preface.
        h2.local_settings = Settings(client=False, initial_values=_SETTINGS)
        h2.initiate_connection()
        h2.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        self.flush()

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        self.progress = self.ctx.clock.now
        try:
            events = self.h2.receive_data(data)
        except ProtocolError as exc:
            log.info("HTTP/2 protocol error from %s: %s; closing", self.peer.decode(), exc)
            self._go_away(ErrorCodes.PROTOCOL_ERROR)
            return
        streams = self.streams
        for event in events:
            if isinstance(event, DataReceived):
                stream = streams.get(event.stream_id)
                if not event.data:
                    self.control_frames += 1
                if stream is not None:
                    stream.receive_body(event.data or b"", event.flow_controlled_length or 0)
                else:
                    self.acknowledge(event.stream_id or 0, event.flow_controlled_length or 0)
            elif isinstance(event, RequestReceived):
                self._request(event)
            elif isinstance(event, StreamEnded):
                stream = streams.get(event.stream_id)
                if stream is not None:
                    stream.request_ended()
            elif isinstance(event, WindowUpdated):
                self._window_opened(event.stream_id or 0)
            elif isinstance(event, StreamReset):
                self._stream_reset(event)
            elif isinstance(event, (PingReceived, RemoteSettingsChanged, PriorityUpdated)):
                self.control_frames += 1
                if isinstance(event, RemoteSettingsChanged):
                    self._window_opened(0)  # the initial window may have grown
            elif isinstance(event, ConnectionTerminated):
                self._client_going_away(event)
            if self.closed:
                return
        if self.control_frames > CONTROL_FRAME_LIMIT:
            log.warning("HTTP/2 control frame flood from %s: closing", self.peer.decode())
            self._go_away(ErrorCodes.ENHANCE_YOUR_CALM)
            return
        self.flush()

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.ctx.connections.discard(self)
        for stream in list(self.streams.values()):
            stream.lost()
        self.streams.clear()

    def pause_writing(self) -> None:
        """The client reads slower than we write: stop reading what it sends (answers to its
        frames would pile up) and stop sending stream data; client_send bounds the wait."""
        self.write_paused = True
        self.send_deadline = self.ctx.clock.now + self.ctx.settings.client_send
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        self.send_deadline = INF
        self.progress = self.ctx.clock.now
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()
        self._window_opened(0)
        self.flush()

    # -- streams --------------------------------------------------------------------------------

    def _request(self, event: RequestReceived) -> None:
        stream_id = event.stream_id or 0
        if self.going_away or self.ctx.shutting_down:
            self.reset_stream(stream_id, ErrorCodes.REFUSED_STREAM)
            return
        exchange, code = request_exchange(
            list(event.headers or ()),
            event.stream_ended is None,
            self.ctx,
            self.peer_fields,
        )
        stream = H2Stream(self, stream_id, exchange)
        self.streams[stream_id] = stream
        self.deadline = INF
        if event.stream_ended is not None:
            exchange.request_done = True
        if code:
            exchange.refusal = code
        stream.start()

    def _stream_reset(self, event: StreamReset) -> None:
        stream = self.streams.get(event.stream_id or 0)
        if stream is None:
            return
        if stream.exchange.status == 0 or not stream.exchange.finished:
            self.resets += 1
        stream.lost()
        if self.resets > RESET_ALLOWANCE + self.answered:
            log.warning("HTTP/2 rapid reset from %s: closing", self.peer.decode())
            self._go_away(ErrorCodes.ENHANCE_YOUR_CALM)

    def _window_opened(self, stream_id: int) -> None:
        if stream_id:
            stream = self.streams.get(stream_id)
            if stream is not None:
                stream.send()
            return
        for stream in list(self.streams.values()):
            if stream.write_paused:
                stream.send()

    def _client_going_away(self, event: ConnectionTerminated) -> None:
        """The client's GOAWAY: it opens no more streams. An error ends everything now."""
        self.going_away = True
        if event.error_code != ErrorCodes.NO_ERROR:
            self.abort()
        elif not self.streams:
            self.close()

    def stream_done(self, stream: H2Stream, answered: bool) -> None:
        """The stream is over here: ``answered`` in full, or reset or lost."""
        if self.streams.pop(stream.id, None) is None:
            return
        if answered:
            self.answered += 1
        if not self.streams:
            if self.going_away or self.ctx.shutting_down:
                self.close()
            else:
                self.deadline = self.ctx.clock.now + self.ctx.settings.idle

    # -- writing --------------------------------------------------------------------------------

    def acknowledge(self, stream_id: int, length: int) -> None:
        """Request bytes have been taken: let the client send as many again."""
        if length and not self.closed:
            self.h2.acknowledge_received_data(length, stream_id)

    def reset_stream(self, stream_id: int, code: int) -> None:
        if self.closed:
            return
        with contextlib.suppress(ProtocolError):  # already closed on both sides
            self.h2.reset_stream(stream_id, code)
        self.flush()

    def informational(
        self, stream_id: int, status: int, headers: list[tuple[bytes, bytes]]
    ) -> None:
        """Forward a 1xx (100 Continue, 103 Early Hints) as an informational head."""
        fields = [(b":status", b"%d" % status)]
        fields.extend((n.lower(), v) for n, v in headers if n.lower() not in HOP_BY_HOP)
        try:
            self.h2.send_headers(stream_id, fields)
        except ProtocolError:
            return
        self.flush()

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data:
            transport = self.transport
            if transport is not None and not transport.is_closing():
                transport.write(data)

    # -- ending ---------------------------------------------------------------------------------

    def _go_away(self, code: int) -> None:
        """End the connection for cause: GOAWAY, then close; streams in progress are reset."""
        with contextlib.suppress(ProtocolError):
            self.h2.close_connection(code, last_stream_id=self.h2.highest_inbound_stream_id)
        self.flush()
        self.close()

    def close(self) -> None:
        """Close once what is owed has been written (the last stream's frames may still be
        in h2's buffer); CLOSING is bounded by client_send."""
        if self.closed:
            return
        self.flush()
        self.closed = True
        for stream in list(self.streams.values()):
            stream.lost()
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.close()
        self.deadline = self.ctx.clock.now + self.ctx.settings.client_send

    def abort(self) -> None:
        self.closed = True
        transport = self.transport
        if transport is not None:
            transport.abort()

    def shutdown(self) -> None:
        """Graceful stop: GOAWAY names the last stream taken; those finish, then close."""
        if self.closed or self.going_away:
            return
        self.going_away = True
        self.flush()
        # Written by hand: h2's close_connection would also forbid the frames still owed to
        # the streams in flight. Streams the client opens after this are refused.
        goaway = GoAwayFrame(0, last_stream_id=self.h2.highest_inbound_stream_id)
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(goaway.serialize())
        if not self.streams:
            self.close()

    def check_deadline(self, now: float) -> None:
        self.control_frames = 0
        if self.closed:
            if self.deadline <= now:
                self.abort()  # the last bytes never left
            return
        if self.send_deadline <= now:
            log.info(
                "client %s accepted no bytes for %gs (timeouts.client_send): closing",
                self.peer.decode(),
                self.ctx.settings.client_send,
            )
            self.abort()
            return
        for stream in list(self.streams.values()):
            stream.check_deadline(now)
        if not self.streams and self.deadline <= now:
            self.shutdown()
            self.close()

    def __repr__(self) -> str:
        return f"<H2ClientConnection {self.peer.decode()} streams={len(self.streams)}>"
