"""One end of a supervisor-worker socketpair on the event loop: never blocks, either way.

Writes go into the transport's buffer (the loop sends them when the socket can take them), so a
peer that reads slowly costs memory, never the loop's time; reads arrive as callbacks. A broken
stream (bad framing, an unpicklable frame) is treated as the peer being gone: the channel is
closed and ``on_lost`` runs once.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from typing import cast

from tdproxy.workers.messages import FrameDecoder, Message, encode

log = logging.getLogger("tdproxy.workers")


class Channel(asyncio.Protocol):
    def __init__(
        self, on_message: Callable[[Message], None], on_lost: Callable[[], None], name: str
    ) -> None:
        self._on_message = on_message
        self._on_lost = on_lost
        self.name = name
        self._decoder = FrameDecoder()
        self._transport: asyncio.Transport | None = None
        self._lost = False
        self._closed = asyncio.get_running_loop().create_future()

    @classmethod
    async def open(
        cls,
        sock: socket.socket,
        on_message: Callable[[Message], None],
        on_lost: Callable[[], None],
        name: str,
    ) -> Channel:
        loop = asyncio.get_running_loop()
        sock.setblocking(False)
        _, channel = await loop.connect_accepted_socket(
            lambda: cls(on_message, on_lost, name), sock
        )
        return channel

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transport for a Unix socket is a write transport without the ABC's name.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            messages = self._decoder.feed(data)
        except Exception as exc:
            log.error("%s: broken message stream (%s): closing it", self.name, exc)
            self.close()
            return
        for message in messages:
            if self._lost:
                return
            self._on_message(message)

    def eof_received(self) -> bool:
        return False  # close our end too

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        if not self._closed.done():
            self._closed.set_result(None)
        if not self._lost:
            self._lost = True
            self._on_lost()

    async def wait_closed(self) -> None:
        await asyncio.shield(self._closed)

    @property
    def is_open(self) -> bool:
        return self._transport is not None and not self._lost

    def send(self, message: Message) -> bool:
        """Queue ``message``; False when the channel is already gone."""
        transport = self._transport
        if transport is None or self._lost or transport.is_closing():
            return False
        transport.write(encode(message))
        return True

    def buffered(self) -> int:
        """Bytes written but not yet taken by the peer."""
        transport = self._transport
        return transport.get_write_buffer_size() if transport is not None else 0

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def __repr__(self) -> str:
        return f"<Channel {self.name} {'open' if self.is_open else 'closed'}>"
