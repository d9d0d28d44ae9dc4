"""The calling side of /swarm/infer: requests out, chunks and results back.

Streams are reused: a pool of idle streams per peer, because a new stream per
small call costs several times a round trip. A stream goes back to the pool
only after a clean exchange; one that was cancelled, broke, or saw a protocol
error is closed instead, so a late chunk can never reach the next caller. One
exchange on a stream is ``call.exchange``, which the local-socket client shares.

``drop_idle(peer)`` empties a peer's pool when a better connection to it
arrives (a hole punch beside a relayed one): the next call opens its stream on
the connection libp2p prefers now. Streams in use at that moment are closed
when their exchange ends, not pooled, or one busy stream would keep a peer's
traffic on the relay for good (scripts/bench_nat found it there).
"""

from __future__ import annotations

import logging
from typing import Any

import trio
from libp2p.custom_types import TProtocol

from node.errors import PeerUnavailable
from node.net.framed import FramedStream
from protocols import DEFAULT_LIMITS, INFER_PROTOCOL, Limits, RemoteError, Request, Result

from .call import OnChunk, exchange

__all__ = ["Caller", "OnChunk", "exchange"]

log = logging.getLogger(__name__)

OPEN_TIMEOUT_S = 5.0


class Caller:
    """Sends requests to peers of ``host`` over pooled streams."""

    def __init__(self, host: Any, *, limits: Limits = DEFAULT_LIMITS, max_idle: int = 16) -> None:
        self._host = host
        self._limits = limits
        self._max_idle = max_idle
        self._idle: dict[str, list[FramedStream]] = {}
        self._busy: dict[str, set[FramedStream]] = {}  # in an exchange now, per peer
        self._stale: set[FramedStream] = set()  # busy when drop_idle ran: not pooled again

    async def call(
        self,
        peer_id: Any,
        request: Request,
        on_chunk: OnChunk | None = None,
        *,
        reuse: bool = True,
    ) -> Result:
        """One exchange with ``peer_id``. Raises RemoteError for a typed Error
        answer, PeerUnavailable if nothing was sent, ConnectionLost if the stream
        broke after the request left (the outcome is then unknown)."""
        key = str(peer_id)
        stream = self._take(key) if reuse else None
        if stream is not None:
            try:
                return await self._on(key, stream, request, on_chunk, reuse)
            except PeerUnavailable:
                # A pooled stream can die while idle (the peer restarted). Nothing was
                # sent on it, so a fresh stream, which redials, is safe to try once.
                log.debug("pooled stream to %s was dead; opening a new one", key)
        stream = await self._open(peer_id)
        return await self._on(key, stream, request, on_chunk, reuse)

    async def _on(
        self,
        key: str,
        stream: FramedStream,
        request: Request,
        on_chunk: OnChunk | None,
        reuse: bool,
    ) -> Result:
        clean = False
        busy = self._busy.setdefault(key, set())
        busy.add(stream)
        try:
            result = await exchange(stream, request, on_chunk)
            clean = True
            return result
        except RemoteError:
            clean = True
            raise
        finally:
            busy.discard(stream)
            if not busy and self._busy.get(key) is busy:
                del self._busy[key]
            stale = stream in self._stale
            self._stale.discard(stream)
            if clean and reuse and not stream.closed and not stale:
                if not self._give_back(key, stream):
                    await stream.reset()  # over the idle cap: dropped at once, in this task
            else:
                await stream.close()

    async def close(self) -> None:
        for streams in self._idle.values():
            for stream in streams:
                await stream.close()
        self._idle.clear()

    async def drop_idle(self, peer_id: str) -> None:
        """Close the idle streams pooled for ``peer_id``: the next call opens a new one,
        on the connection libp2p prefers now (a direct one that replaced a relay).
        Those in use now are closed when their exchange ends."""
        self._stale.update(self._busy.get(peer_id, ()))
        for stream in self._idle.pop(peer_id, []):
            await stream.close()

    def _take(self, key: str) -> FramedStream | None:
        pool = self._idle.get(key)
        return pool.pop() if pool else None

    def _give_back(self, key: str, stream: FramedStream) -> bool:
        """Pool ``stream`` for the next call to ``key``; False when the pool is full."""
        pool = self._idle.setdefault(key, [])
        if len(pool) >= self._max_idle:
            return False
        pool.append(stream)
        return True

    async def _open(self, peer_id: Any) -> FramedStream:
        # Two tries: a stream opened on a connection that libp2p is just closing (two
        # dials to one peer crossing, with one connection allowed per peer) can hang.
        try:
            for _ in range(2):
                with trio.move_on_after(OPEN_TIMEOUT_S):
                    raw = await self._host.new_stream(peer_id, [TProtocol(INFER_PROTOCOL)])
                    return FramedStream(raw, self._limits)
                log.info("opening a stream to %s timed out", peer_id)
        except Exception as exc:  # libp2p raises many types for an unreachable peer
            raise PeerUnavailable(f"cannot open a stream to {peer_id}: {exc}") from exc
        raise PeerUnavailable(f"no stream to {peer_id} within {OPEN_TIMEOUT_S} s, twice")
