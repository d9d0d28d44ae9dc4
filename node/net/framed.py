"""Our frames over one libp2p stream.

libp2p's own length-prefixed readers give up after 100 short reads (a large
message fails on a healthy connection) and a yamux read returns at most one
frame of ~64 KiB, so this reads with its own loop into the sans-IO Decoder.
libp2p's stream exceptions are translated here, at the edge, into
ConnectionLost; nothing above this module sees a libp2p exception.
"""

from __future__ import annotations

import contextlib
from typing import Any

import trio
from libp2p.network.stream.exceptions import StreamError

from node.errors import ConnectionLost
from protocols import DEFAULT_LIMITS, Decoder, Limits, Message, RemoteProtocolError, encode

READ_SIZE = 256 * 1024
CLOSE_TIMEOUT_S = 2.0


class FramedStream:
    """Send and receive whole messages on a libp2p stream.

    Sends are serialised by a lock so that a message's frames (a deferred
    tensor's parts) never interleave with another task's message.
    """

    def __init__(self, stream: Any, limits: Limits = DEFAULT_LIMITS) -> None:
        self._stream = stream
        self._limits = limits
        self._decoder = Decoder(limits)
        self._send_lock = trio.Lock()
        self.closed = False

    @property
    def peer_id(self) -> str:
        return str(self._stream.muxed_conn.peer_id)

    async def send(self, message: Message) -> None:
        frames = encode(message, self._limits)
        async with self._send_lock:
            try:
                for frame in frames:
                    await self._stream.write(frame)
            except (StreamError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise ConnectionLost(f"stream to {self.peer_id} broke while sending") from exc

    async def receive(self) -> Message | None:
        """The next message, or None when the peer ended the stream cleanly.

        Raises RemoteProtocolError for bad bytes or an end in mid-message, and
        ConnectionLost when the stream is reset or the connection drops.
        """
        while True:
            message = self._decoder.next_message()
            if message is not None:
                return message
            try:
                data = await self._stream.read(READ_SIZE)
            except EOFError:
                data = b""
            except (StreamError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise ConnectionLost(f"stream from {self.peer_id} broke") from exc
            if not data:
                if self._decoder.idle:
                    return None
                raise RemoteProtocolError("stream ended in the middle of a message")
            self._decoder.feed(data)

    async def close(self) -> None:
        """Close our side politely; give up (and reset) if the peer does not cooperate."""
        if self.closed:
            return
        self.closed = True
        with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT_S) as scope:
            try:
                await self._stream.close()
            except Exception:  # a broken stream may fail to close; reset below frees it
                scope.cancel()
        if scope.cancelled_caught:
            await self.reset()

    async def reset(self) -> None:
        self.closed = True
        # Resetting an already dead stream may raise anything; it is dead either way.
        with (
            trio.CancelScope(shield=True),
            trio.move_on_after(CLOSE_TIMEOUT_S),
            contextlib.suppress(Exception),
        ):
            await self._stream.reset()
