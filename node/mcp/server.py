"""The MCP server of a node, and its streamable HTTP endpoint on the gateway.

``build_server`` makes one low-level ``mcp`` server from ``tools.TOOLS``. The
SDK's higher-level ``MCPServer`` is not used: it infers schemas from Python
signatures and configures the root logger when built, while the tools here
declare their schemas and check their arguments themselves.

``McpEndpoint`` is the ASGI app mounted at ``/mcp``. It runs on the node's trio
loop like every gateway route: the SDK is written on anyio, whose trio backend
runs its task groups as trio nurseries (no thread, no asyncio loop). Its
session manager is stateless (each POST is answered on its own, with JSON, not
SSE): the tools need no server-to-client requests, and no per-client session is
held on the node. Its task group lives for the app's lifespan, inside the
gateway's nursery. The same bearer token as every other route guards it, and
on loopback the SDK's DNS-rebinding check refuses Host and Origin headers that
are not loopback ones (a web page's script cannot reach it through a name).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import mcp_types as types
from mcp.server.context import ServerRequestContext
from mcp.server.lowlevel import Server
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from mcp.server.transport_security import TransportSecuritySettings
from starlette.requests import Request as HTTPRequest
from starlette.types import Receive, Scope, Send

from capabilities.record import software_version
from node.errors import NodeError
from node.gateway.app import Backend, authorize
from node.gateway.config import GatewayConfig, is_loopback
from node.gateway.errors import HTTPFailure, error_response
from protocols import SwarmError

from . import tools

log = logging.getLogger(__name__)

SERVER_NAME = "swarm"
INSTRUCTIONS = (
    "Tools of a swarm node (peer-to-peer inference). list_tasks and list_peers show what the "
    "swarm can do and where; select_peer says where a job would run; route_inference runs one."
)


def tool_list() -> list[types.Tool]:
    return [
        types.Tool(
            name=t.name,
            description=t.description,
            input_schema=dict(t.schema),
            annotations=types.ToolAnnotations(
                read_only_hint=t.read_only, idempotent_hint=True, open_world_hint=False
            ),
        )
        for t in tools.TOOLS
    ]


def error_result(exc: SwarmError) -> types.CallToolResult:
    """A failed call as the tool's answer: ``CODE: message``, and the same as data."""
    error: dict[str, Any] = {"code": str(exc.code), "message": str(exc)}
    retry_ms = getattr(exc, "retry_after_ms", None)
    if isinstance(retry_ms, int):
        error["retry_after_ms"] = retry_ms
    text = f"{exc.code}: {exc}"
    return types.CallToolResult(
        content=[types.TextContent(type="text", text=text)],
        structured_content={"error": error},
        is_error=True,
    )


def build_server(backend: Backend) -> Server[Any]:
    """An MCP server whose tools act on ``backend``'s node."""

    async def list_tools(
        ctx: ServerRequestContext[Any], params: types.PaginatedRequestParams | None
    ) -> types.ListToolsResult:
        return types.ListToolsResult(tools=tool_list())

    async def call_tool(
        ctx: ServerRequestContext[Any], params: types.CallToolRequestParams
    ) -> types.CallToolResult:
        try:
            answer = await tools.call(backend, params.name, params.arguments)
        except SwarmError as exc:
            log.info("MCP tool %s failed: %s [%s]", params.name, exc, exc.code)
            return error_result(exc)
        except Exception:
            log.exception("MCP tool %s failed", params.name)
            return error_result(NodeError("the tool failed; see the node's log"))
        return types.CallToolResult(
            content=[types.TextContent(type="text", text=tools.dumps(answer))],
            structured_content=answer,
        )

    return swarm_server(list_tools, call_tool)


ListTools = Callable[
    [ServerRequestContext[Any], types.PaginatedRequestParams | None],
    Awaitable[types.ListToolsResult],
]
CallTool = Callable[
    [ServerRequestContext[Any], types.CallToolRequestParams], Awaitable[types.CallToolResult]
]


def swarm_server(list_tools: ListTools, call_tool: CallTool) -> Server[Any]:
    """The MCP server swarm presents, in-node or bridged: its name, version and
    instructions, with the handlers that answer tools/list and tools/call."""
    return Server(
        SERVER_NAME,
        version=software_version(),
        instructions=INSTRUCTIONS,
        on_list_tools=list_tools,
        on_call_tool=call_tool,
    )


class McpEndpoint:
    """``/mcp``: MCP's streamable HTTP transport over ``build_server(backend)``."""

    def __init__(self, backend: Backend, config: GatewayConfig) -> None:
        self.config = config
        security = None
        if is_loopback(config.host):
            loopback = ("127.0.0.1", "localhost", "[::1]")
            security = TransportSecuritySettings(
                enable_dns_rebinding_protection=True,
                allowed_hosts=[f"{h}:*" for h in loopback],
                allowed_origins=[f"http://{h}:*" for h in loopback],
            )
        self.manager = StreamableHTTPSessionManager(
            app=build_server(backend),
            stateless=True,
            json_response=True,
            security_settings=security,
            max_request_body_size=config.max_body,
        )

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """The session manager's task group: enter it before serving (app lifespan)."""
        async with self.manager.run():
            yield

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.config.token is not None:
            try:
                authorize(HTTPRequest(scope), self.config.token)
            except HTTPFailure as exc:
                await error_response(exc.status, exc.message, exc.code)(scope, receive, send)
                return
        await self.manager.handle_request(scope, receive, send)
