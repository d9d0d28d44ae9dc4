"""The text-generation runners, OpenVINO GenAI and torch, on the real SmolLM2-135M-Instruct.

Each behaviour is checked on both runners (the ``runner`` fixture is
parametrized). The GGUF is converted to IR once per session (a child process,
~6 s) into a shared models dir, and the torch model is read once per session
(~20 s: transformers dequantizes the GGUF); tests that damage a cache entry
work on a copy. CUDA tests run only where torch sees a GPU.
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Iterator, Mapping
from contextlib import aclosing, contextmanager
from pathlib import Path

import pytest
import torch
import trio
from support import undeclared

from protocols import ErrorCode, Param, Value
from protocols.config import Table
from protocols.errors import ConfigError
from runners import convert_smollm2, ir_cache
from runners.base import Outputs
from runners.errors import BadInput, ModelLoadError
from runners.generation import Completion, Emit, Engine, GenerationRunner, Request
from runners.openvino_genai import MODEL_NAME, GenAIConfig, OpenVINOGenAIRunner, cache_key
from runners.torch_device import TorchPlacement
from runners.torch_generate import TorchGenerateConfig, TorchGenerateRunner

pytestmark = pytest.mark.slow


CAPITAL = {"messages": json.dumps([{"role": "user", "content": "What is the capital of France?"}])}
# A raw prompt the model keeps continuing for hundreds of tokens.
COUNTING: dict[str, Value] = {"prompt": "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"}
SAMPLING: dict[str, Param] = {"temperature": 1.0, "top_p": 0.95, "top_k": 50, "max_new_tokens": 8}


async def collect(
    runner: GenerationRunner, inputs: Mapping[str, Value], params: dict[str, Param]
) -> list[Outputs]:
    return [chunk async for chunk in runner.stream(inputs, params)]


def count(value: Value) -> int:
    assert isinstance(value, int), value
    return value


async def check_stream_equals_infer(runner: GenerationRunner) -> None:
    params: dict[str, Param] = {"max_new_tokens": 24}
    whole = await runner.infer(CAPITAL, params)
    chunks = await collect(runner, CAPITAL, params)
    assert len(chunks) > 2, chunks  # streamed piece by piece, not all at once
    *texts, last = chunks
    assert all(set(c) == {"text", "tokens"} and c["text"] for c in texts)
    assert "".join(str(c["text"]) for c in texts) == whole["text"]
    assert last == {**whole, "text": ""}
    # The pieces count the tokens of their text: all generated but the end of turn.
    assert sum(count(c["tokens"]) for c in texts) == count(whole["completion_tokens"]) - 1
    assert all(undeclared(runner.info, c) == [] for c in [whole, *chunks])
    assert "Paris" in str(whole["text"])
    assert whole["finish_reason"] == "stop"
    assert isinstance(whole["prompt_tokens"], int) and whole["prompt_tokens"] > 10
    assert isinstance(whole["completion_tokens"], int) and 0 < whole["completion_tokens"] < 24


async def check_length_is_honoured(runner: GenerationRunner) -> None:
    out = await runner.infer(COUNTING, {"max_new_tokens": 5})
    assert out["finish_reason"] == "length"
    assert out["completion_tokens"] == 5
    assert str(out["text"]).strip()


async def check_stop_string(runner: GenerationRunner) -> None:
    free = await runner.infer(COUNTING, {"max_new_tokens": 12})
    assert " 13," in str(free["text"]), free  # it does count on
    out = await runner.infer(COUNTING, {"max_new_tokens": 12, "stop": [" 13"]})
    assert out["text"] == str(free["text"]).split(" 13")[0]
    assert out["finish_reason"] == "stop"
    chunks = await collect(runner, COUNTING, {"max_new_tokens": 12, "stop": " 13"})
    assert "".join(str(c["text"]) for c in chunks) == out["text"]


async def check_seed_determinism(runner: GenerationRunner) -> None:
    first = await runner.infer(CAPITAL, {**SAMPLING, "seed": 7})
    again = await runner.infer(CAPITAL, {**SAMPLING, "seed": 7})
    assert first["text"] == again["text"]
    streamed = await collect(runner, CAPITAL, {**SAMPLING, "seed": 7})
    assert "".join(str(c["text"]) for c in streamed) == first["text"]
    others = {str((await runner.infer(CAPITAL, {**SAMPLING, "seed": s}))["text"]) for s in range(3)}
    assert len(others | {str(first["text"])}) > 1, "sampling ignores the seed"


class Recording(Engine):
    """Wraps a runner's engine to see what each generation really did."""

    def __init__(self, inner: Engine) -> None:
        self.inner = inner
        self.completions: list[Completion] = []

    def generate(self, request: Request, emit: Emit) -> Completion:
        completion = self.inner.generate(request, emit)
        self.completions.append(completion)
        return completion


