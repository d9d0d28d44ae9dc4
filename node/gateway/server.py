"""The gateway's HTTP server: hypercorn's trio worker serving a Starlette app.

Both run on the node's own trio loop (Starlette through anyio), so routes call
``InferenceService`` directly: no thread, no second event loop. The server
lives in the daemon's nursery; when the node begins to stop it stops accepting
(hypercorn's shutdown trigger), lets requests in flight finish while the
service drains, and the nursery's cancellation ends whatever is left.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from trio_typing import TaskStatus

from . import anthropic, kserve, ollama, openai, page, responses, ws
from .app import Backend, guarded, json_object, read_json
from .config import GatewayConfig, is_loopback
from .errors import HTTPFailure, error_response

log = logging.getLogger(__name__)

METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # Prometheus' text format


def build_app(backend: Backend, config: GatewayConfig) -> Starlette:
    public, guard = guarded(config, public=True), guarded(config)

    @public
    async def health(request: HTTPRequest) -> Response:
        return JSONResponse({"status": "ok"})

    @guard
    async def status(request: HTTPRequest) -> Response:
        return JSONResponse(backend.status())

    @guard
    async def metrics(request: HTTPRequest) -> Response:
        if backend.metrics is None:
            return error_response(404, "this node exports no metrics", "not_found")
        return Response(backend.metrics(), media_type=METRICS_TYPE)

    async def _manage(request: HTTPRequest, action: Any) -> Response:
        if action is None:
            return error_response(
                404, "this node does not manage its models over HTTP", "not_found"
            )
        body = json_object(await read_json(request, config.max_body))
        name = body.get("model")
        if not isinstance(name, str) or not name:
            raise HTTPFailure(400, "give the model's name as 'model'", "invalid_request")
        return JSONResponse(dict(await action(name)))

    @guard
    async def load(request: HTTPRequest) -> Response:
        return await _manage(request, backend.load_model)

    @guard
    async def unload(request: HTTPRequest) -> Response:
        return await _manage(request, backend.unload_model)

    async def http_error(request: HTTPRequest, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)  # registered for HTTPException only
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(exc.status_code, str(exc.detail), code, path=request.url.path)

    # Imported here: the MCP SDK takes ~0.4 s to import, which CLI commands that never
    # serve HTTP (submit, status) should not pay.
    from node.mcp.server import McpEndpoint

    mcp = McpEndpoint(backend, config)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with mcp.running():  # the MCP endpoint's task group, in the server's nursery
            yield

    return Starlette(
        routes=[
            Route("/health", health, methods=["GET"]),
            Route("/mcp", mcp),  # MCP streamable HTTP (POST; the SDK answers other methods)
            Route("/status", status, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
            Route("/models/load", load, methods=["POST"]),
            Route("/models/unload", unload, methods=["POST"]),
            *openai.routes(backend, config),
            *responses.routes(backend, config),
            *anthropic.routes(backend, config),
            *ollama.routes(backend, config),
            *kserve.routes(backend, config),
            *ws.routes(backend, config),
            *page.routes(backend, config),
        ],
        exception_handlers={HTTPException: http_error},
        lifespan=lifespan,
    )


class Gateway:
    """One HTTP gateway; ``url`` is set once it listens."""

    def __init__(
        self,
        backend: Backend,
        config: GatewayConfig,
        *,
        shutdown: Callable[[], Awaitable[Any]],
        grace_s: float = 10.0,
    ) -> None:
        self.backend = backend
        self.config = config
        self.shutdown = shutdown
        self.grace_s = grace_s
        self.url = ""

    async def run(self, *, task_status: TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        cfg = self.config
        hyper = Config()
        host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
        hyper.bind = [f"{host}:{cfg.port}"]
        hyper.graceful_timeout = self.grace_s
        hyper.accesslog = None
        # Past this a WebSocket is closed (1009); up to it, ws.py answers an oversized
        # message with a TOO_LARGE error frame and the connection stays open.
        hyper.websocket_max_message_size = 2 * cfg.max_body
        # Starlette is an ASGI app; hypercorn's typing spells ASGI's callables more narrowly.
        app: Any = build_app(self.backend, cfg)

        async def serving(*, task_status: TaskStatus[list[str]]) -> None:
            await serve(app, hyper, shutdown_trigger=self.shutdown, task_status=task_status)

        async with trio.open_nursery() as nursery:
            binds: list[str] = await nursery.start(serving)
            self.url = binds[0]
            if not is_loopback(cfg.host):
                guard = "a bearer token" if cfg.token else "NO token (--http-insecure)"
                log.warning("HTTP gateway on %s beyond loopback, guarded by %s", self.url, guard)
            log.info("HTTP gateway on %s", self.url)
            task_status.started(self.url)
