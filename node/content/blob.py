"""/swarm/blob/1.0.0: a manifest or one chunk of shared content, by content id.

Why our own and not bitswap: py-libp2p 0.8.1's bitswap keeps whole blocks in
memory by CID and asks every connected peer, while a puller here already knows
its providers and each chunk's hash from the manifest; a request and an answer
are all it needs. A stream carries any number of exchanges, one at a time::

    puller                                      provider
      Get(content id, index | MANIFEST) ------>
                                                  looked up in Shares: never a path
                        <------------------------  Data(bytes) | Refused(code, retry)

Bounds: a request frame is at most ``MAX_REQUEST`` bytes and an answer at most
``MAX_ANSWER`` (the caller bounds it further by what it expects); every read has
a timeout. A provider serves at most ``max_uploads`` streams at once (the next
is refused OVERLOADED with a retry time) and sends at most ``rate`` bytes a
second over all of them, paced chunk by chunk. A refusal carries a code, never
an exception's text.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack
import trio
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID

from node.errors import NodeError
from node.net.access import AccessPolicy
from protocols.codes import ErrorCode
from protocols.content import DIGEST_LEN, MAX_CHUNK, MAX_MANIFEST
from protocols.errors import ConfigError, RemoteError, RemoteProtocolError
from protocols.frames import Frames, frame

from .shares import Shares

log = logging.getLogger(__name__)

BLOB_PROTOCOL = TProtocol("/swarm/blob/1.0.0")
MANIFEST = -1  # the index that asks for the manifest
MAX_REQUEST = 256
MAX_ANSWER = max(MAX_CHUNK, MAX_MANIFEST) + 256
READ_SIZE = 1 << 20
IDLE_TIMEOUT_S = 30.0  # between requests on a provider's stream
IO_TIMEOUT_S = 30.0


class BlobUnavailable(NodeError):
    """The provider gave no answer: gone, slow, no such protocol, or garbage."""

    code = ErrorCode.NOT_EXECUTED


# -- the wire, sans-IO -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Get:
    content_id: bytes
    index: int  # MANIFEST or a chunk index


@dataclass(frozen=True, slots=True)
class Data:
    data: bytes


@dataclass(frozen=True, slots=True)
class Refused:
    code: ErrorCode
    retry_after_s: float = 0.0


Message = Get | Data | Refused


def encode(message: Message) -> bytes:
    if isinstance(message, Get):
        body: dict[str, Any] = {"t": "get", "cid": message.content_id, "i": message.index}
    elif isinstance(message, Data):
        body = {"t": "data", "d": message.data}
    else:
        body = {"t": "no", "code": str(message.code), "retry": float(message.retry_after_s)}
    payload: bytes = msgpack.packb(body, use_bin_type=True)
    limit = MAX_REQUEST if isinstance(message, Get) else MAX_ANSWER
    if len(payload) > limit:
        raise ConfigError(f"a blob message of {len(payload)} bytes is over {limit}")
    return frame(payload)


def decode(payload: bytes, limit: int) -> Message:
    try:
        body = msgpack.unpackb(
            payload,
            raw=False,
            strict_map_key=True,
            max_str_len=64,
            max_bin_len=limit,
            max_array_len=0,
            max_map_len=4,
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises several types for bad bytes
        raise RemoteProtocolError(f"not a blob message: {type(exc).__name__}") from None
    if not isinstance(body, dict):
        raise RemoteProtocolError("a blob message must be a map")
    kind = body.get("t")
    if kind == "get":
        cid, index = body.get("cid"), body.get("i")
        if not (isinstance(cid, bytes) and len(cid) == DIGEST_LEN):
            raise RemoteProtocolError("a blob request names a sha2-256 content id")
        if isinstance(index, bool) or not isinstance(index, int) or index < MANIFEST:
            raise RemoteProtocolError("a blob request's index is -1 or a chunk number")
        return Get(cid, index)
    if kind == "data" and isinstance(body.get("d"), bytes):
        return Data(body["d"])
    if kind == "no":
        code, retry = body.get("code"), body.get("retry")
        try:
            parsed = ErrorCode(str(code))
        except ValueError:
            raise RemoteProtocolError(f"unknown blob refusal {str(code)[:32]!r}") from None
        if isinstance(retry, bool) or not isinstance(retry, int | float) or not 0 <= retry <= 3600:
            raise RemoteProtocolError("a blob refusal's retry is 0-3600 s")
        return Refused(parsed, float(retry))
    raise RemoteProtocolError(f"unknown blob message {str(kind)[:32]!r}")


class Decoder:
    """Bytes in, messages out; any bytes give a message or a RemoteProtocolError."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._frames = Frames(limit, "blob")

    def feed(self, data: bytes) -> None:
        self._frames.feed(data)

    def next_message(self) -> Message | None:
        payload = self._frames.next_frame()
        return None if payload is None else decode(payload, self.limit)

    @property
    def partial(self) -> bool:
        return self._frames.partial


