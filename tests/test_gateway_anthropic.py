"""Anthropic's Messages API through the gateway: the official ``anthropic`` SDK pointed
at a node that serves nothing; a second node serves fake models (runners/fake.py),
so every answer crossed the swarm. Tool use goes to FakeVLLM behind a peer; failures
the swarm cannot be made to show on demand come from a stub backend (gateway_stub)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import trio
from conftest import NodeFactory
from gateway_stub import failing, stub_gateway
from test_gateway import TOKEN, swarm, words
from test_gateway_responses import request_ids
from test_gateway_tools import WEATHER
from test_gateway_tools import swarm as tool_swarm

from protocols import ErrorCode

ASK = [{"role": "user", "content": "hi"}]
SCHEMA = WEATHER["function"]["parameters"]
TOOL = {"name": "weather", "description": "The weather in a city", "input_schema": SCHEMA}


async def sdk(url: str, call: Callable[[Any], Any], api_key: str = "unused") -> Any:
    """One call of the official anthropic SDK (it blocks: run it in a thread)."""
    from anthropic import Anthropic

    def run() -> Any:
        with Anthropic(base_url=url, api_key=api_key, max_retries=0, timeout=30) as client:
            return call(client)

    return await trio.to_thread.run_sync(run)


async def test_messages_plain_and_streamed(node_factory: NodeFactory) -> None:
    system = [{"type": "text", "text": "be "}, {"type": "text", "text": "brief"}]
    async with swarm(node_factory, token=TOKEN) as (gateway, _, url):
        with request_ids() as ids:
            plain = await sdk(
                url,
                lambda c: c.messages.create(model="echo", max_tokens=16, messages=ASK),
                api_key=TOKEN,
            )
        blocks = await sdk(
            url,
            lambda c: c.messages.create(
                model="echo",
                max_tokens=16,
                system=system,
                messages=[{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                stop_sequences=["\n"],
                # SDK 2.x no longer names the sampling fields; older clients send them.
                extra_body={"temperature": 0.5, "top_p": 0.9, "top_k": 5},
            ),
            api_key=TOKEN,
        )
        events = await sdk(
            url,
            lambda c: list(
                c.messages.create(model="slow", max_tokens=16, messages=ASK, stream=True)
            ),
            api_key=TOKEN,
        )

        def helper(client: Any) -> tuple[list[str], Any]:
            with client.messages.stream(model="echo", max_tokens=16, messages=ASK) as stream:
                return list(stream.text_stream), stream.get_final_message()

        texts, final = await sdk(url, helper, api_key=TOKEN)
        async with httpx.AsyncClient(base_url=url) as http:
            by_key = await http.post(
                "/v1/messages",
                json={"model": "echo", "max_tokens": 4, "messages": ASK},
                headers={"x-api-key": TOKEN, "anthropic-version": "2023-06-01"},
            )
    said = words(json.dumps(ASK), 3)
    assert plain.content[0].type == "text" and plain.content[0].text == said
    assert plain.role == "assistant" and plain.model == "echo" and plain.type == "message"
    assert plain.stop_reason == "end_turn" and plain.stop_sequence is None
    assert plain.usage.input_tokens == 0 and plain.usage.output_tokens == 0  # fakes count nothing
    assert plain.id.startswith("msg_") and ids.count(plain.id) == 2  # logged by both nodes
    turns = [{"role": "system", "content": "be brief"}, *ASK]
    assert blocks.content[0].text == words(json.dumps(turns), 3)
    kinds = [e.type for e in events]
    assert kinds == [
        "message_start",
        "content_block_start",
        *["content_block_delta"] * 3,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert "".join(e.delta.text for e in events if e.type == "content_block_delta") == said
    assert events[-2].delta.stop_reason == "end_turn" and events[-2].usage.output_tokens == 0
    assert "".join(texts) == said and final.content[0].text == said
    assert by_key.status_code == 200 and by_key.json()["content"][0]["text"] == said
    assert gateway.services.service.stats.forwarded == 5


async def test_errors_are_anthropics_and_raise_its_classes(node_factory: NodeFactory) -> None:
    import anthropic

    async with swarm(node_factory, token=TOKEN, max_body=64 * 1024) as (_, _s, url):

        def create(**body: Any) -> Callable[[Any], Any]:
            fields = {"model": "echo", "max_tokens": 8, "messages": ASK, **body}
            return lambda c: c.messages.create(**fields)

        async def raised(call: Callable[[Any], Any], api_key: str = TOKEN) -> Exception:
            try:
                await sdk(url, call, api_key=api_key)
            except anthropic.APIStatusError as exc:
                return exc
            raise AssertionError("no error")

        source = {"type": "base64", "media_type": "image/png", "data": "AA=="}
        image = {"type": "image", "source": source}
        missing = await raised(create(model="nobody"))
        denied = await raised(create(), api_key="wrong")
        picture = await raised(create(messages=[{"role": "user", "content": [image]}]))
        tools = await raised(create(tools=[TOOL]))
        thinking = await raised(create(thinking={"type": "enabled", "budget_tokens": 1024}))
        server_tool = await raised(create(tools=[{"type": "web_search_20250305", "name": "w"}]))
        too_big = await raised(create(messages=[{"role": "user", "content": "x" * 100_000}]))
        async with httpx.AsyncClient(base_url=url, headers={"x-api-key": TOKEN}) as http:
            no_limit = await http.post("/v1/messages", json={"model": "echo", "messages": ASK})
            bad_json = await http.post("/v1/messages", content=b"{not json")
    for exc, cls, kind in (
        (missing, anthropic.NotFoundError, "not_found_error"),
        (denied, anthropic.AuthenticationError, "authentication_error"),
        (picture, anthropic.BadRequestError, "invalid_request_error"),
        (tools, anthropic.BadRequestError, "invalid_request_error"),
        (thinking, anthropic.BadRequestError, "invalid_request_error"),
        (server_tool, anthropic.BadRequestError, "invalid_request_error"),
        (too_big, anthropic.APIStatusError, "request_too_large"),
    ):
        assert isinstance(exc, cls), exc
        assert exc.body["type"] == "error" and exc.body["error"]["type"] == kind, exc.body  # type: ignore[attr-defined]
    assert too_big.status_code == 413  # type: ignore[attr-defined]
    assert "an image" in str(picture) and "cannot call tools" in str(tools)
    assert "thinking" in str(thinking) and "web_search_20250305" in str(server_tool)
    for answer in (no_limit, bad_json):
        assert answer.status_code == 400
        assert answer.json()["type"] == "error"
        assert answer.json()["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in no_limit.json()["error"]["message"]


@pytest.mark.parametrize(
    ("code", "status", "kind"),
    [
        (ErrorCode.OVERLOADED, 529, "overloaded_error"),
        (ErrorCode.NOT_EXECUTED, 529, "overloaded_error"),
        (ErrorCode.DEADLINE_EXCEEDED, 504, "timeout_error"),
        (ErrorCode.INTERNAL, 500, "api_error"),
    ],
)
async def test_swarm_failures_take_anthropics_statuses(
    code: ErrorCode, status: int, kind: str
) -> None:
    import anthropic

    body = {"model": "gen", "max_tokens": 8, "messages": ASK}
    async with stub_gateway(failing(code, retry_after_ms=2000)) as url:
        async with httpx.AsyncClient(base_url=url) as http:
            before = await http.post("/v1/messages", json=body)
        try:
            await sdk(url, lambda c: c.messages.create(**body))
        except anthropic.APIStatusError as exc:
            raised: Exception = exc
    assert before.status_code == status and before.json()["error"]["type"] == kind
    assert isinstance(raised, anthropic.APIStatusError) and raised.status_code == status
    if status == 529:
        assert isinstance(raised, anthropic.OverloadedError)
        assert before.headers["retry-after"] == "2"


async def test_a_failure_mid_stream_is_an_error_event() -> None:
    import anthropic

    body = {"model": "gen", "max_tokens": 8, "messages": ASK, "stream": True}
    async with stub_gateway(failing(ErrorCode.OVERLOADED, ["so far "])) as url:
        async with httpx.AsyncClient(base_url=url) as http:
            raw = await http.post("/v1/messages", json=body)

        def read(client: Any) -> list[Any]:
            seen: list[Any] = []
            try:
                for event in client.messages.create(**body):
                    seen.append(event)
            except anthropic.APIStatusError as exc:
                seen.append(exc)
            return seen

        seen = await sdk(url, read)
    assert raw.status_code == 200
    lines = raw.text.split("\n")
    assert lines[0] == "event: message_start" and "event: error" in lines
    assert [e.type for e in seen[:-1]] == [
        "message_start",
        "content_block_start",
        "content_block_delta",
    ]
    assert isinstance(seen[-1], anthropic.APIStatusError)
    assert seen[-1].body["error"]["type"] == "overloaded_error"  # type: ignore[index]


async def test_tool_use_and_its_result_cross_the_swarm(node_factory: NodeFactory) -> None:
    async with tool_swarm(node_factory) as (url, server):
        first = await sdk(
            url,
            lambda c: c.messages.create(
                model="llm",
                max_tokens=32,
                messages=[{"role": "user", "content": "Paris"}],
                tools=[TOOL],
                tool_choice={"type": "auto"},
            ),
        )
        [use] = first.content
        second = await sdk(
            url,
            lambda c: c.messages.create(
                model="llm",
                max_tokens=32,
                tools=[TOOL],
                messages=[
                    {"role": "user", "content": "Paris"},
                    {"role": "assistant", "content": [use.model_dump()]},
                    {
                        "role": "user",
                        "content": [
                            {"type": "tool_result", "tool_use_id": use.id, "content": "sunny"},
                            {
                                "type": "tool_result",
                                "tool_use_id": "x",
                                "content": "no",
                                "is_error": True,
                            },
                        ],
                    },
                ],
            ),
        )
        events = await sdk(
            url,
            lambda c: list(
                c.messages.create(
                    model="llm",
                    max_tokens=32,
                    messages=[{"role": "user", "content": "Paris"}],
                    tools=[TOOL],
                    stream=True,
                )
            ),
        )
        sent = [r.json() for r in server.requests_to("/v1/chat/completions")]
    assert first.stop_reason == "tool_use"
    assert (use.type, use.id, use.name, use.input) == (
        "tool_use",
        "call_1",
        "weather",
        {"q": "Paris"},
    )
    assert sent[0]["tools"] == [WEATHER] and sent[0]["tool_choice"] == "auto"
    assert sent[1]["messages"][1]["tool_calls"][0]["id"] == "call_1"
    assert sent[1]["messages"][2] == {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}
    assert sent[1]["messages"][3] == {"role": "tool", "tool_call_id": "x", "content": "Error: no"}
    assert second.content[0].text == "the tool said: Error: no" and second.stop_reason == "end_turn"
    kinds = [e.type for e in events]
    assert kinds == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert events[1].content_block.type == "tool_use" and events[1].index == 0
    assert json.loads(events[2].delta.partial_json) == {"q": "Paris"}
    assert events[4].delta.stop_reason == "tool_use"