@contextmanager
def recording(runner: GenerationRunner) -> Iterator[Recording]:
    inner = runner._engine
    assert inner is not None
    spy = Recording(inner)
    runner._engine = spy
    try:
        yield spy
    finally:
        runner._engine = inner


# Far more than the checks below let a generation run; they find it stopped early.
LONG: dict[str, Param] = {"max_new_tokens": 1000}
STOPPED_BY = 200  # tokens; generous, as a busy machine may run on a little before it sees
HANG_S = 120.0  # only against a hang: each check proves stopping by token counts


async def next_request_runs(runner: GenerationRunner, spy: Recording) -> None:
    """The next request runs, and the one before it had stopped early."""
    with trio.fail_after(HANG_S):
        out = await runner.infer(CAPITAL, {"max_new_tokens": 8})
    assert "Paris" in str(out["text"])
    abandoned = spy.completions[-2]
    assert abandoned.completion_tokens < STOPPED_BY, abandoned


async def check_abandoned_stream_frees_the_runner(runner: GenerationRunner) -> None:
    """A reader that leaves early stops generation: the next request does not wait it out."""
    with recording(runner) as spy:
        # Closed: the node leaves its loop early, inside aclosing().
        async with aclosing(runner.stream(COUNTING, LONG)) as chunks:
            seen = 0
            async for _ in chunks:
                seen += 1
                if seen == 3:
                    break
        await next_request_runs(runner, spy)
        # Cancelled: a deadline passes while the node waits for the next chunk.
        with trio.move_on_after(0.5):
            async for _ in runner.stream(COUNTING, LONG):
                pass
        await next_request_runs(runner, spy)
        # Dropped unclosed: trio warns (use aclosing!) and its finalizer closes it.
        with pytest.warns(ResourceWarning, match="aclosing"):
            stream = runner.stream(COUNTING, LONG)
            for _ in range(3):
                await stream.__anext__()
            del stream
            await next_request_runs(runner, spy)


async def check_cancelled_infer_frees_the_runner(runner: GenerationRunner) -> None:
    with recording(runner) as spy:
        with trio.move_on_after(0.5):
            await runner.infer(COUNTING, LONG)
        await next_request_runs(runner, spy)


async def check_over_long_prompt(runner: GenerationRunner) -> None:
    assert runner.info.context_length is not None
    words = {"prompt": "word " * (runner.info.context_length + 10)}
    with pytest.raises(BadInput, match="context holds") as info:
        await runner.infer(words, {"max_new_tokens": 4})
    assert info.value.code is ErrorCode.BAD_REQUEST
    with pytest.raises(BadInput, match="context holds"):
        await collect(runner, words, {"max_new_tokens": 4})
    # Refused before generating: the runner is free at once.
    with trio.fail_after(30):
        assert (await runner.infer(CAPITAL, {"max_new_tokens": 4}))["text"]


def check_bad_params(runner: GenerationRunner) -> None:
    for params in ({"max_new_tokens": runner.max_new_tokens + 1}, {"temperature": -1}, {"n": 2}):
        with pytest.raises(BadInput):
            runner.check(CAPITAL, params)
    with pytest.raises(BadInput, match="exactly one"):
        runner.check({}, {})


