"""Streamed answers fed straight from a swarm stream's ``emit``: Server-Sent Events
(OpenAI, the Responses API, Anthropic) and newline-delimited JSON (Ollama).

No queue sits between the swarm and the socket: each chunk the service emits
is written at once, so a slow HTTP reader slows the stream down (the
backpressure reaches the runner) instead of piling chunks up in memory. The
status line waits for the first event, so an error before any output is a
plain HTTP error with its status, in the shape of the API the path belongs to
(``errors``); one after it is a last event in the stream's own shape
(``failed``). If the client goes away the swarm work is cancelled.

The APIs differ only in framing: OpenAI's chat streams are bare ``data:``
events ending with ``data: [DONE]``; the Responses API and Anthropic name each
event after its ``type`` (``event: message_start``) and end without a marker;
Ollama writes one JSON object per line.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import trio
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from protocols import SwarmError

from .errors import HTTPFailure, error_body, error_response, swarm_error_response, swarm_status

log = logging.getLogger(__name__)

Write = Callable[[dict[str, Any]], Awaitable[None]]
Produce = Callable[[Write], Awaitable[None]]
# (status, message, code) of a failure after the stream began -> its last event.
Failed = Callable[[int, str, str], dict[str, Any]]


def event(data: dict[str, Any] | str, name: str | None = None) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    head = f"event: {name}\n" if name else ""
    return f"{head}data: {text}\n\n".encode()


class _Streamed(Response):
    """Runs ``produce(write)``; each ``write(obj)`` is one frame (``frame``)."""

    content_type = b""
    end = b""  # written after the last frame

    def __init__(
        self,
        produce: Produce,
        *,
        path: str = "",
        failed: Failed | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(content=None)
        self.produce = produce
        self.path = path  # the API whose error shapes a failure before the first frame takes
        self.failed = failed or (lambda status, message, code: error_body(status, message, code))
        self.extra = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]

    def frame(self, data: dict[str, Any]) -> bytes:
        raise NotImplementedError

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = False

        async def begin() -> None:
            nonlocal started
            if not started:
                started = True
                headers = [(b"content-type", self.content_type), *self.extra]
                if self.media_type == "text/event-stream":
                    headers.append((b"cache-control", b"no-cache"))
                await send({"type": "http.response.start", "status": 200, "headers": headers})

        async def write(data: dict[str, Any]) -> None:
            await begin()
            await send({"type": "http.response.body", "body": self.frame(data), "more_body": True})

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
                status, message, code = exc.status, exc.message, exc.code
                refusal = error_response(status, message, code, path=self.path)
                failure = (refusal, status, message, code)
            except SwarmError as exc:
                status, code = swarm_status(exc, path=self.path), str(exc.code).lower()
                failure = (swarm_error_response(exc, path=self.path), status, str(exc), code)
            nursery.cancel_scope.cancel()
        if gone:
            return  # the client left; its work was cancelled
        if failure is not None:
            response, status, message, code = failure
            if not started:
                await response(scope, receive, send)
                return
            await write(self.failed(status, message, code))
        await begin()  # produced nothing at all: still a well-formed stream
        await send({"type": "http.response.body", "body": self.end, "more_body": False})


class EventStream(_Streamed):
    """Server-Sent Events: bare ``data:`` events ending with ``data: [DONE]`` (OpenAI's
    chat), or with ``named`` each event named after its data's ``type`` and no end
    marker (the Responses API, Anthropic)."""

    media_type = "text/event-stream"
    content_type = b"text/event-stream; charset=utf-8"

    def __init__(
        self,
        produce: Produce,
        *,
        named: bool = False,
        path: str = "",
        failed: Failed | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(produce, path=path, failed=failed, headers=headers)
        self.named = named
        self.end = b"" if named else event("[DONE]")

    def frame(self, data: dict[str, Any]) -> bytes:
        return event(data, str(data.get("type")) if self.named else None)


class NDJSONStream(_Streamed):
    """One JSON object per line (Ollama's streams)."""

    media_type = "application/x-ndjson"
    content_type = b"application/x-ndjson"

    def frame(self, data: dict[str, Any]) -> bytes:
        return json.dumps(data, separators=(",", ":")).encode() + b"\n"
