"""Real generation that survives its producer: two nodes serving SmolLM2-135M on
OpenVINO GenAI at the same numerics, an entry node (serving nothing, with the
HTTP gateway) in front, and the producer of a greedy streamed chat cut off at a
seeded random chunk. Its side of the connection to the entry is dropped mid-stream,
which is what the entry sees of a SIGKILLed peer (its socket closes; test_chaos.py
kills whole daemons). The client's text, over libp2p chunks, SSE and WebSocket,
must equal the uninterrupted answer token for token, with the whole answer's
finish reason and usage.
"""

from __future__ import annotations

import json
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import replace
from typing import Any

import httpx
import pytest
import trio
from conftest import NodeFactory
from libp2p.peer.id import ID
from test_routing import wait_linked
from trio_websocket import open_websocket_url as open_ws

from node.client import SwarmClient
from node.daemon import Node
from node.gateway import GatewayConfig
from protocols import Chunk, Result
from runners.openvino_genai import GenAIConfig, OpenVINOGenAIRunner

MODEL = "smollm2-135m-instruct"
WAIT_S = 180.0
# Numerics under which GenAI's prefill of a prompt computes as its token-by-token
# decoding does (test_runner_generate.py's EXACT): greedy text resumed is the same.
EXACT = GenAIConfig(inference_precision="f32", kv_cache_precision="f32", dynamic_quantization=False)
QUESTION = [{"role": "user", "content": "Tell a story about a painter."}]
MAX_TOKENS = 48
PARAMS: dict[str, Any] = {"temperature": 0.0, "max_new_tokens": MAX_TOKENS}


@pytest.fixture
def smollm2_runners(tmp_path_factory: pytest.TempPathFactory) -> list[OpenVINOGenAIRunner]:
    """Two runners of SmolLM2 (converted once), loaded before their nodes start: a
    load (the IR read, compiled, probed) can outlast a node's start-up limit on a
    loaded machine, and a node's load of a loaded runner is a no-op."""
    path = tmp_path_factory.mktemp("genai-models")
    runners = [OpenVINOGenAIRunner(path, EXACT) for _ in range(2)]

    async def load() -> None:
        for runner in runners:
            await runner.load()

    trio.run(load)
    return runners


async def swarm(
    stack: AsyncExitStack, node_factory: NodeFactory, runners: list[OpenVINOGenAIRunner]
) -> tuple[Node, list[Node]]:
    servers = [
        await stack.enter_async_context(node_factory(f"s{i}", models=(), runners=(runner,)))
        for i, runner in enumerate(runners)
    ]
    entry = await stack.enter_async_context(
        node_factory(
            "entry", models=(), peers=tuple(s.addrs[0] for s in servers), http=GatewayConfig()
        )
    )
    await wait_linked([entry], {MODEL: {s.peer_id for s in servers}})
    return entry, servers


def killer(
    entry: Node, servers: list[Node], at: int
) -> tuple[Callable[[], Awaitable[None]], list[str]]:
    """A callback for each chunk the client gets: at chunk ``at``, the server producing
    the stream drops its connection to the entry. The killed peer's id is kept."""
    killed: list[str] = []
    seen = 0

    async def on_chunk() -> None:
        nonlocal seen
        seen += 1
        if seen != at or killed:
            return
        busy = [s for s in servers if entry.services.dispatcher.in_flight.get(s.peer_id)]
        assert len(busy) == 1, entry.services.dispatcher.in_flight
        killed.append(busy[0].peer_id)
        await busy[0].services.host.disconnect(ID.from_base58(entry.peer_id))

    return on_chunk, killed


async def reference(entry: Node) -> tuple[str, Result]:
    """The uninterrupted answer's text (its chunks') and its result, whose outputs are
    the last chunk's: the counts and finish reason."""
    texts: list[str] = []
    last: list[Chunk] = []

    async def on_chunk(chunk: Chunk) -> None:
        texts.append(str(chunk.outputs.get("text", "")))
        last[:] = [chunk]

    async with SwarmClient.connect(entry.addrs[0]) as client:
        with trio.fail_after(WAIT_S):
            result = await client.infer(
                MODEL, {"messages": json.dumps(QUESTION)}, params=PARAMS, on_chunk=on_chunk
            )
    return "".join(texts), replace(result, outputs=last[0].outputs)