@pytest.fixture(scope="session")
def genai_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models dir holding the converted SmolLM2, made once for the session. Read-only."""
    path = tmp_path_factory.mktemp("genai-models")

    async def convert() -> None:
        runner = OpenVINOGenAIRunner(path)
        await runner.load()
        await runner.close()

    trio.run(convert)
    return path


@pytest.fixture(scope="session")
def genai(genai_models_dir: Path) -> OpenVINOGenAIRunner:
    """One loaded runner for the session (each load reads the IR and probes: ~1 s)."""
    runner = OpenVINOGenAIRunner(genai_models_dir)
    trio.run(runner.load)
    return runner


@pytest.fixture(scope="session")
def torch_runner() -> TorchGenerateRunner:
    """The torch runner on the default device (a GPU where there is one)."""
    runner = TorchGenerateRunner()
    trio.run(runner.load)
    return runner


@pytest.fixture(params=["genai", "torch"])
def runner(request: pytest.FixtureRequest) -> GenerationRunner:
    name = "genai" if request.param == "genai" else "torch_runner"
    loaded: GenerationRunner = request.getfixturevalue(name)
    return loaded


# Numerics under which GenAI's prefill of a prompt computes as its token-by-token
# decoding does: what a resumed greedy answer needs to equal the uninterrupted one.
EXACT = GenAIConfig(inference_precision="f32", kv_cache_precision="f32", dynamic_quantization=False)


@pytest.fixture(scope="session")
def genai_exact(genai_models_dir: Path) -> OpenVINOGenAIRunner:
    runner = OpenVINOGenAIRunner(genai_models_dir, EXACT)
    trio.run(runner.load)
    return runner


@pytest.fixture(params=["genai_exact", "torch_runner"])
def exact_runner(request: pytest.FixtureRequest) -> GenerationRunner:
    loaded: GenerationRunner = request.getfixturevalue(request.param)
    return loaded


def test_the_entry_holds_the_ir_and_its_probe(genai_models_dir: Path) -> None:
    entry = ir_cache.find(genai_models_dir / MODEL_NAME, cache_key())
    assert entry is not None
    assert {p.name for p in entry.iterdir()} == {*convert_smollm2.FILES, ir_cache.MANIFEST}
    probe = json.loads((entry / convert_smollm2.PROBE).read_text())
    assert "Paris" in probe["text"]


def test_info(genai: OpenVINOGenAIRunner) -> None:
    info = genai.info.describe()
    assert info["task"] == "text-generation" and info["streams"] is True
    assert info["context_length"] == 8192 and info["runner"] == "openvino-genai"
    assert {i["name"] for i in info["inputs"]} == {"prompt", "messages"}
    assert info["continues"] == "prompt messages"
    # The numerics as the device runs them (its defaults: auto) and as pinned.
    assert info["inference_precision"] in ("f32", "bf16", "f16")
    assert info["kv_cache_precision"] in ("f32", "f16", "bf16", "u8")
    assert isinstance(info["dynamic_quantization"], bool)


def test_pinned_numerics_are_announced(genai_exact: OpenVINOGenAIRunner) -> None:
    info = genai_exact.info.describe()
    assert (info["inference_precision"], info["kv_cache_precision"]) == ("f32", "f32")
    assert info["dynamic_quantization"] is False


async def test_stream_equals_infer(runner: GenerationRunner) -> None:
    await check_stream_equals_infer(runner)


async def test_length_is_honoured(runner: GenerationRunner) -> None:
    await check_length_is_honoured(runner)


async def test_stop_string(runner: GenerationRunner) -> None:
    await check_stop_string(runner)


async def test_seed_determinism(runner: GenerationRunner) -> None:
    await check_seed_determinism(runner)


async def test_abandoned_stream_frees_the_runner(runner: GenerationRunner) -> None:
    await check_abandoned_stream_frees_the_runner(runner)


async def test_cancelled_infer_frees_the_runner(runner: GenerationRunner) -> None:
    await check_cancelled_infer_frees_the_runner(runner)


async def test_over_long_prompt(runner: GenerationRunner) -> None:
    await check_over_long_prompt(runner)


def test_bad_params(runner: GenerationRunner) -> None:
    check_bad_params(runner)


STORY = {"messages": json.dumps([{"role": "user", "content": "Tell a story about a painter."}])}


@pytest.mark.parametrize("inputs", [STORY, COUNTING], ids=["chat", "prompt"])
async def test_a_greedy_answer_continued_from_a_cut_is_the_same(
    exact_runner: GenerationRunner, inputs: dict[str, Value], seed: int
) -> None:
    """The answer's start and its token count (what a client got before its producer
    died) continued here give the uninterrupted answer, token for token, and the
    whole answer's counts and finish reason."""
    params: dict[str, Param] = {"max_new_tokens": 40}
    *pieces, last = await collect(exact_runner, inputs, params)
    whole = "".join(str(p["text"]) for p in pieces)
    rng = random.Random(seed)
    for cut in sorted(rng.sample(range(1, len(pieces)), 3)):
        start = "".join(str(p["text"]) for p in pieces[:cut])
        spent = sum(count(p["tokens"]) for p in pieces[:cut])
        more: dict[str, Param] = {"continue_from": start, "continue_tokens": spent}
        *rest, end = await collect(exact_runner, inputs, {**params, **more})
        assert start + "".join(str(p["text"]) for p in rest) == whole, (cut, spent)
        assert end == last, cut  # prompt_tokens without the start; completion_tokens all


