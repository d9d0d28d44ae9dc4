"""SmolLM2 split over real nodes: each stage on its own libp2p node, rounds over /swarm/infer.

Four in-process nodes (``node_factory``): layers 0-9, 10-19 (twice) and 20-29,
each a ``TorchStageRunner`` served as an ordinary model. The entry is the test:
a ``SwarmClient`` per node and ``node.jobs.pipeline.peer_stage`` over each, so
every round's hidden states cross a real libp2p stream as tensors. Greedy text
must equal the single-model torch runner's; when the middle node is stopped
mid-generation its rounds fail, the driver replaces it by the other holder of
10-19, replays the history there, and the text is still the reference's.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import numpy as np
import pytest
import trio
from conftest import NodeFactory

from node.client import SwarmClient
from node.jobs.pipeline import peer_stage
from runners.generation import Message, Prompt, Request, Sampling
from runners.pipeline_driver import Chain, Stage, Tokens, Trace
from runners.torch_device import TorchPlacement
from runners.torch_generate import TorchGenerateConfig, TorchGenerateRunner
from runners.torch_stage import (
    LayerRange,
    StageCall,
    TorchStageConfig,
    TorchStageRunner,
    stage_name,
)

pytestmark = pytest.mark.slow

CPU = TorchPlacement("cpu", "fp32")
QUESTION = "What is the capital of France, and what river runs through it?"
NEW_TOKENS = 20
RANGES = ("0-9", "10-19", "10-19", "20-29")


@asynccontextmanager
async def _swarm(node_factory: NodeFactory) -> AsyncIterator[list[SwarmClient]]:
    """Four stage nodes and a client to each, in RANGES' order."""
    runners = [TorchStageRunner(TorchStageConfig(LayerRange.parse(r), CPU)) for r in RANGES]
    for runner in runners:
        await runner.load()  # before the node starts: its start-up has a 60 s bound
    async with AsyncExitStack() as stack:
        nodes = []
        for i, runner in enumerate(runners):
            nodes.append(
                await stack.enter_async_context(node_factory(f"s{i}", runners=[runner], models=()))
            )
        clients = []
        for node in nodes:
            clients.append(await stack.enter_async_context(SwarmClient.connect(node.addrs[0])))
        for client, node in zip(clients, nodes, strict=True):
            client.node = node  # type: ignore[attr-defined]  # the test stops one
        yield clients


def _stage(client: SwarmClient, layers: str) -> Stage:
    model = stage_name(LayerRange.parse(layers))
    return peer_stage(client.infer, model, first=layers.startswith("0-"))


async def test_greedy_over_three_nodes_equals_the_whole_model_and_survives_a_stopped_stage(
    node_factory: NodeFactory,
) -> None:
    reference = TorchGenerateRunner(TorchGenerateConfig(placement=CPU))
    await reference.load()
    chat = {"messages": json.dumps([{"role": "user", "content": QUESTION}])}
    whole = await reference.infer(chat, {"max_new_tokens": NEW_TOKENS})
    await reference.close()
    tokens = await trio.to_thread.run_sync(Tokens.open)
    request = Request(
        Prompt(messages=(Message("user", QUESTION),)), Sampling(max_new_tokens=NEW_TOKENS)
    )
    async with _swarm(node_factory) as clients:
        first, middle, spare, last = clients
        stages = [_stage(first, "0-9"), _stage(middle, "10-19"), _stage(last, "20-29")]
        trace = Trace()
        completion = await Chain(stages).generate(tokens, request, lambda _: True, trace)
        assert completion.text == whole["text"] and completion.text
        assert completion.completion_tokens == whole["completion_tokens"]
        assert not trace.recoveries

        # Again, and the middle node stops after the prompt and five tokens.
        calls = 0
        live = _stage(middle, "10-19")

        async def stopping(call: StageCall) -> np.ndarray[Any, Any]:
            nonlocal calls
            calls += 1
            if calls == 7:
                middle.node.stop()  # type: ignore[attr-defined]
                with trio.fail_after(30):
                    while True:  # until it no longer answers at all
                        try:
                            await middle.record()
                        except Exception:
                            break
                        await trio.sleep(0.2)
            return await live(call)

        replaced: list[int] = []

        async def replace(index: int, error: BaseException) -> Stage:
            replaced.append(index)
            return _stage(spare, "10-19")

        trace = Trace()
        chain = Chain([stages[0], stopping, stages[2]], replace=replace)
        completion = await chain.generate(tokens, request, lambda _: True, trace)
        assert completion.text == whole["text"]
        assert replaced == [1]
        assert trace.recoveries[-1].kind == "replace" and trace.recoveries[-1].stage == 1
        print("recoveries", trace.recoveries)
