"""The serving side of /swarm/infer: one task per stream, reading all the time.

The reader never stops reading while a request runs: that is how a Cancel is
seen at once and how yamux's window keeps moving (yamux resets a stream that is
not read for 5 s). Each request runs in its own child task. Whatever goes wrong
with one stream (garbage, a vanished peer, a runner failure) ends in a typed
Error to that peer, or in silence if the peer is gone, and never reaches the
rest of the node.

``serve`` is the whole serving side for one framed stream and its caller's
authenticated peer id; the libp2p handler (``__call__``) and the daemon's local
socket (``node.net.local``, which attributes a connection to the data dir's
client identity) both hand their streams to it, so a job is served the same
whichever way it came, allow-list included.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Mapping
from typing import Any

import trio

from node.errors import ConnectionLost
from node.net.access import AccessPolicy
from node.net.framed import FramedStream
from node.net.frames import Framed
from protocols import (
    DEFAULT_LIMITS,
    Cancel,
    Chunk,
    Error,
    ErrorCode,
    Exchange,
    Limits,
    LocalProtocolError,
    ProtocolError,
    RemoteError,
    RemoteProtocolError,
    Request,
    Result,
    Role,
    State,
    SwarmError,
    Value,
)

from .service import Emit, InferenceService

log = logging.getLogger(__name__)


class InferHandler:
    def __init__(
        self,
        service: InferenceService,
        *,
        limits: Limits = DEFAULT_LIMITS,
        access: AccessPolicy | None = None,
    ) -> None:
        self._service = service
        self._limits = limits
        self._access = access or AccessPolicy()
        self._unanswered = 0  # requests read whose answer has not been sent yet
        self._all_answered = trio.Event()
        self._all_answered.set()
        # Told the caller of each request (membership keeps busy links before idle ones).
        self.on_request: Callable[[str], None] | None = None

    async def wait_answered(self) -> None:
        """Until every request read so far has been answered (or its caller is gone)."""
        await self._all_answered.wait()

    async def __call__(self, raw_stream: Any) -> None:
        """libp2p's stream handler for /swarm/infer."""
        stream = FramedStream(raw_stream, self._limits)
        await self.serve(stream, stream.peer_id)

    async def serve(
        self, stream: Framed, peer_id: str, *, idle_timeout_s: float | None = None
    ) -> None:
        """Serve the exchanges ``peer_id`` sends on ``stream`` until it ends; closes it.

        With ``idle_timeout_s`` the stream is closed once nothing has arrived for
        that long while no request of it runs.
        """
        exchange = Exchange(Role.SERVER)
        if not self._access.permits(peer_id):
            await self._reply(stream, exchange, Error("", ErrorCode.UNAUTHORIZED, "not allowed"))
            await stream.close()
            return
        try:
            async with trio.open_nursery() as nursery:
                await self._read(stream, peer_id, exchange, nursery, idle_timeout_s)
        finally:
            await stream.close()

    async def _read(
        self,
        stream: Framed,
        peer_id: str,
        exchange: Exchange,
        nursery: trio.Nursery,
        idle_timeout_s: float | None,
    ) -> None:
        active: dict[str, trio.CancelScope] = {}
        try:
            while True:
                with trio.move_on_after(idle_timeout_s or math.inf) as waiting:
                    message = await stream.receive()
                if waiting.cancelled_caught:
                    if active:
                        continue  # a request runs: the caller waits for it, not idle
                    log.debug("stream from %s idle for %s s: closing it", peer_id, idle_timeout_s)
                    return
                if message is None:
                    return  # the caller is done sending; a running request still answers
                exchange.receive(message)
                if isinstance(message, Cancel):
                    scope = active.get(message.id)
                    if scope is not None:
                        scope.cancel()
                elif isinstance(message, Request):
                    scope = trio.CancelScope()
                    active[message.id] = scope
                    if self._unanswered == 0:
                        self._all_answered = trio.Event()
                    self._unanswered += 1
                    nursery.start_soon(
                        self._serve, stream, peer_id, exchange, message, scope, active
                    )
        except RemoteProtocolError as exc:
            log.info("peer %s broke the protocol: %s", peer_id, exc)
            nursery.cancel_scope.cancel()
            await self._reply(
                stream, exchange, Error(exchange.request_id or "", exc.code, str(exc))
            )
        except ConnectionLost as exc:
            log.info("stream from %s lost: %s", peer_id, exc.__cause__ or exc)
            nursery.cancel_scope.cancel()

    async def _serve(
        self,
        stream: Framed,
        peer_id: str,
        exchange: Exchange,
        request: Request,
        scope: trio.CancelScope,
        active: dict[str, trio.CancelScope],
    ) -> None:
        seq = 0

        async def emit(outputs: Mapping[str, Value]) -> None:
            nonlocal seq
            chunk = Chunk(request.id, seq, dict(outputs))
            seq += 1
            if exchange.state is State.ACTIVE:  # once cancelled, the caller wants no more
                exchange.send(chunk)
                await stream.send(chunk)

        if self.on_request is not None:
            self.on_request(peer_id)
        try:
            reply = await self._outcome(request, peer_id, scope, emit)
            if reply is not None:
                await self._reply(stream, exchange, reply)
        finally:
            active.pop(request.id, None)
            self._answered()

    async def _outcome(
        self, request: Request, peer_id: str, scope: trio.CancelScope, emit: Emit
    ) -> Result | Error | None:
        """The answer owed to the caller, or None when the caller is gone."""
        try:
            with scope:
                # The job is the caller's: its fair share, its limits (node.jobs.fairness).
                return await self._service.execute(request, emit, client=peer_id)
            return Error(request.id, ErrorCode.CANCELLED, "cancelled by the caller")
        except ConnectionLost:
            return None
        except RemoteError as exc:  # a peer we forwarded to answered with an error
            return Error(request.id, exc.code, exc.message, exc.retry_after_ms)
        except SwarmError as exc:
            return _error_for(request.id, exc)
        except Exception:  # a runner bug must not take the node down
            # The detail (type, text, traceback) stays in this node's log: it names our
            # code, paths and versions, which are nobody else's business.
            log.exception("request %s for %s failed", request.id, request.model)
            return Error(request.id, ErrorCode.INTERNAL, internal_message(request.id))

    def _answered(self) -> None:
        # Counted from when the reader takes a request, so shutdown never misses one.
        self._unanswered -= 1
        if self._unanswered == 0:
            self._all_answered.set()

    async def _reply(self, stream: Framed, exchange: Exchange, reply: Result | Error) -> None:
        try:
            exchange.send(reply)
        except LocalProtocolError:
            return  # the exchange already ended (e.g. the stream broke first)
        try:
            with trio.CancelScope(shield=True), trio.move_on_after(5.0):
                await stream.send(reply)
        except ProtocolError as exc:  # e.g. a result too large to encode
            log.warning("cannot send the answer to %s: %s", reply.id, exc)
            fallback = Error(reply.id, exc.code, f"the answer could not be sent: {exc}")
            with trio.CancelScope(shield=True), trio.move_on_after(5.0):
                await _send_quietly(stream, fallback)
        except ConnectionLost:
            log.info("could not answer %s: the caller is gone", reply.id)


def internal_message(request_id: str) -> str:
    """What a peer is told of an unexpected failure: that it happened, and the id to
    find it by in the serving node's log."""
    return f"internal error while running request {request_id}; the serving node logged it"


def _error_for(request_id: str, exc: SwarmError) -> Error:
    retry_after = getattr(exc, "retry_after_ms", None)
    return Error(request_id, exc.code, str(exc), retry_after)


async def _send_quietly(stream: Framed, message: Error) -> None:
    with contextlib.suppress(ConnectionLost, ProtocolError):
        await stream.send(message)