async def receive(stream: Any, decoder: Decoder) -> Message | None:
    """The next message on ``stream``; None at a clean end between messages."""
    while (message := decoder.next_message()) is None:
        try:
            data = await stream.read(READ_SIZE)
        except EOFError:
            data = b""
        if not data:
            if decoder.partial:
                raise RemoteProtocolError("the blob stream ended inside a message")
            return None
        decoder.feed(data)
    return message


# -- pacing, pure ------------------------------------------------------------------------


class Pacer:
    """At most ``rate`` bytes a second over every upload together (0: no cap).

    Each chunk books its time slot before it is sent: a chunk waits until the
    bytes booked before it have had their time, so the long-run rate holds
    whatever the number of streams, and a short burst of one chunk is allowed.
    """

    def __init__(self, rate: float, clock: Callable[[], float] = trio.current_time) -> None:
        self.rate = rate
        self._clock = clock
        self._free_at = 0.0

    def book(self, size: int) -> float:
        """Seconds to wait before sending ``size`` bytes."""
        if self.rate <= 0:
            return 0.0
        now = self._clock()
        start = max(now, self._free_at)
        self._free_at = start + size / self.rate
        return start - now


# -- the provider ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BlobLimits:
    upload_rate: float = 0.0  # bytes a second over all uploads; 0: no cap
    max_uploads: int = 8  # streams served at once

    def __post_init__(self) -> None:
        if self.upload_rate < 0:
            raise ConfigError("content.upload_rate must be >= 0 bytes a second (0: no cap)")
        if not 1 <= self.max_uploads <= 1024:
            raise ConfigError("content.max_uploads must be 1 to 1024")


