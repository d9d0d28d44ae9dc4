"""The OpenAI-compatible runner against a real server: llama-cpp-python serving SmolLM2-135M.

One server per session (a child process on 127.0.0.1, ready in about a
second). The official ``openai`` client asks the same server the same things,
as a check that our request bodies mean what the real API means.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import aclosing
from typing import Any

import numpy as np
import pytest
import trio
from llama_server import ServerFailed, llama_server

from protocols import Tensor
from protocols.config import Table
from runners.errors import BadInput, ModelNotFound
from runners.remote.errors import BackendFailed
from runners.remote.openai_compat import (
    OpenAICompatConfig,
    OpenAIEmbedRunner,
    OpenAIGenerateRunner,
    build_runner,
)

pytestmark = pytest.mark.slow  # a real model server in a child process

MODEL = "smollm2"
N_CTX = 512
READY_TIMEOUT_S = 60.0
FRANCE = "The capital of France is"
GREEDY = {"temperature": 0.0, "max_tokens": 8}


@pytest.fixture(scope="session")
def llama_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Base URL of a llama-cpp-python server with completions, chat and embeddings on."""
    log_path = tmp_path_factory.mktemp("llama") / "server.log"
    options = ("--model_alias", MODEL, "--embedding", "true", "--n_ctx", str(N_CTX))
    try:
        with llama_server(log_path, *options) as url:
            yield url
    except ServerFailed as exc:
        pytest.fail(str(exc))


def make(url: str, **fields: Any) -> Any:
    table = Table({"name": MODEL, "base_url": url, **fields}, "models[0]")
    config = OpenAICompatConfig.from_table(table)
    table.done()
    return build_runner(config)


async def official(url: str, call: str, **kwargs: Any) -> Any:
    """One call of the official openai client (it blocks: run it in a thread)."""
    from openai import OpenAI

    def run() -> Any:
        with OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0) as client:
            target: Any = client
            for part in call.split("."):
                target = getattr(target, part)
            return target(**kwargs)

    return await trio.to_thread.run_sync(run)


async def test_load_checks_the_model_is_served(llama_url: str) -> None:
    runner = make(llama_url)
    assert isinstance(runner, OpenAIGenerateRunner)
    await runner.load()
    try:
        assert [m["id"] for m in await runner.list_models()] == [MODEL]
        assert runner.info.context_length is None  # this server does not tell
        assert await runner.healthy()
    finally:
        await runner.close()
    missing = make(llama_url, model="no-such-model")
    with pytest.raises(ModelNotFound, match="no-such-model"):
        await missing.load()


async def test_completion_matches_the_official_client(llama_url: str) -> None:
    runner = make(llama_url, max_concurrency=3)
    assert runner.concurrency == 3
    await runner.load()
    try:
        out = await runner.infer({"prompt": FRANCE}, GREEDY)
    finally:
        await runner.close()
    theirs = await official(llama_url, "completions.create", model=MODEL, prompt=FRANCE, **GREEDY)
    assert out["text"] == theirs.choices[0].text
    assert "Paris" in out["text"]
    assert out["finish_reason"] == "length"
    assert out["completion_tokens"] == 8
    assert out["prompt_tokens"] == theirs.usage.prompt_tokens > 0


async def test_chat_matches_the_official_client(llama_url: str) -> None:
    messages = [
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "What is the capital of France?"},
    ]
    runner = make(llama_url)
    await runner.load()
    try:
        out = await runner.infer({"messages": json.dumps(messages)}, GREEDY)
    finally:
        await runner.close()
    theirs = await official(
        llama_url, "chat.completions.create", model=MODEL, messages=messages, **GREEDY
    )
    assert out["text"] == theirs.choices[0].message.content
    assert out["text"]
    assert out["finish_reason"] in ("stop", "length")


async def test_stream_deltas_add_up_to_the_whole_answer(llama_url: str) -> None:
    params = {"temperature": 0.0, "max_tokens": 12}
    runner = make(llama_url)
    await runner.load()
    try:
        whole = await runner.infer({"prompt": FRANCE}, params)
        chunks = [c async for c in runner.stream({"prompt": FRANCE}, params)]
        chat = {"messages": json.dumps([{"role": "user", "content": "Count to five."}])}
        chat_whole = await runner.infer(chat, params)
        chat_chunks = [c async for c in runner.stream(chat, params)]
    finally:
        await runner.close()
    assert len(chunks) > 3
    assert "".join(str(c["text"]) for c in chunks) == whole["text"]
    assert chunks[-1] == {"text": "", "finish_reason": "length"}
    assert "".join(str(c["text"]) for c in chat_chunks) == chat_whole["text"]
    assert chat_chunks[-1]["finish_reason"] == chat_whole["finish_reason"]


