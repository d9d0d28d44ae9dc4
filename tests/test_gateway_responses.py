"""OpenAI's Responses API through the gateway: the official openai client's
``responses.create``, plain and streamed, against a node that serves nothing; a
second node serves fake models (runners/fake.py), so every answer crossed the
swarm. Function calls go to FakeVLLM behind a peer (tests/fake_inference_servers.py)."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
from conftest import NodeFactory
from gateway_stub import failing, stub_gateway
from test_gateway import official, swarm, words
from test_gateway_tools import WEATHER
from test_gateway_tools import swarm as tool_swarm

from node.observe import logs
from protocols import ErrorCode

ASK = [{"role": "user", "content": "hi"}]
FUNCTION = {"type": "function", **WEATHER["function"]}  # the Responses API's flat shape


@contextmanager
def request_ids() -> Iterator[list[str]]:
    """The request id of every job a node (any node in this process) finished."""
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            rid = logs.request_id.get()
            if rid:
                seen.append(rid)

    logger = logging.getLogger("node.jobs.service")
    handler, level = Keep(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield seen
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


async def test_responses_plain_and_streamed(node_factory: NodeFactory) -> None:
    async with swarm(node_factory) as (gateway, _, url):
        with request_ids() as ids:
            plain = await official(url, lambda c: c.responses.create(model="echo", input="hi"))
        listed = await official(
            url,
            lambda c: c.responses.create(
                model="echo", input=ASK, instructions="be brief", max_output_tokens=16
            ),
        )
        events = await official(
            url, lambda c: list(c.responses.create(model="slow", input="hi", stream=True))
        )
    # A fake model takes the conversation's JSON as its text; its words are seeded by length.
    said = words(json.dumps([{"role": "user", "content": "hi"}]), 3)
    assert plain.output_text == said and plain.status == "completed"
    assert plain.id.startswith("resp_") and plain.object == "response" and plain.model == "echo"
    [item] = plain.output
    assert item.type == "message" and item.role == "assistant"
    assert plain.usage is not None and plain.usage.total_tokens == 0  # fakes count nothing
    # The response's id is the swarm job's request id, logged by both nodes.
    assert ids.count(plain.id) == 2
    turns = [{"role": "system", "content": "be brief"}, *ASK]
    assert listed.output_text == words(json.dumps(turns), 3)
    kinds = [e.type for e in events]
    assert kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * 3,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == said and events[-4].text == said
    assert events[-1].response.output_text == said and events[-1].response.status == "completed"
    assert gateway.services.service.stats.forwarded == 3


async def test_responses_refusals_and_errors(node_factory: NodeFactory) -> None:
    async with (
        swarm(node_factory, max_body=64 * 1024) as (_, _s, url),
        httpx.AsyncClient(base_url=f"{url}/v1", timeout=30) as http,
    ):

        async def post(**body: Any) -> httpx.Response:
            return await http.post("/responses", json={"model": "echo", "input": "x", **body})

        image = {"type": "input_image", "image_url": "data:image/png;base64,AAAA"}
        answers = {
            "unknown_model": await post(model="nobody"),
            "bad_json": await http.post("/responses", content=b"{not json"),
            "too_big": await post(input="x" * 100_000),
            "no_input": await post(input=[]),
            "image": await post(input=[{"role": "user", "content": [image]}]),
            "tools_to_fake": await post(tools=[FUNCTION]),
            "hosted_tool": await post(tools=[{"type": "web_search"}]),
            "stored": await post(previous_response_id="resp_1"),
            "store": await post(store=True),
            "json_format": await post(text={"format": {"type": "json_object"}}),
            "unknown_field": await post(frobnicate=1),
            "reasoning_item": await post(input=[{"type": "reasoning", "summary": []}]),
            "zero_limit": await post(max_output_tokens=0),
        }
    status = {name: a.status_code for name, a in answers.items()}
    assert status == {
        "unknown_model": 404,
        "bad_json": 400,
        "too_big": 413,
        "no_input": 400,
        "image": 400,
        "tools_to_fake": 400,
        "hosted_tool": 400,
        "stored": 400,
        "store": 400,
        "json_format": 400,
        "unknown_field": 400,
        "reasoning_item": 400,
        "zero_limit": 400,
    }, {n: a.text for n, a in answers.items()}
    message = {name: a.json()["error"]["message"] for name, a in answers.items()}
    assert "input_image" not in message["image"] and "an image" in message["image"]
    assert "cannot call tools" in message["tools_to_fake"]
    assert "'web_search'" in message["hosted_tool"]
    assert "previous_response_id" in message["stored"] and "store" in message["store"]
    assert "text.format" in message["json_format"] and "frobnicate" in message["unknown_field"]
    assert "'reasoning'" in message["reasoning_item"]
    assert answers["bad_json"].json()["error"]["code"] == "invalid_json"
    assert answers["unknown_model"].json()["error"]["code"] == "model_not_found"


async def test_a_function_call_and_its_output_cross_the_swarm(node_factory: NodeFactory) -> None:
    async with tool_swarm(node_factory) as (url, server):
        first = await official(
            url, lambda c: c.responses.create(model="llm", input="Paris", tools=[FUNCTION])
        )
        [call] = first.output
        second = await official(
            url,
            lambda c: c.responses.create(
                model="llm",
                input=[
                    {"role": "user", "content": "Paris"},
                    {
                        "type": "function_call",
                        "call_id": call.call_id,
                        "name": call.name,
                        "arguments": call.arguments,
                    },
                    {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"},
                ],
                tools=[FUNCTION],
            ),
        )
        events = await official(
            url,
            lambda c: list(
                c.responses.create(model="llm", input="Paris", tools=[FUNCTION], stream=True)
            ),
        )
        sent = [r.json() for r in server.requests_to("/v1/chat/completions")]
    assert call.type == "function_call" and call.name == "weather" and call.call_id == "call_1"
    assert json.loads(call.arguments) == {"q": "Paris"}
    assert second.output_text == "the tool said: sunny"
    assert sent[0]["tools"] == [WEATHER]  # the flat function tool, in chat's shape
    assert sent[1]["messages"][1]["tool_calls"][0]["id"] == "call_1"
    assert sent[1]["messages"][2] == {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}
    kinds = [e.type for e in events]
    assert kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert json.loads(events[4].arguments) == {"q": "Paris"}
    assert events[-1].response.output[0].call_id == "call_1"


@pytest.mark.parametrize("streamed", [False, True])
async def test_a_failure_answers_in_the_responses_shape(
    node_factory: NodeFactory, streamed: bool
) -> None:
    """fake models take no params, so a request the runner refuses comes back whole."""
    async with swarm(node_factory) as (_, _s, url), httpx.AsyncClient(base_url=url) as http:
        late = await http.post(
            "/v1/responses",
            json={"model": "lazy", "input": "x", "stream": streamed},
            headers={"X-Swarm-Deadline-Ms": "200"},
        )
    assert late.status_code == 504, late.text
    assert late.json()["error"]["code"] == "deadline_exceeded"


async def test_a_failure_mid_stream_is_an_error_event() -> None:
    """After the first event a failure is the stream's last event, numbered on."""
    body = {"model": "gen", "input": "x", "stream": True}
    async with stub_gateway(failing(ErrorCode.OVERLOADED, ["so far "])) as url:
        async with httpx.AsyncClient(base_url=url) as http:
            raw = await http.post("/v1/responses", json=body)
            before = await http.post("/v1/responses", json={**body, "stream": False})
        events = await official(url, lambda c: list(c.responses.create(**body)))
    assert raw.status_code == 200 and "data: [DONE]" not in raw.text
    assert [e.type for e in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "error",
    ]
    assert events[-1].sequence_number == 5 and events[-1].code == "overloaded"
    assert "OVERLOADED" in events[-1].message
    assert before.status_code == 429 and before.headers["retry-after"] == "1"
    assert before.json()["error"]["type"] == "rate_limit_error"