async def test_a_continuation_with_its_budget_spent_ends_at_once(runner: GenerationRunner) -> None:
    more: dict[str, Param] = {"continue_from": "The capital", "continue_tokens": 3}
    chunks = await collect(runner, CAPITAL, {"max_new_tokens": 3, **more})
    assert chunks == [
        {"text": "", "prompt_tokens": chunks[0]["prompt_tokens"], "completion_tokens": 3,
         "finish_reason": "length"}
    ]  # fmt: skip
    answer = await runner.infer(CAPITAL, {"max_new_tokens": 8, **more})
    assert str(answer["text"]).strip() and answer["completion_tokens"] == 8


async def test_a_smaller_context_is_enforced(genai_models_dir: Path) -> None:
    runner = OpenVINOGenAIRunner(genai_models_dir, GenAIConfig(context_length=40, max_new_tokens=8))
    await runner.load()
    # The chat prompt alone is 37 tokens: 3 are left, and generation stops there.
    out = await runner.infer(CAPITAL, {"max_new_tokens": 8})
    assert out["prompt_tokens"] == 37
    assert out["completion_tokens"] == 3 and out["finish_reason"] == "length"
    await runner.close()


async def test_a_wrong_probe_answer_means_reconversion(
    genai_models_dir: Path, tmp_path: Path
) -> None:
    shutil.copytree(genai_models_dir / MODEL_NAME, tmp_path / MODEL_NAME)
    entry = ir_cache.find(tmp_path / MODEL_NAME, cache_key())
    assert entry is not None
    probe_file = entry / convert_smollm2.PROBE
    probe = json.loads(probe_file.read_text())
    # Same length, so the manifest's sizes still match: only the probe can tell.
    probe["text"] = probe["text"].replace("Paris", "Rome!")
    probe_file.write_text(json.dumps(probe))
    runner = OpenVINOGenAIRunner(tmp_path)
    await runner.load()
    fresh = ir_cache.find(tmp_path / MODEL_NAME, cache_key())
    assert fresh is not None
    assert "Paris" in json.loads((fresh / convert_smollm2.PROBE).read_text())["text"]
    assert "Paris" in str((await runner.infer(CAPITAL, {"max_new_tokens": 12}))["text"])


