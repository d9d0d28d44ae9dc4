"""Wire helpers of the endpoint: bounded reads, streamed lines, and error translation.

Kept apart from ``endpoint`` (the policy: slots, retries, breaker, keys) because
these only move and interpret bytes: read a body up to a limit, split a stream
into lines up to a limit, turn httpx's and trio's exceptions into the
``BackendError`` tree, and pull the message out of an error body.
"""

from __future__ import annotations

import codecs
import json
from typing import Any, Literal, Protocol

import httpx
import trio

from protocols import bounded_json

from .errors import (
    BackendError,
    BackendFailed,
    BackendGarbage,
    BackendTimeout,
    BackendUnreachable,
)

MAX_BODY_BYTES = 256 * 2**20
MAX_LINE_BYTES = 4 * 2**20
MAX_ERROR_CHARS = 400
FAILURES = (BackendUnreachable, BackendTimeout, BackendFailed, BackendGarbage)


class Context(Protocol):
    """What the helpers need of an endpoint: its name and its key scrubber."""

    @property
    def name(self) -> str: ...

    def scrub(self, text: str) -> str: ...


class Lines:
    """Text lines of a streamed answer, each read before the deadline, each bounded."""

    def __init__(self, ctx: Context, response: httpx.Response, where: str, deadline: float) -> None:
        self._ctx = ctx
        self._chunks = response.aiter_bytes()
        self._where = where
        self._deadline = deadline
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = ""
        self._ready: list[str] = []
        self._ended = False
        self.failure: BackendError | None = None

    async def aclose(self) -> None:
        await self._chunks.aclose()  # type: ignore[attr-defined]

    def __aiter__(self) -> Lines:
        return self

    async def __anext__(self) -> str:
        try:
            return await self._next()
        except FAILURES as exc:
            self.failure = exc
            raise

    async def _next(self) -> str:
        while not self._ready:
            if self._ended:
                raise StopAsyncIteration
            with translated(self._ctx, self._where, self._deadline):
                try:
                    chunk = await self._chunks.__anext__()
                except StopAsyncIteration:
                    chunk = None
            if chunk is None:
                self._ended = True
                tail = self._pending + self._decoder.decode(b"", final=True)
                self._pending = ""
                if tail:
                    self._ready.append(tail.rstrip("\r"))
                continue
            self._pending += self._decoder.decode(chunk)
            *complete, self._pending = self._pending.split("\n")
            self._ready.extend(line.rstrip("\r") for line in complete)
            if len(self._pending) > MAX_LINE_BYTES:
                raise BackendGarbage(
                    f"{self._ctx.name}: {self._where}: a streamed line over {MAX_LINE_BYTES} bytes"
                )
        return self._ready.pop(0)


class translated:
    """Turn httpx's and trio's failures inside the block into BackendErrors."""

    def __init__(self, ctx: Context, where: str, deadline: float) -> None:
        self._ctx = ctx
        self._where = where
        self._scope = trio.CancelScope(deadline=deadline)

    def __enter__(self) -> None:
        self._scope.__enter__()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: Any
    ) -> Literal[False]:
        self._scope.__exit__(kind, exc, tb)
        name = self._ctx.name
        if self._scope.cancelled_caught:
            raise BackendTimeout(f"{name}: {self._where}: no whole answer before the deadline")
        if exc is None or not isinstance(exc, httpx.HTTPError):
            return False
        text = self._ctx.scrub(str(exc))[:MAX_ERROR_CHARS]
        if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout):
            raise BackendUnreachable(f"{name}: {self._where}: cannot connect: {text}") from exc
        if isinstance(exc, httpx.TimeoutException):
            raise BackendTimeout(f"{name}: {self._where}: timed out: {text}") from exc
        if isinstance(exc, httpx.TransportError):
            raise BackendFailed(f"{name}: {self._where}: connection lost: {text}") from exc
        raise BackendFailed(f"{name}: {self._where}: {type(exc).__name__}: {text}") from exc


async def read_bounded(response: httpx.Response, limit: int, ctx: Context, where: str) -> bytes:
    parts: list[bytes] = []
    size = 0
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if size > limit:
            if not 200 <= response.status_code < 300:
                break  # an error's body: its start says enough
            raise BackendGarbage(f"{ctx.name}: {where}: answer over {limit} bytes")
        parts.append(chunk)
    return b"".join(parts)


def decode_json(where: str, data: bytes) -> Any:
    if not data.strip():
        return None
    try:
        return bounded_json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:  # BadJSON too: garbage, however deep
        raise BackendGarbage(f"{where}: the answer is not JSON: {exc}") from exc


def decode_raw(where: str, data: bytes) -> bytes:
    return data


def error_detail(data: bytes) -> str:
    """The message of an error body in the usual shapes (OpenAI, TEI, FastAPI), trimmed."""
    text = data.decode("utf-8", errors="replace").strip()
    try:
        parsed = bounded_json.loads(text)
    except ValueError:
        return text[:MAX_ERROR_CHARS] or "(empty body)"
    message: Any = parsed
    if isinstance(parsed, dict):
        for field in ("error", "message", "detail"):
            if field in parsed:
                message = parsed[field]
                break
        if isinstance(message, dict) and "message" in message:
            message = message["message"]
    text = message if isinstance(message, str) else json.dumps(message)
    return text[:MAX_ERROR_CHARS]
