"""WebSocket ``/ws/{client_id}``: inference with streamed chunks, live topics, status.

One JSON object per text frame each way. A client sends:

- ``{"type": "inference", "id": TAG, "model": M, "inputs": ..., "params": {...},
  "stream": bool, "priority": "high"|"normal"|"low", "deadline_ms": N,
  "strategy": S, "hedge_ms": N}`` (``hedge_ms``: ask a second peer too when no first
  chunk or answer came in that time; 0: never; absent: the node's default).
  ``inputs`` and ``params`` take swarm's JSON form
  (node/json_values.py: texts, or named inputs with tensors as ``{"dtype",
  "shape", "data"}``, as the MCP tools and ``swarm submit --json`` use). The
  answer is ``{"type": "result", "id": TAG, "outputs": ..., "meta": ...}``,
  after ``{"type": "chunk", "id": TAG, "seq": N, "outputs": ...}`` frames when
  it streams. ``TAG`` is the client's (default: the request id); several
  inferences may run at once on one connection, up to ``MAX_IN_FLIGHT``.
- ``{"type": "cancel", "id": TAG}``: stop that inference (it answers CANCELLED).
- ``{"type": "subscribe" | "unsubscribe", "topics": [...]}`` over ``peers``,
  ``jobs`` and ``load`` (node/observe/feed.py); events arrive as ``{"type": "event",
  "topic", "kind", "at_ms", "data"}``. A client too slow for the events it asked
  for loses some, and is told how many (``topic`` ``feed``, ``kind`` ``dropped``);
  answers to its own requests are never dropped.
- ``{"type": "status"}`` (this node's record, live peers, recent jobs) and
  ``{"type": "ping"}`` (answered ``pong``).

Anything wrong with a message is answered ``{"type": "error", "id", "code",
"message"}`` with swarm's error codes, and the connection stays open. A second
connection with the same ``client_id`` replaces the first (it is closed with
code 4000): a client reconnecting after a network blip is not refused. With a
gateway token, the socket needs it as a bearer header or, for browsers, which
cannot set headers on a WebSocket, as ``?token=``.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import trio
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from bootstrap.table import Peer, PeerTable, live_peers
from node.json_values import BadValue, inputs_from_json, jsonable, params_from_json
from node.observe.feed import Feed, Subscription, Topic, peer_summary
from protocols import MAX_HEDGE_MS, ErrorCode, Priority, Request, SwarmError, Value, bounded_json

from .app import MAX_DEADLINE_MS, Backend, find_model
from .config import GatewayConfig
from .errors import HTTPFailure

log = logging.getLogger(__name__)
T = TypeVar("T")

CLIENT_ID = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
MAX_TAG = 128
MAX_IN_FLIGHT = 32  # inferences one connection may have running at once
OUTBOX = 64  # frames waiting for the socket: answers wait for room, events are dropped
MAX_CLIENTS = 256
RECENT_IN_STATUS = 20
CLOSE_REPLACED = 4000
CLOSE_POLICY = 1008  # bad client id or token
CLOSE_BUSY = 1013  # too many clients: try again later


class Refused(Exception):
    """A client message that cannot be served, answered as an error frame."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def routes(backend: Backend, config: GatewayConfig) -> list[WebSocketRoute]:
    clients = Clients()

    async def endpoint(socket: WebSocket) -> None:
        client_id = socket.path_params["client_id"]
        if config.token is not None and not _authorized(socket, config.token):
            await socket.close(CLOSE_POLICY, "this gateway needs its bearer token")
            return
        if not CLIENT_ID.fullmatch(client_id):
            await socket.close(CLOSE_POLICY, "client id: 1-64 of A-Z a-z 0-9 _ . : -")
            return
        if len(clients.open) >= MAX_CLIENTS and client_id not in clients.open:
            await socket.close(CLOSE_BUSY, "too many clients; try again later")
            return
        await socket.accept()
        await Connection(socket, client_id, backend, config, clients).serve()

    return [WebSocketRoute("/ws/{client_id}", endpoint)]


class Clients:
    """The open connections by client id; a newcomer replaces an old one of its id."""

    def __init__(self) -> None:
        self.open: dict[str, Connection] = {}

    def enter(self, connection: Connection) -> None:
        old = self.open.get(connection.client_id)
        if old is not None:
            old.replaced = True
            old.scope.cancel()
        self.open[connection.client_id] = connection

    def leave(self, connection: Connection) -> None:
        if self.open.get(connection.client_id) is connection:
            del self.open[connection.client_id]


