"""Function calling through the gateway: the official openai client asks a node that
serves nothing; a peer serves a model on an OpenAI-compatible backend (FakeVLLM,
a fake written from OpenAI's function-calling guide, over real HTTP), so the
tools, the tool turns and the calls cross the swarm both ways."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import trio
from conftest import NodeFactory
from fake_inference_servers import FakeVLLM

from node.gateway import GatewayConfig
from runners.catalog import parse_model_spec
from runners.remote.openai_tools import ToolCallParts, parse_tools

WEATHER = {
    "type": "function",
    "function": {
        "name": "weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"q": {"type": "string"}}},
    },
}
ASK = [{"role": "user", "content": "Paris"}]


@asynccontextmanager
async def swarm(node_factory: NodeFactory) -> AsyncIterator[tuple[str, FakeVLLM]]:
    with FakeVLLM(model="base-model", max_model_len=4096) as server:
        spec = parse_model_spec(
            f"openai:name=llm,model=base-model,base_url={server.url},flavor=vllm"
        )
        async with (
            node_factory("serving", models=(spec, "fake:echo")) as serving,
            node_factory(
                "gateway", models=(), peers=(serving.addrs[0],), http=GatewayConfig()
            ) as gateway,
        ):
            assert gateway.gateway is not None
            yield gateway.gateway.url, server


async def official(url: str, **request: Any) -> Any:
    from openai import OpenAI

    def run() -> Any:
        with OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=30) as client:
            answer = client.chat.completions.create(model="llm", **request)
            return list(answer) if request.get("stream") else answer

    return await trio.to_thread.run_sync(run)


async def test_a_tool_call_and_its_answer_cross_the_swarm(node_factory: NodeFactory) -> None:
    async with swarm(node_factory) as (url, server):
        first = await official(url, messages=ASK, tools=[WEATHER], tool_choice="auto")
        call = first.choices[0].message.tool_calls[0]
        turns = [
            *ASK,
            {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
            {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"},
        ]
        second = await official(url, messages=turns, tools=[WEATHER])
        sent = [r.json() for r in server.requests_to("/v1/chat/completions")]
    assert first.choices[0].finish_reason == "tool_calls"
    assert first.choices[0].message.content is None
    assert (call.id, call.function.name) == ("call_1", "weather")
    assert json.loads(call.function.arguments) == {"q": "Paris"}
    assert second.choices[0].message.content == "the tool said: sunny, 21 C"
    # What reached the backend: the tools, the choice, and the tool turns as given.
    assert sent[0]["tools"] == [WEATHER] and sent[0]["tool_choice"] == "auto"
    assert sent[1]["messages"][1]["tool_calls"][0]["id"] == "call_1"
    assert sent[1]["messages"][2] == turns[2]


async def test_a_streamed_tool_call_arrives_whole(node_factory: NodeFactory) -> None:
    async with swarm(node_factory) as (url, _):
        chunks = await official(url, messages=ASK, tools=[WEATHER], stream=True)
    deltas = [c.choices[0].delta for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    assert len(deltas) == 1  # the runner put the fragments together
    [call] = deltas[0].tool_calls
    assert (call.index, call.id, call.function.name) == (0, "call_1", "weather")
    assert json.loads(call.function.arguments) == {"q": "Paris"}
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"


async def test_tools_are_refused_where_they_cannot_work(node_factory: NodeFactory) -> None:
    async with swarm(node_factory) as (url, _), httpx.AsyncClient(base_url=url) as http:
        chat = "/v1/chat/completions"
        not_openai = await http.post(
            chat, json={"model": "echo", "messages": ASK, "tools": [WEATHER]}
        )
        completions = await http.post(
            "/v1/completions", json={"model": "llm", "prompt": "p", "tools": [WEATHER]}
        )
        bad_tool = await http.post(
            chat, json={"model": "llm", "messages": ASK, "tools": [{"type": "function"}]}
        )
        choice_alone = await http.post(
            chat, json={"model": "llm", "messages": ASK, "tool_choice": "required"}
        )
        orphan = await http.post(
            chat, json={"model": "llm", "messages": [{"role": "tool", "content": "x"}]}
        )
    assert not_openai.status_code == 400
    assert not_openai.json()["error"]["code"] == "unsupported_parameter"
    assert "OpenAI-compatible backend" in not_openai.json()["error"]["message"]
    for answer, words in (
        (completions, "tools go with 'messages'"),
        (bad_tool, "tools[0]"),
        (choice_alone, "'tool_choice' needs 'tools'"),
        (orphan, "tool_call_id"),
    ):
        assert answer.status_code == 400, answer.text
        assert words in answer.json()["error"]["message"]


def test_stream_fragments_are_put_together_and_garbage_refused() -> None:
    parts = ToolCallParts()
    parts.feed("w", [{"index": 1, "id": "b", "function": {"name": "g", "arguments": "{"}}])
    parts.feed("w", [{"index": 0, "id": "a", "function": {"name": "f", "arguments": "[1"}}])
    parts.feed(
        "w",
        [
            {"index": 0, "function": {"arguments": "]"}},
            {"index": 1, "function": {"arguments": "}"}},
        ],
    )
    parts.feed("w", None)
    calls = parts.calls("w")
    assert [(c["id"], c["function"]["name"], c["function"]["arguments"]) for c in calls] == [
        ("a", "f", "[1]"),
        ("b", "g", "{}"),
    ]
    from runners.errors import BadInput
    from runners.remote.errors import BackendGarbage

    for garbage in ("not a list", [{"index": -1}], [{"index": 0, "id": 5}]):
        with pytest.raises(BackendGarbage):
            ToolCallParts().feed("w", garbage)
    nameless = ToolCallParts()
    nameless.feed("w", [{"index": 0, "function": {"arguments": "{}"}}])
    with pytest.raises(BackendGarbage, match="lack an id or a name"):
        nameless.calls("w")
    with pytest.raises(BadInput, match="not JSON"):
        parse_tools("m", "[")
