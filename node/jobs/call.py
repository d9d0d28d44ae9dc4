"""One /swarm/infer exchange from the calling side, on any framed stream.

Request out, Chunk* and then Result or Error back; a Cancel when the caller is
cancelled. Shared by the libp2p caller (``outbound``, which pools the streams)
and the CLI's local-socket client; it imports no libp2p. ``client_request`` is
the Request a client's arguments make, for both clients (``node.client``, the
CLI's ``local_client``).
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import numpy as np
import trio

from node.errors import ConnectionLost, PeerUnavailable
from node.net.frames import Framed
from protocols import (
    Cancel,
    Chunk,
    Error,
    Exchange,
    Param,
    Priority,
    RemoteError,
    Request,
    Result,
    Role,
    State,
    Tensor,
    Value,
)

OnChunk = Callable[[Chunk], Awaitable[None]]
# A client waits this much longer than the job's own deadline, so the node's typed
# DEADLINE_EXCEEDED reaches it before its own timer fires.
DEADLINE_GRACE_S = 1.0


def new_request_id() -> str:
    return secrets.token_hex(8)


def client_request(
    model: str,
    inputs: Mapping[str, Value | np.ndarray[Any, Any]],
    *,
    params: Mapping[str, Param] | None = None,
    priority: Priority = Priority.NORMAL,
    deadline_s: float | None = None,
    stream: bool = False,
    request_id: str | None = None,
    strategy: str | None = None,
    verify: int = 0,
    hedge_ms: int | None = None,
    idempotent: bool = True,
) -> Request:
    """The Request for a client's arguments: numpy arrays become tensors, the
    deadline whole milliseconds (at least 1), a fresh id unless one is given."""
    return Request(
        id=request_id or new_request_id(),
        model=model,
        inputs={k: _as_value(v) for k, v in inputs.items()},
        params=dict(params or {}),
        priority=priority,
        deadline_ms=None if deadline_s is None else max(1, int(deadline_s * 1000)),
        stream=stream,
        strategy=strategy,
        verify=verify,
        hedge_ms=hedge_ms,
        idempotent=idempotent,
    )


def _as_value(value: Value | np.ndarray[Any, Any]) -> Value:
    return Tensor.from_numpy(value) if isinstance(value, np.ndarray) else value


async def exchange(stream: Framed, request: Request, on_chunk: OnChunk | None) -> Result:
    """One request and its answer on ``stream``, which must be idle.

    Raises RemoteError for a typed Error answer, PeerUnavailable when the request
    could not be sent, ConnectionLost when the stream broke after it left.
    """
    exchange = Exchange(Role.CALLER)
    exchange.send(request)
    try:
        await stream.send(request)
    except ConnectionLost as exc:
        raise PeerUnavailable(f"the request could not be sent: {exc}") from exc
    try:
        while True:
            message = await stream.receive()
            if message is None:
                raise ConnectionLost(f"{stream.peer_id} closed the stream without answering")
            exchange.receive(message)
            if isinstance(message, Chunk):
                if on_chunk is not None and exchange.state is State.ACTIVE:
                    await on_chunk(message)
            elif isinstance(message, Result):
                return message
            elif isinstance(message, Error):
                raise RemoteError(
                    message.code, message.message, retry_after_ms=message.retry_after_ms
                )
    except trio.Cancelled:
        # Tell the peer to stop; the stream is then closed, never reused.
        with trio.CancelScope(shield=True), trio.move_on_after(1.0):
            cancel = Cancel(request.id)
            exchange.send(cancel)
            with contextlib.suppress(ConnectionLost):
                await stream.send(cancel)
        raise