async def test_a_batch_of_prompts_is_answered_in_order(llama_url: str) -> None:
    prompts = [FRANCE, "One, two, three,", "Roses are red,"]
    runner = make(llama_url)
    await runner.load()
    try:
        batch = await runner.infer({"prompt": prompts}, GREEDY)
        alone = [await runner.infer({"prompt": p}, GREEDY) for p in prompts]
    finally:
        await runner.close()
    assert batch["text"] == [a["text"] for a in alone]
    assert batch["finish_reason"] == ["length"] * 3
    assert batch["completion_tokens"] == 24
    assert batch["prompt_tokens"] == sum(int(a["prompt_tokens"]) for a in alone)  # type: ignore[call-overload]


async def test_seed_makes_sampling_repeatable_and_stop_ends_the_text(llama_url: str) -> None:
    hot = {"temperature": 1.5, "max_tokens": 12, "top_k": 50, "top_p": 0.95}
    runner = make(llama_url)
    await runner.load()
    try:
        first = await runner.infer({"prompt": "Once upon a time"}, {**hot, "seed": 42})
        again = await runner.infer({"prompt": "Once upon a time"}, {**hot, "seed": 42})
        others = {
            (await runner.infer({"prompt": "Once upon a time"}, {**hot, "seed": s}))["text"]
            for s in (1, 2, 3)
        }
        stopped = await runner.infer({"prompt": FRANCE}, {**GREEDY, "stop": ["."]})
    finally:
        await runner.close()
    assert first["text"] == again["text"]
    assert len(others | {first["text"]}) > 1  # the seed does steer the sampler
    assert stopped["text"] == " Paris"
    assert stopped["finish_reason"] == "stop"


async def test_embeddings_match_the_official_client(llama_url: str) -> None:
    texts = ["hello world", "the capital of France"]
    runner = make(llama_url, task="embeddings", pooling="mean")
    assert isinstance(runner, OpenAIEmbedRunner)
    await runner.load()
    try:
        out = await runner.infer({"text": texts}, {})
        single = await runner.infer({"text": texts[0]}, {})
    finally:
        await runner.close()
    embedding = out["embedding"]
    assert isinstance(embedding, Tensor) and embedding.dtype == "float32"
    assert embedding.shape == (2, runner.info.extra["dim"])
    theirs = await official(llama_url, "embeddings.create", model=MODEL, input=texts)
    # This model has no pooling: the server answers per-token vectors, averaged here.
    expected = np.stack([np.mean(np.asarray(d.embedding), axis=0) for d in theirs.data])
    np.testing.assert_allclose(embedding.numpy(), expected, rtol=1e-5, atol=1e-6)
    # The server's token count travels as prompt_tokens, for the gateway's usage.
    assert out["prompt_tokens"] == theirs.usage.prompt_tokens > 0
    assert isinstance(single["embedding"], Tensor)
    np.testing.assert_allclose(single["embedding"].numpy()[0], expected[0], rtol=1e-5, atol=1e-6)


async def test_a_prompt_over_the_context_is_bad_input(llama_url: str) -> None:
    long_prompt = "word " * 600
    # Context length known and a tokenize route: refused before generation, with the count.
    counted = make(llama_url, flavor="llama-cpp-python", context_length=N_CTX)
    # Nothing known: the server's own 400 says it.
    plain = make(llama_url)
    await counted.load()
    await plain.load()
    try:
        assert counted.info.context_length == N_CTX
        with pytest.raises(BadInput, match=r"prompt is \d+ tokens.*context length 512"):
            await counted.infer({"prompt": long_prompt}, {"max_tokens": 8})
        with pytest.raises(BadInput, match="maximum context length is 512"):
            await plain.infer({"prompt": long_prompt}, {"max_tokens": 8})
        with pytest.raises(BadInput, match=r"prompt is \d+ tokens"):
            async for _ in counted.stream({"prompt": long_prompt}, {"max_tokens": 8}):
                pass
        # Streaming, this server answers 200 and ends the stream empty: no reason given.
        with pytest.raises(BackendFailed, match="ended before the answer finished"):
            async for _ in plain.stream({"prompt": long_prompt}, {"max_tokens": 8}):
                pass
        with pytest.raises(BadInput, match="leaves no room"):
            counted.check({"prompt": "hi"}, {"max_tokens": N_CTX})
        short = await counted.infer({"prompt": FRANCE}, GREEDY)  # a short prompt passes unasked
        assert "Paris" in str(short["text"])
    finally:
        await counted.close()
        await plain.close()


async def test_a_consumer_may_leave_a_stream_early(llama_url: str) -> None:
    runner = make(llama_url, max_concurrency=1)
    await runner.load()
    try:
        stream = runner.stream({"prompt": FRANCE}, {"temperature": 0.0, "max_tokens": 32})
        async with aclosing(stream) as chunks:
            async for chunk in chunks:
                assert chunk["text"]
                break
        assert runner.status()["endpoint"]["in_flight"] == 0
        out = await runner.infer({"prompt": FRANCE}, GREEDY)  # the one slot is free again
        assert "Paris" in str(out["text"])
    finally:
        await runner.close()
