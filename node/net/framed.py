"""Our frames over one libp2p stream.

libp2p's own length-prefixed readers give up after 100 short reads (a large
message fails on a healthy connection) and a yamux read returns at most one
frame of ~64 KiB, so this reads with its own loop into the sans-IO Decoder
(``node.net.frames.Framed``). libp2p's stream exceptions are translated here,
at the edge, into ConnectionLost; nothing above this module sees a libp2p
exception.
"""

from __future__ import annotations

from typing import Any

import trio
from libp2p.network.stream.exceptions import StreamError

from protocols import DEFAULT_LIMITS, Limits

from .frames import CLOSE_TIMEOUT_S, READ_SIZE, Framed

__all__ = ["CLOSE_TIMEOUT_S", "READ_SIZE", "FramedStream"]


class FramedStream(Framed):
    """Send and receive whole messages on a libp2p stream (or anything with its
    ``read``/``write``/``close``/``reset`` and ``muxed_conn.peer_id``)."""

    broken = (StreamError, trio.BrokenResourceError, trio.ClosedResourceError)

    def __init__(self, stream: Any, limits: Limits = DEFAULT_LIMITS) -> None:
        super().__init__(limits)
        self._stream = stream

    @property
    def peer_id(self) -> str:
        return str(self._stream.muxed_conn.peer_id)

    async def _write(self, data: bytes) -> None:
        await self._stream.write(data)

    async def _read(self, max_bytes: int) -> bytes | bytearray:
        try:
            data: bytes = await self._stream.read(max_bytes)
        except EOFError:
            return b""
        return data

    async def _close(self) -> None:
        await self._stream.close()

    async def _reset(self) -> None:
        await self._stream.reset()
