"""A raw TCP (or TLS) backend that answers each request path with scripted bytes: responses no
real HTTP library would produce, and connections that hang, reset, or close at a chosen moment.

It runs an asyncio server in a thread of the test process, and records, per connection, the
request paths it read and whether the connection is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import struct
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field


class Hang:
    """Script step: wait until the peer closes the connection."""


class Reset:
    """Script step: abort the connection with a TCP RST."""


class Close:
    """Script step: close the connection (FIN)."""


class Linger:
    """Script step: a lingering close: send FIN, then read (and drop) what the peer still sends
    until it closes too, or for at most ``LINGER_TIMEOUT`` seconds; unread request bytes then
    cannot turn the FIN into an RST that would destroy the response on its way."""


class AwaitData:
    """Script step: wait until the peer sends more bytes on this connection (they are kept and
    read as the start of the next request), or closes it, which ends the script there."""


@dataclass(frozen=True)
class Gate:
    """Script step: wait until the test calls ``ScriptedBackend.open_gate(name)``."""

    name: str


Step = bytes | Hang | Reset | Close | Linger | AwaitData | Gate
HANG, RESET, CLOSE, LINGER, AWAIT_DATA = Hang(), Reset(), Close(), Linger(), AwaitData()
LINGER_TIMEOUT = 5.0
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Scripted: ok\r\n\r\nok"


@dataclass
class ConnectionRecord:
    """One accepted connection: the request paths read on it, and whether it is closed."""

    paths: list[str] = field(default_factory=list)
    closed: bool = False
    pending: bytearray = field(default_factory=bytearray)  # read by AwaitData, not yet parsed


class ScriptedBackend:
    """A raw TCP (or TLS) server on 127.0.0.1, run by an event loop in its own thread.

    For each request head it reads, it plays the script for the request path (any other path
    gets ``OK``), then reads the next request on the same connection unless the script ended
    it. Request bodies are not read: tests send requests without one.
    """

    def __init__(
        self,
        scripts: Mapping[str, Sequence[Step]],
        *,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.scripts = dict(scripts)
        self.connections: list[ConnectionRecord] = []
        self._ssl = ssl_context
        self._gates = {
            step.name: asyncio.Event()
            for steps in self.scripts.values()
            for step in steps
            if isinstance(step, Gate)
        }
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def _start(self) -> asyncio.Server:
        return await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self._ssl)

    def url(self, scheme: str = "http", host: str = "127.0.0.1") -> str:
        return f"{scheme}://{host}:{self.port}"

    def open_gate(self, name: str) -> None:
        self._loop.call_soon_threadsafe(self._gates[name].set)

    def connections_serving(self, path: str) -> list[ConnectionRecord]:
        return [record for record in list(self.connections) if path in record.paths]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        record = ConnectionRecord()
        self.connections.append(record)
        try:
            while await self._exchange(record, reader, writer):
                pass
        except (ConnectionError, ssl.SSLError):
            record.closed = True
        finally:
            self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _exchange(
        self, record: ConnectionRecord, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        """Read one request head and play its script; False when the connection is done."""
        try:
            head = await self._read_head(record, reader)
        except asyncio.IncompleteReadError:
            record.closed = True
            return False
        path = head.split(b" ", 2)[1].decode("latin-1").partition("?")[0]
        record.paths.append(path)
        for step in self.scripts.get(path, [OK]):
            if isinstance(step, bytes):
                writer.write(step)
                await writer.drain()
            elif isinstance(step, Gate):
                await self._gates[step.name].wait()
            elif isinstance(step, AwaitData):
                data = await reader.read(65536)
                if not data:
                    record.closed = True
                    return False
                record.pending += data
            elif isinstance(step, Hang):
                while await reader.read(65536):
                    pass
                record.closed = True
                return False
            elif isinstance(step, Linger):
                writer.write_eof()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(LINGER_TIMEOUT):
                        while await reader.read(65536):
                            pass
                record.closed = True
                return False
            elif isinstance(step, Reset):
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.transport.abort()
                record.closed = True
                return False
            else:
                record.closed = True
                return False
        return True

    @staticmethod
    async def _read_head(record: ConnectionRecord, reader: asyncio.StreamReader) -> bytes:
        """The next request head: from the bytes an ``AwaitData`` step kept, then the reader."""
        pending = record.pending
        if not pending:
            return await reader.readuntil(b"\r\n\r\n")
        while (index := pending.find(b"\r\n\r\n")) < 0:
            data = await reader.read(65536)
            if not data:
                raise asyncio.IncompleteReadError(bytes(pending), None)
            pending += data
        head = bytes(pending[: index + 4])
        del pending[: index + 4]
        return head

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    async def _stop(self) -> None:
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()
