"""Bad JSON of any shape is the client's fault on every API, and the gateway keeps serving.

A body nested 100,000 arrays deep is valid JSON grammar but more than any parser
should follow (Python's ``json`` raises RecursionError on it): each API must answer
it as bad input in its own shape (a 400 for HTTP routes, a typed error frame on the
WebSocket) and then serve the next request as usual. Real nodes: the gateway node
serves nothing; a second node serves ``fake:echo``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import trio
from conftest import NodeFactory
from trio_websocket import open_websocket_url as open_ws

from node.gateway import GatewayConfig
from runners.remote.kserve_v2 import HEADER_LENGTH

DEPTH = 100_000
DEEP = b"[" * DEPTH + b"]" * DEPTH
WAIT_S = 20
TEXT = {"name": "text", "shape": [1], "datatype": "BYTES", "data": ["a"]}
MCP_HEADERS = {"Accept": "application/json, text/event-stream"}


@asynccontextmanager
async def gateway_url(node_factory: NodeFactory) -> AsyncIterator[str]:
    async with (
        node_factory("serving", models=("fake:echo",)) as serving,
        node_factory(
            "gateway", models=(), peers=(serving.addrs[0],), http=GatewayConfig()
        ) as gateway,
    ):
        assert gateway.gateway is not None
        yield gateway.gateway.url


def deep_in(prefix: bytes, suffix: bytes = b"}") -> bytes:
    """A JSON object whose last value is ``DEEP``."""
    return prefix + DEEP + suffix


async def test_deep_json_is_a_400_on_the_openai_routes(node_factory: NodeFactory) -> None:
    async with (
        gateway_url(node_factory) as url,
        httpx.AsyncClient(base_url=url, timeout=WAIT_S) as http,
    ):
        answers = {
            "whole body": await http.post("/v1/embeddings", content=DEEP),
            "input": await http.post(
                "/v1/embeddings", content=deep_in(b'{"model": "echo", "input": ')
            ),
            "messages": await http.post(
                "/v1/chat/completions", content=deep_in(b'{"model": "echo", "messages": ')
            ),
        }
        after = await http.post("/v1/embeddings", json={"model": "echo", "input": "still here"})
    for what, answer in answers.items():
        assert answer.status_code == 400, (what, answer.text)
        error = answer.json()["error"]
        assert error["code"] == "invalid_json" and "nested" in error["message"], what
        assert "Recursion" not in error["message"]  # no exception names to clients
    assert after.status_code == 200 and after.json()["data"][0]["embedding"]


async def test_deep_json_is_a_400_on_the_responses_anthropic_and_ollama_routes(
    node_factory: NodeFactory,
) -> None:
    """Each in its own error shape: OpenAI's, Anthropic's, Ollama's."""
    chat = {"model": "echo", "messages": [{"role": "user", "content": "still here"}]}
    async with (
        gateway_url(node_factory) as url,
        httpx.AsyncClient(base_url=url, timeout=WAIT_S) as http,
    ):
        responses = await http.post(
            "/v1/responses", content=deep_in(b'{"model": "echo", "input": ')
        )
        messages = await http.post(
            "/v1/messages", content=deep_in(b'{"model": "echo", "messages": ')
        )
        ollama = await http.post("/api/chat", content=deep_in(b'{"model": "echo", "messages": '))
        whole = await http.post("/api/embed", content=DEEP)
        after = await http.post("/v1/messages", json={**chat, "max_tokens": 8})
        after_ollama = await http.post("/api/chat", json={**chat, "stream": False})
    for answer in (responses, messages, ollama, whole):
        assert answer.status_code == 400, answer.text
        assert "nested" in answer.text and "Recursion" not in answer.text
    assert responses.json()["error"]["code"] == "invalid_json"
    assert messages.json()["error"]["type"] == "invalid_request_error"
    assert isinstance(ollama.json()["error"], str) and isinstance(whole.json()["error"], str)
    assert after.status_code == 200 and after.json()["content"][0]["text"]
    assert after_ollama.status_code == 200 and after_ollama.json()["done"] is True


async def test_deep_json_is_a_400_on_kserve_v2_json_and_binary(node_factory: NodeFactory) -> None:
    async with (
        gateway_url(node_factory) as url,
        httpx.AsyncClient(base_url=url, timeout=WAIT_S) as http,
    ):
        plain = await http.post("/v2/models/echo/infer", content=DEEP)
        inputs = await http.post(
            "/v2/models/echo/infer", content=deep_in(b'{"inputs": [], "parameters": {"p": ', b"}}")
        )
        header = deep_in(b'{"inputs": ')
        binary = await http.post(
            "/v2/models/echo/infer",
            content=header + b"\x00" * 4,
            headers={HEADER_LENGTH: str(len(header))},
        )
        after = await http.post("/v2/models/echo/infer", json={"inputs": [TEXT]})
    for answer in (plain, inputs, binary):
        assert answer.status_code == 400, answer.text
        message = answer.json()["error"]
        assert isinstance(message, str) and "nested" in message
    assert after.status_code == 200 and after.json()["model_name"] == "echo"


async def test_deep_json_on_the_websocket_is_an_error_frame(node_factory: NodeFactory) -> None:
    async with gateway_url(node_factory) as url:
        ws_url = url.replace("http://", "ws://") + "/ws/deep"
        async with open_ws(ws_url) as ws:
            await ws.send_message(DEEP.decode())
            with trio.fail_after(WAIT_S):
                refused = json.loads(await ws.get_message())
            request = {"type": "inference", "id": "after", "model": "echo", "inputs": "x"}
            await ws.send_message(json.dumps(request))
            with trio.fail_after(WAIT_S):
                after = json.loads(await ws.get_message())
    assert refused["type"] == "error" and refused["code"] == "MALFORMED"
    assert "nested" in refused["message"] and "Recursion" not in refused["message"]
    assert after["type"] == "result" and after["id"] == "after"


async def test_deep_json_on_mcp_is_a_400(node_factory: NodeFactory) -> None:
    listing = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
    async with (
        gateway_url(node_factory) as url,
        httpx.AsyncClient(base_url=url, timeout=WAIT_S, headers=MCP_HEADERS) as http,
    ):
        deep = await http.post(
            "/mcp",
            content=deep_in(b'{"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": '),
            headers={"Content-Type": "application/json"},
        )
        after = await http.post("/mcp", json=listing)
    assert deep.status_code == 400, deep.text
    assert "Recursion" not in deep.text
    assert after.status_code == 200, after.text
    tools: list[dict[str, Any]] = after.json()["result"]["tools"]
    assert any(t["name"] == "route_inference" for t in tools)
