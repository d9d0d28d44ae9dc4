"""A Server-Sent Events answer fed straight from a swarm stream's ``emit``.

No queue sits between the swarm and the socket: each chunk the service emits
is written at once, so a slow HTTP reader slows the stream down (the
backpressure reaches the runner) instead of piling chunks up in memory. The
status line waits for the first event, so an error before any output is a
plain HTTP error with its status; one after it is an ``error`` event. If the
client goes away the swarm work is cancelled.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from protocols import SwarmError

from .errors import STATUS, HTTPFailure, error_body, error_response, swarm_error_response

log = logging.getLogger(__name__)

Write = Callable[[dict[str, Any]], Awaitable[None]]
Produce = Callable[[Write], Awaitable[None]]


def event(data: dict[str, Any] | str) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


class EventStream(Response):
    """Runs ``produce(write)``; each ``write(obj)`` is one ``data:`` event; ends with [DONE]."""

    media_type = "text/event-stream"

    def __init__(self, produce: Produce) -> None:
        super().__init__(content=None)
        self.produce = produce

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = False

        async def write(data: dict[str, Any]) -> None:
            nonlocal started
            if not started:
                started = True
                await send(
                    {
                        "type": "http.response.start",
                        "status": 200,
                        "headers": [
                            (b"content-type", b"text/event-stream; charset=utf-8"),
                            (b"cache-control", b"no-cache"),
                        ],
                    }
                )
            await send({"type": "http.response.body", "body": event(data), "more_body": True})

        gone = False

        async def watch(cancel: trio.CancelScope) -> None:
            nonlocal gone
            while (await receive())["type"] != "http.disconnect":
                pass
            gone = True
            cancel.cancel()

        failure: tuple[Response, int, str, str] | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch, nursery.cancel_scope)
            try:
                await self.produce(write)
            except HTTPFailure as exc:
                refusal: Response = error_response(exc.status, exc.message, exc.code)
                failure = (refusal, exc.status, exc.message, exc.code)
            except SwarmError as exc:
                status = STATUS.get(exc.code, 500)
                failure = (swarm_error_response(exc), status, str(exc), str(exc.code).lower())
            nursery.cancel_scope.cancel()
        if gone:
            return  # the client left; its work was cancelled
        if failure is not None:
            response, status, message, code = failure
            if not started:
                await response(scope, receive, send)
                return
            await write(error_body(status, message, code))
        if not started:  # produced nothing at all: still a well-formed stream
            await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": event("[DONE]"), "more_body": False})