class Connection:
    def __init__(
        self,
        socket: WebSocket,
        client_id: str,
        backend: Backend,
        config: GatewayConfig,
        clients: Clients,
    ) -> None:
        self.socket = socket
        self.client_id = client_id
        self.backend = backend
        self.config = config
        self.clients = clients
        self.scope = trio.CancelScope()
        self.replaced = False
        self.running: dict[str, trio.CancelScope] = {}
        self._out_send, self._out = trio.open_memory_channel[dict[str, Any]](OUTBOX)

    async def serve(self) -> None:
        feed = self.backend.feed or Feed()  # no feed: subscribing works and is silent
        self.clients.enter(self)
        try:
            with self.scope, feed.subscribe() as subscription:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._send_frames)
                    nursery.start_soon(self._forward_events, subscription)
                    await self._receive(nursery, subscription)
                    nursery.cancel_scope.cancel()  # the client left: stop its work
        finally:
            self.clients.leave(self)
        if self.replaced:
            with trio.move_on_after(1):
                await self.socket.close(CLOSE_REPLACED, "replaced by a newer connection")

    async def _send_frames(self) -> None:
        try:
            async for frame in self._out:
                await self.socket.send_text(json.dumps(frame, separators=(",", ":")))
        except (WebSocketDisconnect, RuntimeError, OSError):
            self.scope.cancel()  # the client is gone mid-send: end the connection and its work

    async def _forward_events(self, subscription: Subscription) -> None:
        async for event in subscription.events:
            await self._out_send.send({"type": "event", **event.as_json()})

    async def _receive(self, nursery: trio.Nursery, subscription: Subscription) -> None:
        while True:
            message = await self.socket.receive()
            if message["type"] == "websocket.disconnect":
                return
            text = message.get("text")
            tag = None
            try:
                if text is None:
                    raise Refused(ErrorCode.MALFORMED, "send JSON in text frames, not binary")
                if len(text) > self.config.max_body:
                    limit = self.config.max_body
                    raise Refused(ErrorCode.TOO_LARGE, f"a message is over {limit} bytes")
                body = _parse(text)
                tag = body.get("id") if isinstance(body.get("id"), str) else None
                await self._handle(body, nursery, subscription)
            except Refused as exc:
                await self._error(tag, exc.code, str(exc))

    async def _handle(
        self, body: dict[str, Any], nursery: trio.Nursery, subscription: Subscription
    ) -> None:
        kind = body.get("type")
        tag = body.get("id")
        if kind == "ping":
            await self._out_send.send({"type": "pong", "id": tag, "at_ms": _now_ms()})
        elif kind == "status":
            await self._out_send.send({"type": "status", "id": tag, **self._status()})
        elif kind in ("subscribe", "unsubscribe"):
            topics = _topics(body.get("topics"))
            if kind == "subscribe":
                subscription.topics |= topics
            else:
                subscription.topics -= topics
            current = sorted(str(t) for t in subscription.topics)
            await self._out_send.send({"type": "subscribed", "id": tag, "topics": current})
        elif kind == "inference":
            request, tag = self._request(body)
            if len(self.running) >= MAX_IN_FLIGHT:
                message = f"{MAX_IN_FLIGHT} inferences already run on this connection"
                raise Refused(ErrorCode.OVERLOADED, message)
            scope = trio.CancelScope()
            self.running[tag] = scope
            nursery.start_soon(self._infer, request, tag, scope)
        elif kind == "cancel":
            if not isinstance(tag, str) or tag not in self.running:
                raise Refused(ErrorCode.BAD_REQUEST, f"no inference {tag!r} runs here")
            self.running[tag].cancel()
        else:
            kinds = "inference, cancel, subscribe, unsubscribe, status, ping"
            raise Refused(ErrorCode.BAD_REQUEST, f"unknown message type {kind!r}; use {kinds}")

    def _status(self) -> dict[str, Any]:
        table = self.backend.table()
        peers = [peer_summary(p) for p in _live(table)]
        recent = self.backend.feed.recent_jobs()[-RECENT_IN_STATUS:] if self.backend.feed else []
        return {"node": self.backend.status(), "peers": peers, "recent_jobs": recent}

    def _request(self, body: Mapping[str, Any]) -> tuple[Request, str]:
        request_id = f"ws-{uuid.uuid4().hex}"
        tag = body.get("id", request_id)
        if not isinstance(tag, str) or not 0 < len(tag) <= MAX_TAG:
            raise Refused(ErrorCode.BAD_REQUEST, f"'id' must be a text of 1 to {MAX_TAG} chars")
        if tag in self.running:
            raise Refused(ErrorCode.BAD_REQUEST, f"an inference {tag!r} already runs here")
        try:
            described = find_model(self.backend, body.get("model"))
        except HTTPFailure as exc:
            code = ErrorCode.MODEL_NOT_FOUND if exc.status == 404 else ErrorCode.BAD_REQUEST
            raise Refused(code, exc.message) from exc
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise Refused(ErrorCode.BAD_REQUEST, "'stream' must be true or false")
        if stream and not described.get("streams"):
            message = f"{described['name']} does not stream; send stream: false"
            raise Refused(ErrorCode.BAD_REQUEST, message)
        request = Request(
            id=request_id,
            model=str(described["name"]),
            inputs=_json(inputs_from_json, body.get("inputs"), described),
            params=_json(params_from_json, body.get("params")),
            priority=_priority(body.get("priority")),
            deadline_ms=_deadline(body.get("deadline_ms")),
            stream=stream,
            strategy=_strategy(body.get("strategy")),
            hedge_ms=_hedge(body.get("hedge_ms")),
        )
        return request, tag

    async def _infer(self, request: Request, tag: str, scope: trio.CancelScope) -> None:
        seq = 0

        async def emit(outputs: Mapping[str, Value]) -> None:
            nonlocal seq
            frame = {"type": "chunk", "id": tag, "seq": seq, "outputs": jsonable(outputs)}
            seq += 1
            await self._out_send.send(frame)

        try:
            with scope:
                result = await self.backend.execute(request, emit)
                frame = {"type": "result", "id": tag, "outputs": jsonable(result.outputs)}
                await self._out_send.send({**frame, "meta": dict(result.meta)})
                return
            await self._error(tag, ErrorCode.CANCELLED, "cancelled by the client")
        except SwarmError as exc:
            await self._error(tag, exc.code, str(exc), getattr(exc, "retry_after_ms", None))
        except Exception:
            log.exception("WebSocket inference %s failed", request.id)
            await self._error(tag, ErrorCode.INTERNAL, "the gateway failed; see the node's log")
        finally:
            self.running.pop(tag, None)

    async def _error(
        self, tag: Any, code: ErrorCode, message: str, retry_after_ms: int | None = None
    ) -> None:
        frame: dict[str, Any] = {"type": "error", "id": tag, "code": str(code), "message": message}
        if retry_after_ms is not None:
            frame["retry_after_ms"] = retry_after_ms
        await self._out_send.send(frame)


