"""Routes no stand-in server here has: vLLM LoRA/tokenize/health and TEI (FakeVLLM, FakeTEI),
and the runner's own checks of inputs, params and config, which need no server at all."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fake_backend import Reply
from fake_inference_servers import FakeTEI, FakeVLLM, tei_vector
from support import undeclared

from protocols import ErrorCode, Tensor
from protocols.config import Table
from protocols.errors import ConfigError
from runners.base import OutputSpec
from runners.errors import BadInput, ModelNotFound
from runners.remote.errors import BackendBusy, BackendModelMissing, BackendRejected
from runners.remote.openai_compat import OpenAICompatConfig, build_runner
from runners.remote.tei import TEIEmbedRunner


def make(**fields: Any) -> Any:
    table = Table({"name": "m", "base_url": "http://127.0.0.1:9", **fields}, "models[0]")
    config = OpenAICompatConfig.from_table(table)
    table.done()
    return build_runner(config)


@pytest.fixture
def vllm() -> Iterator[FakeVLLM]:
    with FakeVLLM() as server:
        yield server


@pytest.fixture
def tei() -> Iterator[FakeTEI]:
    with FakeTEI() as server:
        yield server


@pytest.fixture
def adapter_dirs(tmp_path: Path) -> dict[str, str]:
    dirs = {}
    for name in ("sql", "poems"):
        path = tmp_path / name
        path.mkdir()
        (path / "adapter_config.json").write_text('{"r": 8}')
        dirs[name] = str(path)
    return dirs


async def test_vllm_lora_adapters_load_list_address_and_unload(
    vllm: FakeVLLM, adapter_dirs: dict[str, str]
) -> None:
    runner = make(
        name="base",
        model="base-model",
        base_url=vllm.url,
        flavor="vllm",
        lora_adapters=[f"sql={adapter_dirs['sql']}"],
    )
    await runner.load()
    try:
        assert runner.info.context_length == 64  # vLLM's max_model_len
        assert await runner.list_adapters() == ["sql"]  # loaded at start
        await runner.load_adapter("poems", adapter_dirs["poems"])
        assert sorted(await runner.list_adapters()) == ["poems", "sql"]
        base = await runner.infer({"prompt": "hi"}, {})
        tuned = await runner.infer({"prompt": "hi"}, {"adapter": "poems"})
        assert base["text"] == " answered by base-model"
        assert tuned["text"] == " answered by poems"
        with pytest.raises(BackendRejected, match="already been loaded"):
            await runner.load_adapter("poems", adapter_dirs["poems"])
        with pytest.raises(BackendRejected, match="No adapter found") as missing:
            await runner.load_adapter("ghost", "/no/such/dir")
        assert missing.value.status == 404
        await runner.unload_adapter("poems")
        assert await runner.list_adapters() == ["sql"]
        with pytest.raises(ModelNotFound, match="poems"):
            runner.check({"prompt": "hi"}, {"adapter": "poems"})
        assert await runner.healthy()
    finally:
        await runner.close()
    loads = vllm.requests_to("/v1/load_lora_adapter")
    assert loads[0].json() == {"lora_name": "sql", "lora_path": adapter_dirs["sql"]}


async def test_vllm_tokenize_refuses_a_long_prompt_before_sending_it(vllm: FakeVLLM) -> None:
    runner = make(name="base", model="base-model", base_url=vllm.url, flavor="vllm")
    await runner.load()
    try:
        with pytest.raises(BadInput, match=r"prompt is 100 tokens.*context length 64"):
            await runner.infer({"prompt": "word " * 100}, {"max_tokens": 8})
        fits = await runner.infer({"prompt": "word " * 20}, {"max_tokens": 8})
        assert fits["prompt_tokens"] == 20
    finally:
        await runner.close()
    assert [s.json()["prompt"].count("word") for s in vllm.requests_to("/v1/completions")] == [20]
    assert len(vllm.requests_to("/tokenize")) == 2


async def test_generation_answers_are_the_declared_outputs(vllm: FakeVLLM) -> None:
    runner = make(name="base", model="base-model", base_url=vllm.url)
    await runner.load()
    try:
        one = await runner.infer({"prompt": "hi"}, {"max_tokens": 8})
        batch = await runner.infer({"prompt": ["a", "b"]}, {"max_tokens": 8})
    finally:
        await runner.close()
    assert isinstance(one["text"], str) and isinstance(batch["text"], list)
    for answer in (one, batch):  # a lone text, a list for a list of prompts
        assert undeclared(runner.info, answer) == []


async def test_a_model_the_server_lacks(vllm: FakeVLLM) -> None:
    refused = make(name="base", model="other-model", base_url=vllm.url)
    with pytest.raises(ModelNotFound, match=r"other-model.*base-model"):
        await refused.load()
    unchecked = make(name="base", model="other-model", base_url=vllm.url, check_model=False)
    await unchecked.load()
    try:
        with pytest.raises(BackendModelMissing, match="does not exist") as caught:
            await unchecked.infer({"prompt": "hi"}, {})
    finally:
        await unchecked.close()
    assert caught.value.code is ErrorCode.MODEL_NOT_FOUND


async def test_tei_reads_info_and_embeds(tei: FakeTEI) -> None:
    runner = make(name="bge", api="tei", model="BAAI/bge-small-en-v1.5", base_url=tei.url)
    assert isinstance(runner, TEIEmbedRunner)
    await runner.load()
    try:
        assert runner.info.max_batch == 4  # TEI's max_client_batch_size
        assert runner.info.inputs[0].max_items == 4  # type: ignore[union-attr]
        assert runner.info.context_length == 16
        assert runner.info.extra["dim"] == 8
        texts = ["alpha beta", "gamma", "delta epsilon zeta"]
        out = await runner.infer({"text": texts}, {})
        raw = await runner.infer({"text": texts[0]}, {"normalize": False})
        assert await runner.healthy()
        with pytest.raises(BadInput, match="1 to 4"):
            runner.check({"text": ["a"] * 5}, {})
        with pytest.raises(BadInput, match="less than 16 tokens"):
            await runner.infer({"text": "w " * 20}, {})
        cut = await runner.infer({"text": "w " * 20}, {"truncate": True})
        assert isinstance(cut["embedding"], Tensor)
        assert runner.info.outputs == (OutputSpec("embedding", "float32", (None, 8)),)
        assert undeclared(runner.info, out) == [] and undeclared(runner.info, cut) == []
    finally:
        await runner.close()
    embedding = out["embedding"]
    assert isinstance(embedding, Tensor) and embedding.shape == (3, 8)
    expected = np.asarray([tei_vector(t, 8) for t in texts], dtype=np.float32)
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(embedding.numpy(), expected, rtol=1e-6)
    assert isinstance(raw["embedding"], Tensor)
    np.testing.assert_allclose(raw["embedding"].numpy()[0], tei_vector(texts[0], 8), rtol=1e-6)
    assert tei.requests_to("/embed")[-1].json() == {
        "inputs": ["w " * 20],
        "normalize": True,
        "truncate": True,
    }


async def test_tei_overloaded_is_busy(tei: FakeTEI) -> None:
    runner = make(name="bge", api="tei", base_url=tei.url, retries=0)
    await runner.load()
    tei.plan("/embed", Reply(429, {"error": "Model is overloaded", "error_type": "overloaded"}))
    try:
        with pytest.raises(BackendBusy, match="overloaded") as caught:
            await runner.infer({"text": "x"}, {})
    finally:
        await runner.close()
    assert caught.value.code is ErrorCode.OVERLOADED


@pytest.mark.parametrize(
    ("server", "fields", "message"),
    [
        ({"model_type": "classifier"}, {}, "not an embedding model"),
        ({}, {"model": "other/model"}, "serves 'BAAI/bge-small-en-v1.5', not 'other/model'"),
    ],
)
async def test_tei_refuses_the_wrong_model(
    server: dict[str, Any], fields: dict[str, Any], message: str
) -> None:
    with FakeTEI(**server) as fake:
        runner = make(name="bge", api="tei", base_url=fake.url, **fields)
        with pytest.raises(ModelNotFound, match=message):
            await runner.load()


GEN = {"name": "gen"}


@pytest.mark.parametrize(
    ("inputs", "params", "message"),
    [
        ({"prompt": "hi"}, {"temperature": 3}, "'temperature' must be a number from 0 to 2"),
        ({"prompt": "hi"}, {"temperature": "hot"}, "'temperature' must be a number"),
        ({"prompt": "hi"}, {"top_p": math.nan}, "'top_p'"),
        ({"prompt": "hi"}, {"max_tokens": 0}, "'max_tokens' must be an integer"),
        ({"prompt": "hi"}, {"max_tokens": 2.5}, "'max_tokens' must be an integer"),
        ({"prompt": "hi"}, {"seed": True}, "'seed' must be an integer"),
        ({"prompt": "hi"}, {"stop": []}, "'stop' must be 1 to 16"),
        ({"prompt": "hi"}, {"stop": [""]}, "'stop' must be"),
        ({"prompt": "hi"}, {"adapter": ""}, "'adapter' must be a non-empty string"),
        ({"prompt": "hi"}, {"beam_width": 4}, "unknown params"),
        ({}, {}, "exactly one of 'prompt' or 'messages'"),
        ({"prompt": "hi", "messages": "[]"}, {}, "exactly one"),
        ({"messages": "not json"}, {}, "'messages' is not JSON"),
        ({"messages": "[" * 50_000}, {}, "'messages' is JSON nested deeper than"),
        ({"prompt": "hi"}, {"tools": "[" * 50_000}, "'tools' is JSON nested deeper than"),
        ({"messages": "[]"}, {}, "JSON array of 1 to"),
        ({"messages": '[{"role": "wizard", "content": "x"}]'}, {}, r"messages\[0\]\.role"),
        ({"messages": '[{"role": "user", "content": 3}]'}, {}, r"messages\[0\]\.content"),
        ({"messages": '[{"role": "user", "content": "x", "x": 1}]'}, {}, "must be an object"),
        ({"messages": ["[]", "[]"]}, {}, "takes 1 to 1"),
        ({"text": "hi"}, {}, "unknown inputs"),
    ],
)
def test_generation_checks_inputs_and_params(
    inputs: dict[str, Any], params: dict[str, Any], message: str
) -> None:
    runner = make(**GEN)
    with pytest.raises(BadInput, match=message):
        runner.check(inputs, params)


def test_good_generation_requests_pass_check() -> None:
    runner = make(**GEN)
    chat = json.dumps(
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    )
    runner.check({"messages": chat}, {"temperature": 0.7, "top_k": 40, "stop": "\n", "seed": 1})
    runner.check(
        {"prompt": ["a", "b"]},
        {"max_tokens": 16, "presence_penalty": -1, "frequency_penalty": 2, "min_p": 0.1},
    )


async def test_stream_takes_one_prompt() -> None:
    runner = make(**GEN)
    with pytest.raises(BadInput, match="stream takes one prompt"):
        async for _ in runner.stream({"prompt": ["a", "b"]}, {}):
            pass


def test_embedding_params_are_checked() -> None:
    runner = make(name="e", task="embeddings")
    runner.check({"text": ["a", "b"]}, {"dimensions": 64})
    with pytest.raises(BadInput, match="'dimensions'"):
        runner.check({"text": "a"}, {"dimensions": 0})
    with pytest.raises(BadInput, match="unknown params"):
        runner.check({"text": "a"}, {"temperature": 0})
    tei = make(name="t", api="tei")
    with pytest.raises(BadInput, match="'normalize' and 'truncate'"):
        tei.check({"text": "a"}, {"normalize": "yes"})


def test_the_runner_reports_and_limits_like_its_endpoint() -> None:
    runner = make(name="gen", max_concurrency=5, api_keys=["sk-hidden-XYZ"])
    assert runner.concurrency == 5
    assert runner.info.streams and runner.info.task == "text-generation"
    assert runner.info.describe()["inputs"][0]["name"] == "prompt"
    assert "base_url" not in runner.info.describe()  # peers are not told where the backend is
    shown = str(runner.status()) + repr(runner) + repr(runner.config)
    assert "sk-hidden-XYZ" not in shown


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"api": "grpc"}, r"models\[0\]\.api: expected one of"),
        ({"api": "tei", "task": "text-generation"}, "tei api serves embeddings only"),
        ({"flavor": "ollama"}, r"models\[0\]\.flavor"),
        ({"lora_adapters": ["sql"]}, "expected 'name=path'"),
        ({"lora_adapters": ["sql=/x"]}, "only the vllm flavor loads adapters"),
        ({"max_tokens": 0}, r"models\[0\]\.max_tokens"),
        ({"pooling": "max"}, r"models\[0\]\.pooling"),
    ],
)
def test_bad_runner_config_is_named(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        make(**fields)


def test_unknown_config_fields_are_refused() -> None:
    table = Table({"name": "m", "base_url": "http://h", "flavour": "vllm"}, "models[0]")
    OpenAICompatConfig.from_table(table)
    with pytest.raises(ConfigError, match="unknown field"):
        table.done()
