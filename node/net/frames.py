"""Our frames over a byte stream, whichever carries them.

``Framed`` sends and receives whole messages: the sans-IO Decoder fed by its own
read loop, sends serialised so that one message's frames never interleave with
another's, and a close that gives up (and resets) when the other side does not
cooperate. A subclass says how bytes move and which of its transport's errors
mean "the stream broke": ``node.net.framed.FramedStream`` over a libp2p stream,
``SocketFramed`` here over a trio stream (the daemon's local socket). Each
translates those errors into ConnectionLost at this edge, so the serving and
calling sides above (``node.jobs``) run unchanged on either.

This module imports no libp2p: the CLI's local client uses it.
"""

from __future__ import annotations

import contextlib
from typing import ClassVar

import trio

from node.errors import ConnectionLost
from protocols import DEFAULT_LIMITS, Decoder, Limits, Message, RemoteProtocolError, encode

READ_SIZE = 256 * 1024
CLOSE_TIMEOUT_S = 2.0


class Framed:
    """Whole messages on one stream; subclasses give the raw I/O and ``peer_id``."""

    # The transport's errors that mean the stream broke (translated to ConnectionLost).
    broken: ClassVar[tuple[type[BaseException], ...]] = (
        trio.BrokenResourceError,
        trio.ClosedResourceError,
    )

    def __init__(self, limits: Limits = DEFAULT_LIMITS, *, buffered: bytes = b"") -> None:
        """``buffered``: bytes already read off the stream, decoded before any more."""
        self._limits = limits
        self._decoder = Decoder(limits)
        self._decoder.feed(buffered)
        self._send_lock = trio.Lock()
        self.closed = False

    @property
    def peer_id(self) -> str:
        """The authenticated peer at the other end."""
        raise NotImplementedError

    async def _write(self, data: bytes) -> None:
        raise NotImplementedError

    async def _read(self, max_bytes: int) -> bytes | bytearray:
        """Up to ``max_bytes``; b"" at a clean end of the stream."""
        raise NotImplementedError

    async def _close(self) -> None:
        raise NotImplementedError

    async def _reset(self) -> None:
        raise NotImplementedError

    async def send(self, message: Message) -> None:
        frames = encode(message, self._limits)
        async with self._send_lock:
            try:
                for frame in frames:
                    await self._write(frame)
            except self.broken as exc:
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
                data = await self._read(READ_SIZE)
            except self.broken as exc:
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
                await self._close()
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
            await self._reset()


class SocketFramed(Framed):
    """Our frames over a trio stream whose peer was authenticated by other means
    (the local socket: the kernel's word on the connecting user)."""

    broken = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)

    def __init__(
        self,
        stream: trio.abc.HalfCloseableStream,
        peer_id: str,
        limits: Limits = DEFAULT_LIMITS,
        *,
        buffered: bytes = b"",
    ) -> None:
        super().__init__(limits, buffered=buffered)
        self._stream = stream
        self._peer_id = peer_id

    @property
    def peer_id(self) -> str:
        return self._peer_id

    async def _write(self, data: bytes) -> None:
        await self._stream.send_all(data)

    async def _read(self, max_bytes: int) -> bytes | bytearray:
        return await self._stream.receive_some(max_bytes)

    async def _close(self) -> None:
        await self._stream.aclose()

    async def _reset(self) -> None:
        await trio.aclose_forcefully(self._stream)

    async def send_eof(self) -> None:
        """Say we will send no more (the other side reads to the end, then sees it)."""
        with contextlib.suppress(*self.broken):
            await self._stream.send_eof()
