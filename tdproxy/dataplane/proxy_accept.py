"""The accept path used when ``entrypoint.proxy_protocol`` is on: a PROXY header, then HTTP.

Theory of operation
-------------------
The header comes before anything else on the connection, including a TLS handshake, and asyncio
cannot hand bytes it has already read to a TLS transport. So the header is taken off the socket
*before* asyncio owns it, and never a byte more:

1. :class:`ProxyProtocolListener` owns its listening sockets and accepts with ``accept()`` when
   the loop reports them readable. A connection beyond ``limits.max_connections`` (those waiting
   for their header count too), during shutdown, or from a peer outside
   ``entrypoint.trusted_proxies`` (when set) is closed at once, without a response.
2. A :class:`PendingHeader` waits for the socket to be readable, peeks at what arrived
   (``MSG_PEEK``, at most ``MAX_HEADER`` bytes) and asks :func:`parse_header`. While the header
   is incomplete every byte peeked belongs to it, so those are taken off (``recv(n)`` of exactly
   that many) and the wait goes on; once it is complete exactly its remaining bytes are taken
   off. Whatever followed stays in the socket's receive buffer.
3. The socket is handed to ``loop.connect_accepted_socket`` (with the entrypoint's TLS context,
   if any) and served by a :class:`~tdproxy.dataplane.client.ClientConnection` that is told the
   client's address from the header (or the peer's own, for LOCAL and UNKNOWN/UNSPEC headers).

Bounds: the header must arrive whole within ``timeouts.client_header`` of the accept, else the
connection is closed; an invalid header (see :mod:`tdproxy.dataplane.proxy_protocol`) closes it
at once. Nothing is ever written to a connection before its header is valid.

The plain accept path (``loop.create_server``) is not involved: with ``proxy_protocol`` off this
module is not used at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Callable

from tdproxy.dataplane.client import ClientConnection
from tdproxy.dataplane.context import ProxyContext
from tdproxy.dataplane.proxy_protocol import MAX_HEADER, ProxyProtocolError, parse_header

log = logging.getLogger("tdproxy.entrypoint")

ACCEPTS_PER_WAKEUP = 64  # connections taken per readiness event, so one listener cannot starve
BACKLOG = 2048

ConnectionFactory = Callable[[ProxyContext, bytes | None], ClientConnection]


class PendingHeader:
    """An accepted socket whose PROXY header has not arrived whole yet."""

    __slots__ = ("fd", "peer", "read", "sock", "timer")

    def __init__(self, sock: socket.socket, peer: str) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.peer = peer
        self.read = b""  # header bytes already taken off the socket
        self.timer: asyncio.TimerHandle | None = None

    def __repr__(self) -> str:
        return f"<PendingHeader {self.peer} read={len(self.read)}>"


class ProxyProtocolListener:
    """Listening sockets whose connections must begin with a PROXY protocol header."""

    def __init__(
        self,
        ctx: ProxyContext,
        address: str,
        port: int,
        ssl_context: ssl.SSLContext | None,
        factory: ConnectionFactory = ClientConnection,
        *,
        reuse_port: bool = False,
    ) -> None:
        self.ctx = ctx
        self.reuse_port = reuse_port  # worker processes each listen on the same port
        self.address = address
        self.port = port
        self.ssl_context = ssl_context
        self.factory = factory
        self.sockets: list[socket.socket] = []
        self._pending: dict[int, PendingHeader] = {}

    async def start(self) -> None:
        loop = self.ctx.loop
        infos = await loop.getaddrinfo(
            self.address or None,
            self.port,
            family=socket.AF_UNSPEC,
            type=socket.SOCK_STREAM,
            flags=socket.AI_PASSIVE,
        )
        seen = set()
        try:
            for family, kind, proto, _, sockaddr in infos:
                if (family, sockaddr) in seen:
                    continue
                seen.add((family, sockaddr))
                sock = socket.socket(family, kind, proto)
                self.sockets.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if self.reuse_port:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if family == socket.AF_INET6:
                    # As loop.create_server does: an IPv6 listener takes IPv6 only.
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(sockaddr)
                sock.listen(BACKLOG)
                sock.setblocking(False)
        except OSError:
            self.close()
            raise
        if self.sockets and self.port == 0:
            self.port = self.sockets[0].getsockname()[1]
        for sock in self.sockets:
            loop.add_reader(sock.fileno(), self._accept, sock)

    # -- accepting ----------------------------------------------------------------------------

    def _accept(self, listener: socket.socket) -> None:
        for _ in range(ACCEPTS_PER_WAKEUP):
            try:
                sock, peer = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # out of descriptors, say: the listener stays, we go on
                log.warning("accept failed: %s", exc)
                return
            self._admit(sock, str(peer[0]) if isinstance(peer, tuple) else "-")

    def _admit(self, sock: socket.socket, peer: str) -> None:
        ctx = self.ctx
        if ctx.shutting_down or len(ctx.connections) + len(self._pending) >= ctx.max_connections:
            sock.close()
            return
        trusted = ctx.trusted_proxies
        if trusted is not None and not trusted.trusts_name(peer):
            # Only the balancers may say who the client is (entrypoint.trusted_proxies).
            log.info("connection from %s closed: not in entrypoint.trusted_proxies", peer)
            sock.close()
            return
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        pending = PendingHeader(sock, peer)
        self._pending[pending.fd] = pending
        loop = ctx.loop
        pending.timer = loop.call_later(ctx.settings.client_header, self._expire, pending)
        loop.add_reader(pending.fd, self._readable, pending)

    def _readable(self, pending: PendingHeader) -> None:
        sock = pending.sock
        try:
            peeked = sock.recv(MAX_HEADER - len(pending.read), socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(pending, None)
            return
        if not peeked:
            # Connected and closed with nothing said (a TCP health check, a port probe) is
            # not worth a log line; a header cut short is.
            cut = "closed before its PROXY protocol header was complete"
            self._drop(pending, cut if pending.read else None)
            return
        data = pending.read + peeked
        try:
            header = parse_header(data)
        except ProxyProtocolError as exc:
            self._drop(pending, str(exc))
            return
        take = len(peeked) if header is None else header.length - len(pending.read)
        try:
            taken = sock.recv(take)
        except OSError:
            self._drop(pending, None)
            return
        if len(taken) != take:  # cannot happen: the bytes were just peeked
            self._drop(pending, "the socket gave back fewer bytes than it showed")
            return
        if header is None:
            pending.read += taken
            return
        source = header.source
        self._forget(pending)
        named = source[0].encode() if source is not None else pending.peer.encode()
        self.ctx.spawn(self._serve(sock, named))

    async def _serve(self, sock: socket.socket, peer: bytes) -> None:
        ctx = self.ctx
        factory = self.factory
        try:
            await ctx.loop.connect_accepted_socket(
                lambda: factory(ctx, peer), sock=sock, ssl=self.ssl_context
            )
        except OSError as exc:  # the TLS handshake failed, the peer left, ...: not served
            log.debug("connection from %s ended before it was served: %s", peer.decode(), exc)
            sock.close()
        except asyncio.CancelledError:
            sock.close()
            raise

    # -- ending -------------------------------------------------------------------------------

    def _expire(self, pending: PendingHeader) -> None:
        pending.timer = None
        self._drop(pending, "no complete PROXY protocol header within timeouts.client_header")

    def _drop(self, pending: PendingHeader, reason: str | None) -> None:
        if reason is not None:
            log.info("connection from %s closed: %s", pending.peer, reason)
        self._forget(pending)
        pending.sock.close()

    def _forget(self, pending: PendingHeader) -> None:
        if self._pending.pop(pending.fd, None) is None:
            return
        self.ctx.loop.remove_reader(pending.fd)
        if pending.timer is not None:
            pending.timer.cancel()
            pending.timer = None

    def close(self) -> None:
        """Stop accepting and close every connection still waiting for its header."""
        loop = self.ctx.loop
        for sock in self.sockets:
            with contextlib.suppress(ValueError, OSError):
                loop.remove_reader(sock.fileno())
            sock.close()
        self.sockets = []
        for pending in list(self._pending.values()):
            self._drop(pending, None)

    @property
    def pending(self) -> int:
        return len(self._pending)