class BlobServer:
    """The /swarm/blob/1.0.0 handler over ``shares``. Counters: ``served_bytes``,
    ``served_chunks``, ``refused``."""

    def __init__(
        self, shares: Shares, limits: BlobLimits = BlobLimits(), access: AccessPolicy | None = None
    ) -> None:
        self.shares = shares
        self.limits = limits
        self._access = access or AccessPolicy()
        self._slots = trio.CapacityLimiter(limits.max_uploads)
        self.pacer = Pacer(limits.upload_rate)
        self.served_bytes = 0
        self.served_chunks = 0
        self.refused = 0

    def describe(self) -> dict[str, Any]:
        return {
            "shared": len(self.shares.ids()),
            "uploads": self._slots.borrowed_tokens,
            "max_uploads": self.limits.max_uploads,
            "upload_rate": self.limits.upload_rate,
            "served_bytes": self.served_bytes,
            "served_chunks": self.served_chunks,
            "refused": self.refused,
        }

    async def __call__(self, stream: Any) -> None:
        peer = str(stream.muxed_conn.peer_id)
        try:
            if not self._access.permits(peer):
                self.refused += 1
                await _send(stream, Refused(ErrorCode.UNAUTHORIZED))
                return
            try:
                self._slots.acquire_on_behalf_of_nowait(stream)
            except trio.WouldBlock:
                self.refused += 1
                await _send(stream, Refused(ErrorCode.OVERLOADED, 1.0))
                return
            try:
                await self._serve(stream)
            finally:
                self._slots.release_on_behalf_of(stream)
        except (RemoteProtocolError, trio.TooSlowError) as exc:
            log.info("blob stream from %s dropped: %s", peer, exc)
            with contextlib.suppress(Exception):
                await stream.reset()
        except Exception as exc:  # the stream broke under us: libp2p raises many types
            log.debug("blob stream from %s broke: %s", peer, exc)
        finally:
            await _close(stream)

    async def _serve(self, stream: Any) -> None:
        decoder = Decoder(MAX_REQUEST)
        while True:
            with trio.fail_after(IDLE_TIMEOUT_S):
                request = await receive(stream, decoder)
            if request is None:
                return
            if not isinstance(request, Get):
                raise RemoteProtocolError("expected a blob request")
            answer = await self.answer(request)
            if isinstance(answer, Data):
                wait = self.pacer.book(len(answer.data))
                if wait > 0:
                    await trio.sleep(wait)
            else:
                self.refused += 1
            await _send(stream, answer)
            if isinstance(answer, Data) and request.index != MANIFEST:
                self.served_bytes += len(answer.data)
                self.served_chunks += 1

    async def answer(self, request: Get) -> Data | Refused:
        share = self.shares.get(request.content_id)
        if share is None:
            return Refused(ErrorCode.MODEL_NOT_FOUND)  # not shared: nothing is looked up
        if request.index == MANIFEST:
            return Data(share.manifest.encode())
        if request.index >= len(share.manifest.chunks):
            return Refused(ErrorCode.BAD_REQUEST)
        try:
            data = await trio.to_thread.run_sync(
                self.shares.read_chunk, request.content_id, request.index
            )
        except OSError as exc:
            log.warning("shared %s does not read: %s", share.label, exc)
            return Refused(ErrorCode.INTERNAL)
        return Refused(ErrorCode.MODEL_NOT_FOUND) if data is None else Data(data)


async def _send(stream: Any, message: Message) -> None:
    with trio.fail_after(IO_TIMEOUT_S):
        await stream.write(encode(message))


async def _close(stream: Any) -> None:
    with (
        trio.CancelScope(shield=True),
        trio.move_on_after(5.0),
        contextlib.suppress(Exception),
    ):
        await stream.close()


# -- the puller's side -------------------------------------------------------------------


class BlobClient:
    """One stream to one provider, one exchange at a time. ``get`` raises RemoteError
    for a refusal (typed by its code) and BlobUnavailable for anything else."""

    def __init__(self, host: Any, peer_id: str, *, timeout_s: float = IO_TIMEOUT_S) -> None:
        self.host = host
        self.peer_id = peer_id
        self.timeout_s = timeout_s
        self._stream: Any = None

    async def get(self, content_id: bytes, index: int, max_bytes: int) -> bytes:
        try:
            with trio.fail_after(self.timeout_s):
                if self._stream is None:
                    self._stream = await self.host.new_stream(
                        ID.from_base58(self.peer_id), [BLOB_PROTOCOL]
                    )
                await self._stream.write(encode(Get(content_id, index)))
                answer = await receive(self._stream, Decoder(max_bytes + 64))
        except trio.TooSlowError:
            await self.close()
            raise BlobUnavailable(f"{self.peer_id} sent no blob in {self.timeout_s:g} s") from None
        except RemoteProtocolError as exc:
            await self.close()
            raise BlobUnavailable(f"{self.peer_id} sent garbage: {exc}") from exc
        except Exception as exc:  # libp2p raises many types (no protocol, connection gone)
            await self.close()
            raise BlobUnavailable(f"{self.peer_id}: {type(exc).__name__}: {exc}") from exc
        if answer is None:
            await self.close()
            raise BlobUnavailable(f"{self.peer_id} closed the blob stream")
        if isinstance(answer, Refused):
            raise RemoteError(
                answer.code, "refused", retry_after_ms=int(answer.retry_after_s * 1e3)
            )
        if not isinstance(answer, Data):
            await self.close()
            raise BlobUnavailable(f"{self.peer_id} sent a request where an answer belonged")
        return answer.data

    async def close(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            await _close(stream)