def _authorized(socket: WebSocket, token: str) -> bool:
    scheme, _, given = socket.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer":
        given = socket.query_params.get("token", "")
    return hmac.compare_digest(given.strip().encode(), token.encode())


def _parse(text: str) -> dict[str, Any]:
    try:
        body = bounded_json.loads(text)
    except bounded_json.BadJSON as exc:
        raise Refused(ErrorCode.MALFORMED, f"the message is {exc}") from exc
    if not isinstance(body, dict):
        raise Refused(ErrorCode.MALFORMED, "a message is a JSON object with a 'type'")
    return body


def _topics(raw: Any) -> set[Topic]:
    names = ", ".join(str(t) for t in Topic)
    if not isinstance(raw, list) or not raw:
        raise Refused(ErrorCode.BAD_REQUEST, f"'topics' must be a list of: {names}")
    try:
        return {Topic(t) for t in raw}
    except ValueError as exc:
        raise Refused(ErrorCode.BAD_REQUEST, f"{exc}; topics are: {names}") from exc


def _json(read: Callable[..., T], *args: Any) -> T:
    """A value read from the message's JSON; what does not fit is BAD_REQUEST."""
    try:
        return read(*args)
    except BadValue as exc:
        raise Refused(ErrorCode.BAD_REQUEST, str(exc)) from exc


def _priority(raw: Any) -> Priority:
    if raw is None:
        return Priority.NORMAL
    try:
        return Priority.parse(str(raw))
    except ValueError as exc:
        raise Refused(ErrorCode.BAD_REQUEST, f"'priority': {exc}") from exc


def _deadline(raw: Any) -> int | None:
    if raw is None:
        return None
    if type(raw) is not int or not 0 < raw <= MAX_DEADLINE_MS:
        message = f"'deadline_ms' must be milliseconds from 1 to {MAX_DEADLINE_MS}"
        raise Refused(ErrorCode.BAD_REQUEST, message)
    return raw


def _hedge(raw: Any) -> int | None:
    if raw is None:
        return None
    if type(raw) is not int or not 0 <= raw <= MAX_HEDGE_MS:
        message = f"'hedge_ms' must be milliseconds from 0 to {MAX_HEDGE_MS}"
        raise Refused(ErrorCode.BAD_REQUEST, message)
    return raw


def _strategy(raw: Any) -> str | None:
    if raw is not None and not isinstance(raw, str):
        raise Refused(ErrorCode.BAD_REQUEST, "'strategy' must be a text")
    return raw


def _live(table: PeerTable | None) -> list[Peer]:
    return list(live_peers(table)) if table is not None else []


def _now_ms() -> int:
    return time.time_ns() // 1_000_000
