"""Real text generation through the gateway: the official openai client asks a node
that serves nothing; the peer serving the model forwards to a real OpenAI-compatible
server (llama-cpp-python with SmolLM2-135M, the session fixture of
test_runner_openai). Greedy answers must equal what the server itself answers, on
chat completions and on the Responses, Anthropic and Ollama APIs, whose clients
(openai's responses.create, the anthropic SDK, the ollama client) ask the same."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from conftest import NodeFactory
from test_gateway import official
from test_runner_openai import FRANCE, MODEL, llama_url  # noqa: F401 (a fixture)

from node.gateway import GatewayConfig
from runners.catalog import parse_model_spec

pytestmark = pytest.mark.slow  # a real model server in a child process

GREEDY: dict[str, Any] = {"temperature": 0.0, "max_tokens": 8}
MESSAGES = [{"role": "user", "content": "Count to five."}]


@asynccontextmanager
async def llm_gateway(node_factory: NodeFactory, server: str) -> AsyncIterator[str]:
    """The URL of a gateway node that serves nothing; its peer serves the llama server."""
    spec = parse_model_spec(f"openai:name={MODEL},base_url={server},flavor=llama-cpp-python")
    async with (
        node_factory("llm", models=(spec,)) as serving,
        node_factory(
            "gateway", models=(), peers=(serving.addrs[0],), http=GatewayConfig()
        ) as gateway,
    ):
        assert gateway.gateway is not None
        yield gateway.gateway.url


async def test_generation_through_the_gateway_matches_the_server(
    node_factory: NodeFactory,
    llama_url: str,  # noqa: F811 (the imported fixture)
) -> None:
    messages = MESSAGES
    async with llm_gateway(node_factory, llama_url) as url:
        ours = await official(
            url, lambda c: c.completions.create(model=MODEL, prompt=FRANCE, **GREEDY)
        )
        chat = await official(
            url, lambda c: c.chat.completions.create(model=MODEL, messages=messages, **GREEDY)
        )

        def stream(client: Any) -> list[Any]:
            return list(
                client.chat.completions.create(
                    model=MODEL,
                    messages=messages,
                    stream=True,
                    stream_options={"include_usage": True},
                    **GREEDY,
                )
            )

        chunks = await official(url, stream)
    theirs = await official(
        llama_url, lambda c: c.completions.create(model=MODEL, prompt=FRANCE, **GREEDY)
    )
    direct = await official(
        llama_url, lambda c: c.chat.completions.create(model=MODEL, messages=messages, **GREEDY)
    )
    assert ours.choices[0].text == theirs.choices[0].text and ours.choices[0].text
    assert ours.choices[0].finish_reason == theirs.choices[0].finish_reason
    assert ours.usage.completion_tokens == theirs.usage.completion_tokens
    assert chat.choices[0].message.content == direct.choices[0].message.content
    pieces = [c.choices[0].delta.content for c in chunks if c.choices]
    assert "".join(p for p in pieces if p) == chat.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == direct.choices[0].finish_reason and set(finishes[:-1]) == {None}
    # llama-cpp-python reports no token counts in streams (the runner does not ask for
    # them), so the usage chunk is there but holds zeros.
    assert chunks[-1].choices == [] and chunks[-1].usage is not None


async def test_every_chat_api_answers_as_the_server_does(
    node_factory: NodeFactory,
    llama_url: str,  # noqa: F811 (the imported fixture)
) -> None:
    from test_gateway_anthropic import sdk
    from test_gateway_ollama import client

    messages = MESSAGES
    async with llm_gateway(node_factory, llama_url) as url:
        responded = await official(
            url,
            lambda c: c.responses.create(
                model=MODEL, input=messages, temperature=0.0, max_output_tokens=8
            ),
        )
        events = await official(
            url,
            lambda c: list(
                c.responses.create(
                    model=MODEL, input=messages, temperature=0.0, max_output_tokens=8, stream=True
                )
            ),
        )
        anthropic = await sdk(
            url,
            lambda c: c.messages.create(
                model=MODEL, max_tokens=8, messages=messages, extra_body={"temperature": 0.0}
            ),
        )
        ollama = await client(
            url,
            lambda c: c.chat(
                model=MODEL,
                messages=messages,
                options={"temperature": 0.0, "num_predict": 8},
                stream=False,
            ),
        )
    direct = await official(
        llama_url, lambda c: c.chat.completions.create(model=MODEL, messages=messages, **GREEDY)
    )
    want = direct.choices[0].message.content
    assert want and responded.output_text == want
    assert responded.usage.output_tokens == direct.usage.completion_tokens
    truncated = direct.choices[0].finish_reason == "length"
    assert responded.status == ("incomplete" if truncated else "completed")
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == want and events[-1].type == f"response.{responded.status}"
    assert anthropic.content[0].text == want
    assert anthropic.stop_reason == ("max_tokens" if truncated else "end_turn")
    assert anthropic.usage.output_tokens == direct.usage.completion_tokens
    assert ollama.message.content == want and ollama.eval_count == direct.usage.completion_tokens
