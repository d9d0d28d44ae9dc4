"""Verification with the real all-MiniLM-L6-v2: honest peers whose weights and
compute differ (fp32, fp16, int8; f32 and bf16 where the CPU has it) are never
struck over many checks, and ``verify: 1`` across two peers says they agree,
through the Python client and through the gateway (the official openai client).

Each node serves a hard-linked copy of the session's models dir (fp32 and int8
entries and the measured choice); fp16 weights are converted into their copy.
"""

from __future__ import annotations

import os
import shutil
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trio
from conftest import NodeFactory
from support import eventually

from bootstrap.table import serving
from node.client import SwarmClient
from node.daemon import Node
from node.gateway import GatewayConfig
from node.jobs.router import RouterConfig, Strategy
from node.jobs.verify import VerifyConfig
from protocols import Tensor
from runners import ov_choice
from runners.openvino_embed import MODEL_NAME, PRECISION_PROBE

pytestmark = pytest.mark.slow

LINK_WAIT_S = 60.0
# Short, long, code, figures, repetition, other scripts: where reduced precision
# drifts furthest (node.jobs.compare's docstring has the measured figures).
TEXTS = (
    *PRECISION_PROBE,
    "OK",
    "a",
    "SELECT * FROM users WHERE id = 42;",
    "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15",
    "🙂🙂🙂 emoji only",
    "The the the the the the the the the the the the the the",
    "中文和日本語のテキスト",
    '{"key": [1, 2, 3], "nested": {"a": null}}',
)


def spec(weights: str, inference: str) -> str:
    return f"openvino-embed:precision={weights},inference_precision={inference}"


def bf16_here() -> bool:
    facts = ov_choice.device_facts("CPU")
    return facts is not None and "bf16" in ov_choice.offered(facts.capabilities)


def linked_copy(models_dir: Path, data_dir: Path) -> None:
    target = data_dir / "models" / MODEL_NAME
    target.parent.mkdir(parents=True)
    shutil.copytree(models_dir / MODEL_NAME, target, copy_function=os.link)


async def wait_serving(node: Node, peers: list[Node]) -> None:
    want = {p.peer_id for p in peers}

    def linked() -> bool:
        return want <= {p.peer_id for p in serving(node.services.membership.table, MODEL_NAME)}

    await eventually(linked, LINK_WAIT_S)


def checking(seed: int) -> VerifyConfig:
    return VerifyConfig(rate=1.0, max_in_flight=4, per_minute=1_000_000, seed=seed)


async def test_honest_peers_at_other_precisions_are_never_struck(
    node_factory: NodeFactory, models_dir: Path, tmp_path: Path, seed: int
) -> None:
    precisions = [("fp32", "f32"), ("fp16", "f32"), ("int8", "f32")]
    precisions += [("fp32", "bf16"), ("int8", "bf16")] if bf16_here() else [("fp16", "f32")]
    names = [f"p{i}-{w}-{i_}" for i, (w, i_) in enumerate(precisions)]
    for name in names:
        linked_copy(models_dir, tmp_path / name)
    async with AsyncExitStack() as stack:
        peers: list[Node] = []
        for name, (weights, inference) in zip(names, precisions, strict=True):
            # One after another: each load (fp16's conversion) takes the CPU for a while.
            models = (spec(weights, inference),)
            peers.append(await stack.enter_async_context(node_factory(name, models=models)))
        for peer in peers:
            (model,) = peer.status()["models"]
            print(peer.peer_id[-8:], model["precision"], model["inference_precision"])
        router = RouterConfig(strategy=Strategy.ROUND_ROBIN)
        addrs = tuple(p.addrs[0] for p in peers)
        async with (
            node_factory("a", models=(), peers=addrs, router=router, verify=checking(seed)) as a,
            SwarmClient.connect(a.addrs[0]) as client,
        ):
            await wait_serving(a, peers)
            jobs = [[t] for t in TEXTS] + [list(TEXTS[i : i + 4]) for i in range(0, len(TEXTS), 4)]
            for texts in jobs:
                await client.infer(MODEL_NAME, {"text": texts})
                # One check at a time keeps every check's two runs on this small machine.
                await eventually(lambda: a.services.verifier.describe()["in_flight"] == 0, 60)
            lowest = 1.0
            for text in TEXTS[::3]:  # every peer at once: each pair of precisions compared
                got = await client.infer(MODEL_NAME, {"text": [text]}, verify=len(peers) - 1)
                assert got.meta["verify_ran"] == len(peers)
                assert got.meta["verify_verdict"] == "agree", got.meta
                lowest = min(lowest, float(got.meta["verify_min_cosine"]))
            described = a.services.verifier.describe()
    print(f"lowest cosine between two honest peers: {lowest:.6f}; {described['verdicts']}")
    assert described["checks"] >= len(jobs) * 0.9  # every job drawn; a few may find no time
    assert described["verdicts"] == {"agree": described["checks"] + len(TEXTS[::3])}
    for peer in peers:
        row = described["peers"][peer.peer_id]
        assert row["checked"] > 0
        assert (row["strikes"], row["disputed"], row["unsure"]) == (0, 0, 0), row
        assert not row["held_back"]


async def test_verify_one_on_minilm_agrees_through_the_client_and_the_gateway(
    node_factory: NodeFactory, models_dir: Path, tmp_path: Path, seed: int
) -> None:
    from openai import OpenAI

    for name in ("b", "c"):
        linked_copy(models_dir, tmp_path / name)
    texts = ["a cat sits on the mat", "stock markets fell today"]
    async with (
        node_factory("b", models=(MODEL_NAME,)) as b,  # auto: the measured choice
        node_factory("c", models=(spec("int8", "f32"),)) as c,
    ):
        config = VerifyConfig(rate=0.0, seed=seed)
        peers = (b.addrs[0], c.addrs[0])
        async with (
            node_factory("a", models=(), peers=peers, verify=config, http=GatewayConfig()) as a,
            SwarmClient.connect(a.addrs[0]) as client,
        ):
            await wait_serving(a, [b, c])
            result = await client.infer(MODEL_NAME, {"text": texts}, verify=1)
            assert a.gateway is not None
            url = a.gateway.url

            def call() -> Any:
                with OpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0, timeout=60) as oa:
                    return oa.embeddings.with_raw_response.create(
                        model=MODEL_NAME, input=texts, extra_headers={"X-Swarm-Verify": "1"}
                    )

            raw = await trio.to_thread.run_sync(call)
    meta = result.meta
    assert (meta["verify_verdict"], meta["verify_agreed"], meta["verify_ran"]) == ("agree", True, 2)
    assert set(str(meta["verify_nodes"]).split(",")) == {b.peer_id, c.peer_id}
    print(f"fp32-auto vs int8/f32: lowest cosine {meta['verify_min_cosine']}")
    assert 0.98 <= float(meta["verify_min_cosine"]) < 1.0  # int8 moves it a little
    got = result.outputs["embedding"]
    assert isinstance(got, Tensor) and got.shape == (2, 384)
    assert raw.headers["x-swarm-verify-verdict"] == "agree"
    assert set(raw.headers["x-swarm-verify-nodes"].split(",")) == {b.peer_id, c.peer_id}
    answer = raw.parse()
    vectors = np.array([d.embedding for d in answer.data], dtype=np.float32)
    assert vectors.shape == (2, 384)