async def test_a_greedy_chat_resumed_after_its_producer_dies_is_the_uninterrupted_answer(
    node_factory: NodeFactory, smollm2_runners: list[OpenVINOGenAIRunner], seed: int
) -> None:
    rng = random.Random(seed)
    async with AsyncExitStack() as stack:
        entry, servers = await swarm(stack, node_factory, smollm2_runners)
        whole, plain = await reference(entry)
        assert "resumes" not in plain.meta
        # Chunks of the reference: the cut falls inside the answer, never at its end.
        pieces = len(whole.split()) // 2
        assert pieces >= 4, whole

        # libp2p chunks, straight from the client.
        at = rng.randrange(1, pieces)
        print(f"libp2p: cut at chunk {at}")
        on_kill, killed = killer(entry, servers, at)
        texts: list[str] = []
        ends: list[Chunk] = []

        async def on_chunk(chunk: Chunk) -> None:
            texts.append(str(chunk.outputs.get("text", "")))
            ends[:] = [chunk]
            await on_kill()

        async with SwarmClient.connect(entry.addrs[0]) as client:
            with trio.fail_after(WAIT_S):
                result = await client.infer(
                    MODEL, {"messages": json.dumps(QUESTION)}, params=PARAMS, on_chunk=on_chunk
                )
        assert killed, "the producer was never cut off"
        assert "".join(texts) == whole
        for key in ("prompt_tokens", "completion_tokens", "finish_reason"):
            assert ends[0].outputs[key] == plain.outputs[key], key
        (other,) = {s.peer_id for s in servers} - set(killed)
        assert result.meta["resumes"] == 1 and result.meta["served_by"] == other
        assert result.meta["producers"] == f"{killed[0]},{other}"
        took_over = int(str(result.meta["takeover_chunks"]).split(",")[1])
        assert took_over >= at

        # SSE: OpenAI's streamed chat at the entry's gateway.
        assert entry.gateway is not None
        url = entry.gateway.url
        at = rng.randrange(1, pieces)
        print(f"sse: cut at chunk {at}")
        on_kill, killed = killer(entry, servers, at)
        await wait_linked([entry], {MODEL: {s.peer_id for s in servers}})
        content: list[str] = []
        finish: list[str] = []
        usage: dict[str, Any] = {}
        body = {
            "model": MODEL,
            "messages": QUESTION,
            "temperature": 0,
            "max_tokens": MAX_TOKENS,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        async with (
            httpx.AsyncClient(base_url=url, timeout=WAIT_S) as http,
            http.stream("POST", "/v1/chat/completions", json=body) as response,
        ):
            assert response.status_code == 200
            async for line in _events(response.aiter_lines()):
                event = json.loads(line)
                if event.get("usage"):
                    usage = event["usage"]
                for choice in event["choices"]:
                    if choice["delta"].get("content"):
                        content.append(choice["delta"]["content"])
                        await on_kill()
                    if choice["finish_reason"]:
                        finish.append(choice["finish_reason"])
        assert killed, "the producer was never cut off"
        assert "".join(content) == whole
        assert finish == [plain.outputs["finish_reason"]]
        assert usage["completion_tokens"] == plain.outputs["completion_tokens"]
        assert usage["prompt_tokens"] == plain.outputs["prompt_tokens"]

        # WebSocket: swarm's own inference frames, with the answer's meta.
        at = rng.randrange(1, pieces)
        print(f"websocket: cut at chunk {at}")
        on_kill, killed = killer(entry, servers, at)
        await wait_linked([entry], {MODEL: {s.peer_id for s in servers}})
        frames: list[str] = []
        frames_out: list[dict[str, Any]] = []
        ws_url = url.replace("http://", "ws://")
        async with open_ws(f"{ws_url}/ws/resume") as ws:
            job = {
                "type": "inference",
                "id": "j1",
                "model": MODEL,
                "inputs": {"messages": json.dumps(QUESTION)},
                "params": PARAMS,
                "stream": True,
            }
            await ws.send_message(json.dumps(job))
            with trio.fail_after(WAIT_S):
                while (frame := json.loads(await ws.get_message()))["type"] == "chunk":
                    frames.append(str(frame["outputs"].get("text", "")))
                    frames_out.append(frame["outputs"])
                    await on_kill()
        assert frame["type"] == "result", frame
        assert killed, "the producer was never cut off"
        assert "".join(frames) == whole
        (end,) = [f for f in frames_out if "finish_reason" in f]  # the last chunk's
        assert end["completion_tokens"] == plain.outputs["completion_tokens"]
        assert end["finish_reason"] == plain.outputs["finish_reason"]
        (other,) = {s.peer_id for s in servers} - set(killed)
        assert frame["meta"]["producers"] == f"{killed[0]},{other}"
        assert entry.services.dispatcher.resumes == 3


async def _events(lines: AsyncIterator[str]) -> AsyncIterator[str]:
    """The data of each SSE event, up to [DONE]."""
    async for line in lines:
        if not line.startswith("data: "):
            continue
        data = line.removeprefix("data: ")
        if data == "[DONE]":
            return
        yield data