def test_config_from_table() -> None:
    table = Table({"device": "CPU", "context_length": 2048, "max_new_tokens": 512}, "models[0]")
    config = GenAIConfig.from_table(table)
    table.done()
    assert (config.device, config.context_length, config.max_new_tokens) == ("CPU", 2048, 512)
    numerics = {"inference_precision": "f32", "kv_cache_precision": "u8"}
    table = Table({**numerics, "dynamic_quantization": False}, "models[0]")
    pinned = GenAIConfig.from_table(table)
    assert pinned.properties() == {
        "INFERENCE_PRECISION_HINT": "f32",
        "KV_CACHE_PRECISION": "u8",
        "DYNAMIC_QUANTIZATION_GROUP_SIZE": 0,
    }
    assert GenAIConfig().properties() == {}
    with pytest.raises(ConfigError, match=r"models\[0\]\.kv_cache_precision"):
        GenAIConfig.from_table(Table({"kv_cache_precision": "int4"}, "models[0]"))
    with pytest.raises(ConfigError, match=r"models\[0\]\.context_length"):
        GenAIConfig.from_table(Table({"context_length": 9000}, "models[0]"))
    with pytest.raises(ConfigError, match=r"models\[0\]\.max_new_tokens"):
        GenAIConfig.from_table(Table({"context_length": 100, "max_new_tokens": 100}, "models[0]"))


async def test_both_runners_answer_the_same_question(
    genai: OpenVINOGenAIRunner, torch_runner: TorchGenerateRunner
) -> None:
    """Both know the answer; greedy texts may differ (GenAI keeps the weights 4-bit)."""
    params: dict[str, Param] = {"max_new_tokens": 24}
    a = await genai.infer(CAPITAL, params)
    b = await torch_runner.infer(CAPITAL, params)
    for out in (a, b):
        assert "Paris" in str(out["text"]) and out["finish_reason"] == "stop"
    assert a["prompt_tokens"] == b["prompt_tokens"]  # one tokenizer, one chat template


def test_torch_info_names_the_device_it_got(torch_runner: TorchGenerateRunner) -> None:
    info = torch_runner.info
    assert info.runner == "torch" and info.streams and info.context_length == 8192
    if torch.cuda.is_available():
        assert info.device == "cuda:0" and info.precision in ("bf16", "fp16")
    else:
        assert info.device == "cpu" and info.precision == "fp32"


def test_torch_config_from_table() -> None:
    table = Table({"device": "cuda:1", "dtype": "bf16", "max_new_tokens": 64}, "models[1]")
    config = TorchGenerateConfig.from_table(table)
    table.done()
    assert config.placement == TorchPlacement("cuda:1", "bf16") and config.max_new_tokens == 64
    with pytest.raises(ConfigError, match="refused on the CPU"):
        TorchGenerateConfig.from_table(Table({"device": "cpu", "dtype": "fp16"}, "models[1]"))
    with pytest.raises(ConfigError, match=r"models\[1\]\.dtype"):
        TorchGenerateConfig.from_table(Table({"dtype": "int8"}, "models[1]"))
    with pytest.raises(ConfigError, match="device"):
        TorchGenerateConfig.from_table(Table({"device": "gpu"}, "models[1]"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine with no GPU")
async def test_half_precision_without_a_gpu_is_refused_at_load() -> None:
    runner = TorchGenerateRunner(TorchGenerateConfig(TorchPlacement("auto", "fp16")))
    with pytest.raises(ModelLoadError, match="refused on the CPU"):
        await runner.load()
    runner = TorchGenerateRunner(TorchGenerateConfig(TorchPlacement("cuda", "auto")))
    with pytest.raises(ModelLoadError, match="no CUDA GPU"):
        await runner.load()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
@pytest.mark.parametrize("dtype", ["fp16", "bf16", "fp32"])
async def test_cuda_generation(dtype: str) -> None:
    if dtype == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    runner = TorchGenerateRunner(TorchGenerateConfig(TorchPlacement("cuda:0", dtype)))
    await runner.load()
    assert runner.info.device == "cuda:0" and runner.info.precision == dtype
    await check_stream_equals_infer(runner)
    await check_seed_determinism(runner)
    await check_abandoned_stream_frees_the_runner(runner)
    await runner.close()
