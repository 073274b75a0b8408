"""Deterministic pseudo-random bodies: what ``/stream``, ``/nolength`` and ``/reset-body`` send.

Tests import these to know, without a network, the exact bytes and checksum to expect.
"""

from __future__ import annotations

import functools
import hashlib
import random
from collections.abc import Iterable, Iterator

PIECE = 64 * 1024  # largest piece of a body the fake backend holds in memory at once


def stream_blocks(size: int, seed: int) -> Iterator[bytes]:
    """``size`` pseudo-random bytes from ``seed``, in blocks of ``PIECE`` bytes.

    Blocks are generated whole and the last one cut, so the bytes depend on ``size`` and ``seed``
    only (not on how they are later split) and a shorter stream is a prefix of a longer one.
    """
    rng = random.Random(seed)
    remaining = size
    while remaining > 0:
        block = rng.randbytes(PIECE)
        yield block if remaining >= PIECE else block[:remaining]
        remaining -= PIECE


def stream_body(size: int, seed: int = 0) -> bytes:
    """The whole body ``/stream?bytes=size&seed=seed`` sends (for small sizes in tests)."""
    return b"".join(stream_blocks(size, seed))


@functools.lru_cache(maxsize=64)
def stream_sha256(size: int, seed: int = 0) -> str:
    digest = hashlib.sha256()
    for block in stream_blocks(size, seed):
        digest.update(block)
    return digest.hexdigest()


def split_pieces(blocks: Iterable[bytes], piece: int) -> Iterator[bytes]:
    """Re-cut a stream of blocks into ``piece``-byte pieces (the last may be shorter)."""
    pending = bytearray()
    for block in blocks:
        view = memoryview(block)
        if pending:
            need = piece - len(pending)
            pending += view[:need]
            view = view[need:]
            if len(pending) < piece:
                continue
            yield bytes(pending)
            pending.clear()
        while len(view) >= piece:
            yield bytes(view[:piece])
            view = view[piece:]
        pending += view
    if pending:
        yield bytes(pending)
