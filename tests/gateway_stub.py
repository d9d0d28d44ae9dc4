"""A gateway on its own, over a stub Backend whose jobs answer or fail as a test says.

For what real nodes cannot be made to do on demand: a job that fails with a
given swarm error after it streamed some text, or a model of any description.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

import trio

from node.gateway import Backend, Gateway, GatewayConfig
from protocols import ErrorCode, Request, Result, Value
from protocols.errors import RemoteError

GENERATOR = {"name": "gen", "task": "text-generation", "runner": "openvino-genai"}
Execute = Callable[[Request, Callable[[Mapping[str, Value]], Awaitable[None]]], Awaitable[Result]]


def failing(
    code: ErrorCode, pieces: Sequence[str] = (), retry_after_ms: int | None = None
) -> Execute:
    """Jobs that stream ``pieces`` of text, then fail with ``code``."""

    async def execute(
        request: Request, emit: Callable[[Mapping[str, Value]], Awaitable[None]]
    ) -> Result:
        for piece in pieces:
            await emit({"text": piece})
        raise RemoteError(code, "made to fail by the test", retry_after_ms=retry_after_ms)

    return execute


@asynccontextmanager
async def stub_gateway(
    execute: Execute, models: Sequence[Mapping[str, Any]] = (GENERATOR,), **config: Any
) -> AsyncIterator[str]:
    """The URL of a gateway whose backend runs jobs with ``execute``."""
    described = {m["name"].casefold(): m for m in models}
    backend = Backend(execute, lambda: described, dict)
    stop = trio.Event()
    gateway = Gateway(backend, GatewayConfig(**config), shutdown=stop.wait, grace_s=1)
    async with trio.open_nursery() as nursery:
        url = await nursery.start(gateway.run)
        try:
            yield url
        finally:
            stop.set()
