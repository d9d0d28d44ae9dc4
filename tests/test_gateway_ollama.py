"""Ollama's API through the gateway: the official ``ollama`` client pointed at a node
that serves nothing; a second node serves fake models (runners/fake.py), so every
answer crossed the swarm. Embeddings come from the real all-MiniLM-L6-v2 on a peer;
tool calls from FakeVLLM behind a peer."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import numpy as np
import pytest
import trio
from conftest import NodeFactory
from gateway_stub import failing, stub_gateway
from test_gateway import TEXTS, TOKEN, minilm_swarm, swarm, words
from test_gateway_responses import request_ids
from test_gateway_tools import WEATHER
from test_gateway_tools import swarm as tool_swarm

from protocols import ErrorCode, Tensor
from runners.openvino_embed import DIM, MODEL_NAME

ASK = [{"role": "user", "content": "hi"}]
PARIS = [{"role": "user", "content": "Paris"}]


async def client(url: str, call: Callable[[Any], Any]) -> Any:
    """One call of the official ollama client (it blocks: run it in a thread)."""
    from ollama import Client

    def run() -> Any:
        return call(Client(host=url, timeout=30))

    return await trio.to_thread.run_sync(run)


async def test_models_chat_and_generate(
    node_factory: NodeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OLLAMA_API_KEY", TOKEN)  # how the ollama client sends a token
    async with swarm(node_factory, token=TOKEN) as (gateway, _, url):
        listed = await client(url, lambda c: c.list())
        shown = await client(url, lambda c: c.show("echo"))
        running = await client(url, lambda c: c.ps())
        with request_ids() as ids:
            async with httpx.AsyncClient(
                base_url=url, headers={"authorization": f"Bearer {TOKEN}"}
            ) as http:
                version = await http.get("/api/version")
                raw = await http.post("/api/chat", json={"model": "echo", "messages": ASK})
        plain = await client(url, lambda c: c.chat(model="echo", messages=ASK, stream=False))
        pieces = await client(url, lambda c: list(c.chat(model="slow", messages=ASK, stream=True)))
        said = await client(
            url,
            lambda c: c.generate(
                model="echo",
                prompt="hi",
                system="be brief",
                options={"temperature": 0.2, "num_predict": 8, "stop": ["\n"], "seed": 1},
            ),
        )
        continued = await client(
            url, lambda c: list(c.generate(model="echo", prompt="p", raw=True, stream=True))
        )
        loaded = await client(url, lambda c: c.generate(model="echo"))
        monkeypatch.delenv("OLLAMA_API_KEY")
        from ollama import ResponseError

        with pytest.raises(ResponseError) as denied:
            await client(url, lambda c: c.list())
    assert sorted(m.model for m in listed.models) == ["echo", "lazy", "slow"]
    assert listed.models[0].details.format == "fake" and listed.models[0].digest
    assert shown.capabilities == ["completion", "embedding"]
    assert shown.modelinfo["swarm.task"] == "fake"
    assert sorted(m.model for m in running.models) == ["echo", "lazy", "slow"]
    assert version.status_code == 200 and version.json()["version"]
    # Ollama streams unless told not to: NDJSON, three words and a last line.
    assert raw.headers["content-type"] == "application/x-ndjson"
    lines = [json.loads(line) for line in raw.text.splitlines()]
    assert [line["done"] for line in lines] == [False, False, False, True]
    assert ids.count(raw.headers["x-request-id"]) == 2  # logged by both nodes
    text = words(json.dumps(ASK), 3)
    assert plain.message.role == "assistant" and plain.message.content == text
    assert plain.done and plain.done_reason == "stop" and plain.total_duration > 0
    assert plain.prompt_eval_count == 0 and plain.eval_count == 0  # fakes count nothing
    assert "".join(p.message.content for p in pieces) == text and pieces[-1].done
    turns = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert said.response == words(json.dumps(turns), 3) and said.done
    assert "".join(c.response for c in continued) == words("p", 3)  # raw: the prompt as it is
    assert loaded.done_reason == "load" and loaded.response == ""
    assert denied.value.status_code == 401
    assert gateway.services.service.stats.forwarded == 5


async def test_errors_are_ollamas(node_factory: NodeFactory) -> None:
    from ollama import ResponseError

    async with swarm(node_factory, max_body=64 * 1024) as (_, _s, url):

        async def refused(call: Callable[[Any], Any]) -> ResponseError:
            with pytest.raises(ResponseError) as caught:
                await client(url, call)
            return caught.value

        missing = await refused(lambda c: c.chat(model="nobody", messages=ASK))
        missing_show = await refused(lambda c: c.show("nobody"))
        image = [{"role": "user", "content": "what is this?", "images": [b"\x89PNG"]}]
        picture = await refused(lambda c: c.chat(model="echo", messages=image))
        options = await refused(
            lambda c: c.generate(model="echo", prompt="p", options={"num_ctx": 8})
        )
        json_out = await refused(lambda c: c.chat(model="echo", messages=ASK, format="json"))
        tools = await refused(lambda c: c.chat(model="echo", messages=ASK, tools=[WEATHER]))
        think = await refused(lambda c: c.chat(model="echo", messages=ASK, think=True))
        embed_text = await refused(lambda c: c.embed(model="echo", input="x", dimensions=4))
        async with httpx.AsyncClient(base_url=url) as http:
            bad_json = await http.post("/api/chat", content=b"{not json")
            too_big = await http.post(
                "/api/generate", json={"model": "echo", "prompt": "x" * 100_000}
            )
    for error, status, words_in in (
        (missing, 404, "model 'nobody' not found"),
        (missing_show, 404, "not found"),
        (picture, 400, "an image"),
        (options, 400, "options.num_ctx"),
        (json_out, 400, "format"),
        (tools, 400, "cannot call tools"),
        (think, 400, "think"),
        (embed_text, 400, "dimensions"),
    ):
        assert error.status_code == status and words_in in error.error, (error, words_in)
    assert bad_json.status_code == 400 and list(bad_json.json()) == ["error"]
    assert too_big.status_code == 413 and "bytes" in too_big.json()["error"]


async def test_tool_calls_cross_the_swarm(node_factory: NodeFactory) -> None:
    async with tool_swarm(node_factory) as (url, server):
        first = await client(
            url,
            lambda c: c.chat(
                model="llm",
                messages=PARIS,
                tools=[WEATHER],
                stream=False,
            ),
        )
        [call] = first.message.tool_calls
        turns = [
            {"role": "user", "content": "Paris"},
            first.message,
            {"role": "tool", "content": "sunny", "tool_name": call.function.name},
        ]
        second = await client(
            url, lambda c: c.chat(model="llm", messages=turns, tools=[WEATHER], stream=False)
        )
        streamed = await client(
            url,
            lambda c: list(c.chat(model="llm", messages=PARIS, tools=[WEATHER], stream=True)),
        )
        shown = await client(url, lambda c: c.show("llm"))
        sent = [r.json() for r in server.requests_to("/v1/chat/completions")]
    assert (call.function.name, call.function.arguments) == ("weather", {"q": "Paris"})
    assert second.message.content == "the tool said: sunny"
    # Ollama's calls carry no ids: the gateway names them, and the tool's answer by them.
    [named] = sent[1]["messages"][1]["tool_calls"]
    assert sent[1]["messages"][2] == {
        "role": "tool",
        "content": "sunny",
        "tool_call_id": named["id"],
    }
    [with_calls] = [p for p in streamed if p.message.tool_calls]
    assert with_calls.message.tool_calls[0].function.arguments == {"q": "Paris"}
    assert streamed[-1].done
    assert "tools" in shown.capabilities


@pytest.mark.slow
async def test_real_embeddings_through_ollamas_routes(
    node_factory: NodeFactory, models_dir: Any, tmp_path: Any
) -> None:
    """all-MiniLM-L6-v2 (OpenVINO) on a peer, asked with the official ollama client."""
    texts = TEXTS
    async with minilm_swarm(node_factory, models_dir, tmp_path) as (url, swarm_client):
        many = await client(url, lambda c: c.embed(model=MODEL_NAME, input=texts))
        one = await client(url, lambda c: c.embeddings(model=MODEL_NAME, prompt=texts[0]))
        shown = await client(url, lambda c: c.show(MODEL_NAME))
        direct = await swarm_client.infer(MODEL_NAME, {"text": texts})
    got = np.array(many.embeddings, dtype=np.float32)
    want = direct.outputs["embedding"]
    assert isinstance(want, Tensor) and got.shape == (3, DIM)
    np.testing.assert_array_equal(got, want.numpy())  # JSON floats of float32: exact
    np.testing.assert_array_equal(np.array(one.embedding, dtype=np.float32), got[0])
    assert many.prompt_eval_count == 22  # word pieces plus [CLS] and [SEP], as on /v1
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert shown.capabilities == ["embedding"]


async def test_a_failure_mid_stream_is_a_last_error_line() -> None:
    from ollama import ResponseError

    body = {"model": "gen", "messages": ASK}
    async with stub_gateway(failing(ErrorCode.DEADLINE_EXCEEDED, ["so far "])) as url:
        async with httpx.AsyncClient(base_url=url) as http:
            raw = await http.post("/api/chat", json=body)
            before = await http.post("/api/chat", json={**body, "stream": False})

        def read(c: Any) -> list[Any]:
            seen: list[Any] = []
            try:
                seen.extend(c.chat(model="gen", messages=ASK, stream=True))
            except ResponseError as exc:
                seen.append(exc)
            return seen

        seen = await client(url, read)
    lines = [json.loads(line) for line in raw.text.splitlines()]
    assert raw.status_code == 200 and lines[0]["message"]["content"] == "so far "
    assert list(lines[-1]) == ["error"] and "DEADLINE_EXCEEDED" in lines[-1]["error"]
    assert seen[0].message.content == "so far " and isinstance(seen[-1], ResponseError)
    assert before.status_code == 504 and list(before.json()) == ["error"]
