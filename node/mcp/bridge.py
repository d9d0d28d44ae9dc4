"""``swarm mcp``: the node's MCP tools on stdin/stdout, for desktop MCP clients.

The process holds no swarm state: it is an MCP server on stdio whose tool list
and tool calls are forwarded, unchanged, to a running daemon's ``/mcp`` over
streamable HTTP. So the tools are the daemon's own (defined once, in
``tools.py``), answers come from the node that holds the peer table and the
router, and nothing here joins the swarm (a second libp2p identity, its own
peer table, a second router that would not see the daemon's loads).

The daemon's ``/mcp`` is stateless and every call opens its own session, so a
daemon restarted at the same URL is reached again by the next call. A call
that cannot reach it answers a tool error (``NOT_EXECUTED``); the bridge keeps
serving.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import httpx2
import mcp_types as types
import trio
from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.server.context import ServerRequestContext
from mcp.server.lowlevel import Server
from mcp.server.stdio import stdio_server
from mcp.shared.exceptions import MCPError

from node.data_dir import read_state
from node.errors import PeerUnavailable, Unauthorized, sole_error
from protocols import SwarmError
from protocols.errors import ConfigError

from .server import error_result, swarm_server

log = logging.getLogger(__name__)
T = TypeVar("T")

CONNECT_TIMEOUT_S = 10.0
CALL_TIMEOUT_S = 600.0  # a tool call (an inference) may queue and run this long


def daemon_url(data_dir: Path, given: str | None) -> str:
    """The MCP endpoint: ``given`` (a gateway URL, with or without ``/mcp``), else the
    gateway the daemon of ``data_dir`` wrote in its ``daemon.json``."""
    if given is None:
        state = read_state(data_dir)
        if state is None:
            raise ConfigError(
                f"no daemon is running with data dir {data_dir}; start one with "
                "'swarm daemon' (its gateway is on by default) or give --url"
            )
        given = state.get("http")
        if not isinstance(given, str) or not given:
            raise ConfigError(
                f"the daemon of {data_dir} serves no HTTP gateway; start it with "
                "--http 127.0.0.1:PORT or give --url"
            )
    url = given.rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"--url {given!r}: expected http://HOST:PORT[/mcp]")
    return url if url.endswith("/mcp") else f"{url}/mcp"


class Upstream:
    """The daemon's ``/mcp``, asked over one pooled HTTP client.

    The SDK's transport raises a connection failure out of its own task group, which
    ends its session: so each forwarded call opens a session of its own over the
    shared client (``/mcp`` keeps no session state to lose), and one failed call
    leaves the next unharmed.
    """

    def __init__(self, url: str, http: httpx2.AsyncClient) -> None:
        self.url = url
        self.http = http

    @classmethod
    @asynccontextmanager
    async def connect(cls, url: str, token: str | None) -> AsyncIterator[Upstream]:
        headers = {"Authorization": f"Bearer {token}"} if token else None
        timeout = httpx2.Timeout(CONNECT_TIMEOUT_S, read=CALL_TIMEOUT_S)

        async def refused(response: httpx2.Response) -> None:
            """A 401 in words (the SDK reports any HTTP error as "an error response")."""
            if response.status_code == 401:
                given = "a token the gateway refused" if token else "no token"
                raise Unauthorized(f"{url} answered 401: {given}; give --http-token-env VAR")

        hooks = {"response": [refused]}
        async with httpx2.AsyncClient(headers=headers, timeout=timeout, event_hooks=hooks) as http:
            yield cls(url, http)

    async def ask(self, call: Callable[[ClientSession], Awaitable[T]]) -> T:
        """``call`` on a fresh session with the daemon; a SwarmError (PeerUnavailable
        when it did not answer, Unauthorized for its 401) or its MCPError if that fails."""
        try:
            async with (
                streamable_http_client(self.url, http_client=self.http) as (read, write),
                ClientSession(read, write, read_timeout_seconds=CALL_TIMEOUT_S) as session,
            ):
                with trio.fail_after(CONNECT_TIMEOUT_S):
                    await session.initialize()
                return await call(session)
        except Exception as raised:  # the edge: whatever broke talking to the daemon
            exc = sole_error(raised)
            if isinstance(exc, MCPError | SwarmError):  # the daemon answered, refusing
                raise exc from None
            message = f"the daemon's MCP endpoint {self.url} did not answer: {exc}"
            raise PeerUnavailable(message) from exc


def bridge_server(upstream: Upstream) -> Server[Any]:
    """An MCP server that forwards tools/list and tools/call to the daemon's ``/mcp``."""

    async def list_tools(
        ctx: ServerRequestContext[Any], params: types.PaginatedRequestParams | None
    ) -> types.ListToolsResult:
        try:
            return await upstream.ask(lambda s: s.list_tools(params=params))
        except SwarmError as exc:
            raise MCPError(types.INTERNAL_ERROR, str(exc)) from exc

    async def call_tool(
        ctx: ServerRequestContext[Any], params: types.CallToolRequestParams
    ) -> types.CallToolResult:
        try:
            result = await upstream.ask(lambda s: s.call_tool(params.name, params.arguments))
        except SwarmError as exc:
            log.warning("tool %s: %s", params.name, exc)
            return error_result(exc)
        if not isinstance(result, types.CallToolResult):  # the daemon's tools ask for no input
            return error_result(PeerUnavailable(f"the daemon answered {type(result).__name__}"))
        return result

    return swarm_server(list_tools, call_tool)


async def serve_stdio(url: str, token: str | None) -> None:
    """Serve MCP on stdin/stdout until the client closes stdin.

    The daemon is asked once first, so a wrong URL or token fails at start with a
    message (PeerUnavailable, or the daemon's 401) rather than at the first call.
    """
    async with Upstream.connect(url, token) as upstream:
        await upstream.ask(lambda s: s.list_tools())
        server = bridge_server(upstream)
        log.info("MCP on stdio, forwarding to %s", url)
        async with stdio_server() as (read, write):
            await server.run(read, write, server.create_initialization_options())
