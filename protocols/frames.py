"""Length-prefixed frames out of a byte stream: a 4-byte big-endian size, then that
many bytes. The small stream protocols of ours that are not the RPC exchange (the
dial-back, the blob protocol) frame their msgpack messages so; each decodes the
payloads itself. A size over the limit is refused as soon as its 4 bytes arrive,
before the frame's bytes are held."""

from __future__ import annotations

from .errors import FrameTooLarge

SIZE_BYTES = 4


def frame(payload: bytes) -> bytes:
    """``payload`` with its size in front."""
    return len(payload).to_bytes(SIZE_BYTES, "big") + payload


class Frames:
    """Bytes in, whole payloads out, each at most ``limit`` bytes (``what`` names
    the protocol in the error)."""

    def __init__(self, limit: int, what: str) -> None:
        self.limit = limit
        self._what = what
        self._buffer = bytearray()

    def feed(self, data: bytes) -> None:
        self._buffer += data
        if len(self._buffer) >= SIZE_BYTES and self._size() > self.limit:
            raise FrameTooLarge(f"a {self._what} frame over {self.limit} bytes")

    def next_frame(self) -> bytes | None:
        """The next whole payload, or None until its bytes have all come."""
        if len(self._buffer) < SIZE_BYTES:
            return None
        end = SIZE_BYTES + self._size()
        if len(self._buffer) < end:
            return None
        payload = bytes(self._buffer[SIZE_BYTES:end])
        del self._buffer[:end]
        return payload

    @property
    def partial(self) -> bool:
        """Whether bytes of an unfinished frame are held (a stream ending now ends
        inside a message)."""
        return bool(self._buffer)

    def _size(self) -> int:
        return int.from_bytes(self._buffer[:SIZE_BYTES], "big")
