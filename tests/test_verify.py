"""Verification between real in-process nodes: spot checks find a lying peer and
route around it, ``verify: N`` says whether the runs agreed, and reputation
outlives a restart. Fake models here (test_verify_minilm.py runs the real one).

Seeds: every test's random choices (the check draws, the liar's lies) come from
the ``seed`` fixture, printed with any failure; replay with SWARM_TEST_SEED.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import trio
from conftest import NodeFactory
from support import eventually

from bootstrap.table import serving
from node.client import SwarmClient
from node.daemon import Node
from node.jobs.reputation import ReputationPolicy
from node.jobs.router import RouterConfig, Strategy
from node.jobs.verify import VerifyConfig
from protocols import ErrorCode, RemoteError, Tensor
from runners.fake import FakeRunner, LyingFakeRunner

LINK_WAIT_S = 30.0
MODEL = "emb"
LIE_RATE = 0.2  # right answers 80% of the time
CHECK_RATE = 0.1
# The bound on jobs before the liar is held back. With the router node serving nothing
# and three peers taking jobs in turn, a job leads to a strike on the liar when it is
# checked (p = 0.1) and the liar lied in it: as the peer that ran it (1/3 of jobs) or as
# the second node asked (1/2 of the other 2/3), each a lie with p = 0.2. So p = 0.1 *
# (1/3 + 1/3) * 0.2 = 0.0133 a job; two strikes hold it back (ReputationPolicy's
# default min_strikes): P(more than 1000 jobs) = P(Binomial(1000, 0.0133) <= 1) < 3e-5.
MAX_JOBS = 1000
WORKERS = 4  # jobs in flight at once


def verify_config(seed: int, rate: float = CHECK_RATE, **policy: object) -> VerifyConfig:
    # Checks are bounded by per_minute and max_in_flight; the tests run jobs far faster
    # than a real swarm does, so those caps are raised to keep the arithmetic above.
    return VerifyConfig(
        rate=rate,
        max_in_flight=WORKERS,
        per_minute=1_000_000,
        seed=seed,
        policy=ReputationPolicy(**policy),  # type: ignore[arg-type]
    )


async def wait_serving(node: Node, peers: Sequence[Node]) -> None:
    want = {p.peer_id for p in peers}

    def linked() -> bool:
        return want <= {p.peer_id for p in serving(node.services.membership.table, MODEL)}

    await eventually(linked, LINK_WAIT_S)


async def ignore(chunk: object) -> None:
    """A stream's chunks, dropped."""


def held(node: Node) -> frozenset[str]:
    return node.services.verifier.reputation.held_back()


async def test_a_lying_peer_is_caught_held_back_and_remembered_across_a_restart(
    node_factory: NodeFactory, seed: int
) -> None:
    liar = LyingFakeRunner(MODEL, LIE_RATE, seed=seed)
    rng = np.random.default_rng(seed)
    router = RouterConfig(strategy=Strategy.ROUND_ROBIN)
    async with (
        node_factory("b", models=(f"fake:{MODEL}",)) as b,
        node_factory("c", models=(f"fake:{MODEL}",)) as c,
        node_factory("liar", models=(), runners=(liar,)) as lying,
    ):
        peers = (b.addrs[0], c.addrs[0], lying.addrs[0])
        config = verify_config(seed)
        async with node_factory("a", models=(), peers=peers, router=router, verify=config) as a:
            await wait_serving(a, (b, c, lying))
            jobs = 0
            async with SwarmClient.connect(a.addrs[0]) as client:

                async def worker() -> None:
                    nonlocal jobs
                    while jobs < MAX_JOBS and lying.peer_id not in held(a):
                        jobs += 1
                        text = f"job {jobs} {rng.integers(1 << 30)}"
                        await client.infer(MODEL, {"text": text})

                with trio.fail_after(120):
                    async with trio.open_nursery() as nursery:
                        for _ in range(WORKERS):
                            nursery.start_soon(worker)
                    # A check may still be running on the last jobs' answers.
                    await eventually(lambda: lying.peer_id in held(a), 10)
                print(f"held back after {jobs} jobs; it lied {liar.lies} of {liar.answers}")
                described = a.services.verifier.describe()
                rows = described["peers"]
                assert jobs <= MAX_JOBS
                assert rows[lying.peer_id]["strikes"] >= 2 and rows[lying.peer_id]["held_back"]
                # Honest peers are never struck, even when the liar checked them.
                for honest in (b, c):
                    assert rows.get(honest.peer_id, {}).get("strikes", 0) == 0
                # Held back: no job goes to it any more, and no check either. (A check
                # sent to it before it was held back may still be running: once seen
                # answering after this point in a clean-clone run.)
                verifier = a.services.verifier
                await eventually(lambda: verifier.describe()["in_flight"] == 0, 10)
                answered = liar.answers
                for i in range(60):
                    result = await client.infer(MODEL, {"text": f"after {i}"})
                    assert result.meta["served_by"] in (b.peer_id, c.peer_id)
                assert liar.answers == answered
                status = a.status()["view"]["verification"]["peers"][lying.peer_id]
                assert status["held_back"] and status["held_for_s"] > 0
                metrics = a.services.metrics.render().decode()
                assert f'swarm_peer_held_back{{peer="{lying.peer_id}"}} 1.0' in metrics
        # The router node restarts with the same data dir: it remembers, and the liar,
        # linked again, still gets nothing.
        async with node_factory("a", models=(), peers=peers, router=router, verify=config) as a:
            assert lying.peer_id in held(a)
            await wait_serving(a, (b, c, lying))
            async with SwarmClient.connect(a.addrs[0]) as client:
                for i in range(20):
                    result = await client.infer(MODEL, {"text": f"restarted {i}"})
                    assert result.meta["served_by"] != lying.peer_id
            assert liar.answers == answered
            rows = a.services.verifier.describe()["peers"]
            assert rows[lying.peer_id]["strikes"] >= 2


async def test_a_check_on_this_node_itself_is_the_ground_truth(
    node_factory: NodeFactory, seed: int
) -> None:
    """The router node serves the model too: every check runs here, and one lie is a
    strike at once (no majority needed). min_strikes 1 makes the first lie hold."""
    liar = LyingFakeRunner(MODEL, 1.0, seed=seed)
    async with node_factory("liar", models=(), runners=(liar,)) as lying:
        config = verify_config(seed, rate=1.0, min_strikes=1)
        router = RouterConfig(strategy=Strategy.ROUND_ROBIN)
        async with node_factory(
            "a", models=(f"fake:{MODEL}",), peers=(lying.addrs[0],), router=router, verify=config
        ) as a:
            await wait_serving(a, (lying,))
            async with SwarmClient.connect(a.addrs[0]) as client:
                answers = [await client.infer(MODEL, {"text": f"t{i}"}) for i in range(2)]
                await eventually(lambda: lying.peer_id in held(a))
                by = {r.meta["served_by"] for r in answers}
                assert by == {a.peer_id, lying.peer_id}  # the lie reached the client once
                row = a.services.verifier.describe()["peers"][lying.peer_id]
                assert (row["checked"], row["strikes"]) == (1, 1)
                for i in range(5):
                    assert (await client.infer(MODEL, {"text": f"x{i}"})).meta[
                        "served_by"
                    ] == a.peer_id


async def test_verify_one_reports_agreement_and_disagreement(
    node_factory: NodeFactory, seed: int
) -> None:
    liar = LyingFakeRunner(MODEL, 1.0, seed=seed)
    async with (
        node_factory("b", models=(f"fake:{MODEL}",)) as b,
        node_factory("liar", models=(), runners=(liar,)) as lying,
    ):
        config = verify_config(seed, rate=0.0)
        # c is gone before d starts: d could learn it from b's record and link it, and
        # then verify b against c (seen once in a clean-clone run).
        async with (
            node_factory("c", models=(f"fake:{MODEL}",)) as c,
            node_factory("a", models=(), peers=(b.addrs[0], c.addrs[0]), verify=config) as a,
            SwarmClient.connect(a.addrs[0]) as client,
        ):
            await wait_serving(a, (b, c))
            result = await client.infer(MODEL, {"text": ["one", "two"]}, verify=1)
            meta = result.meta
            assert (meta["verify_verdict"], meta["verify_agreed"], meta["verify_ran"]) == (
                "agree",
                True,
                2,
            )
            assert set(str(meta["verify_nodes"]).split(",")) == {b.peer_id, c.peer_id}
            assert meta["served_by"] == str(meta["verify_nodes"]).split(",")[0]
            assert meta["verify_min_cosine"] == 1.0
            reference = (await FakeRunner(MODEL).infer({"text": ["one", "two"]}, {}))["embedding"]
            got = result.outputs["embedding"]
            assert isinstance(got, Tensor) and isinstance(reference, Tensor)
            np.testing.assert_array_equal(got.numpy(), reference.numpy())
            # More runs asked than nodes serve it: what ran is said, not hidden.
            three = await client.infer(MODEL, {"text": "x"}, verify=4)
            assert (three.meta["verify_ran"], three.meta["verify_verdict"]) == (2, "agree")
            # Streams and sampled jobs cannot be compared: refused, not run once quietly.
            with pytest.raises(RemoteError) as refused:
                await client.infer(MODEL, {"text": "x"}, verify=1, on_chunk=ignore)
            assert (
                refused.value.code is ErrorCode.BAD_REQUEST and "streamed" in refused.value.message
            )
            rows = a.services.verifier.describe()["peers"]
            assert {rows[p]["agreed"] for p in (b.peer_id, c.peer_id)} == {2}
        # One honest peer and one liar: they disagree, and with two peers nobody can
        # say who lied. It is reported; neither is struck.
        async with (
            node_factory("d", models=(), peers=(b.addrs[0], lying.addrs[0]), verify=config) as d,
            SwarmClient.connect(d.addrs[0]) as client,
        ):
            await wait_serving(d, (b, lying))
            result = await client.infer(MODEL, {"text": "what is it"}, verify=1)
            meta = result.meta
            assert (meta["verify_verdict"], meta["verify_agreed"]) == ("disagree", False)
            assert set(str(meta["verify_against"]).split(",")) == {b.peer_id, lying.peer_id}
            assert float(meta["verify_min_cosine"]) < 0.9
            rows = d.services.verifier.describe()["peers"]
            assert rows[lying.peer_id]["strikes"] == rows[b.peer_id]["strikes"] == 0
            assert rows[lying.peer_id]["disputed"] == rows[b.peer_id]["disputed"] == 1


async def test_checks_are_bounded_and_never_change_the_answer(
    node_factory: NodeFactory, seed: int
) -> None:
    """Every job drawn (rate 1), one check at a time, three a minute: the rest are
    skipped, not queued; a client has its answer while its check still runs (on a
    peer that takes 0.2 s), and every answer is the peer's own."""
    slow = FakeRunner(MODEL, latency_s=0.2)
    reference = FakeRunner(MODEL)
    async with (
        node_factory("b", models=(f"fake:{MODEL}",)) as b,
        node_factory("c", models=(), runners=(slow,)) as c,
    ):
        config = VerifyConfig(rate=1.0, max_in_flight=1, per_minute=3, seed=seed)
        router = RouterConfig(strategy=Strategy.ROUND_ROBIN)
        async with (
            node_factory(
                "a", models=(), peers=(b.addrs[0], c.addrs[0]), verify=config, router=router
            ) as a,
            SwarmClient.connect(a.addrs[0]) as client,
        ):
            await wait_serving(a, (b, c))
            verifier = a.services.verifier
            waited_for_by_none = 0
            for i in range(10):
                await eventually(lambda: verifier.describe()["in_flight"] == 0, 10)
                before = verifier.describe()["checks"] + verifier.describe()["in_flight"]
                result = await client.infer(MODEL, {"text": f"t{i}"})
                want = (await reference.infer({"text": f"t{i}"}, {}))["embedding"]
                got = result.outputs["embedding"]
                assert isinstance(got, Tensor) and isinstance(want, Tensor)
                np.testing.assert_array_equal(got.numpy(), want.numpy())
                started = verifier.describe()["in_flight"] + verifier.describe()["checks"] > before
                if result.meta["served_by"] == b.peer_id and started:
                    # Its check runs on c for 0.2 s: the answer did not wait for it.
                    assert verifier.describe()["in_flight"] == 1
                    waited_for_by_none += 1
            await eventually(lambda: verifier.describe()["in_flight"] == 0, 10)
            stats = verifier.describe()
            assert stats["routed"] == 10
            assert stats["checks"] in (3, 4)  # 3 at once, then 3 a minute
            assert stats["checks"] + stats["skipped"]["busy"] == 10
            assert waited_for_by_none >= 1
            assert stats["verdicts"] == {"agree": stats["checks"]}


async def test_verify_through_the_gateway_openai_and_kserve(
    node_factory: NodeFactory, seed: int
) -> None:
    import httpx

    from node.gateway import GatewayConfig

    async with (
        node_factory("b", models=(f"fake:{MODEL}",)) as b,
        node_factory("c", models=(f"fake:{MODEL}",)) as c,
    ):
        config = verify_config(seed, rate=0.0)
        peers = (b.addrs[0], c.addrs[0])
        async with node_factory(
            "a", models=(), peers=peers, verify=config, http=GatewayConfig()
        ) as a:
            await wait_serving(a, (b, c))
            assert a.gateway is not None
            both = {b.peer_id, c.peer_id}
            async with httpx.AsyncClient(base_url=a.gateway.url, timeout=30) as http:
                emb = await http.post(
                    "/v1/embeddings",
                    json={"model": MODEL, "input": ["a", "b"]},
                    headers={"X-Swarm-Verify": "1"},
                )
                chat = await http.post(
                    "/v1/chat/completions",
                    json={
                        "model": MODEL,
                        "messages": [{"role": "user", "content": "hi"}],
                        "verify": 1,
                    },
                )
                v2 = await http.post(
                    f"/v2/models/{MODEL}/infer",
                    json={
                        "inputs": [
                            {"name": "text", "shape": [1], "datatype": "BYTES", "data": ["x"]}
                        ]
                    },
                    headers={"X-Swarm-Verify": "1"},
                )
                plain = await http.post("/v1/embeddings", json={"model": MODEL, "input": "a"})
                bad = await http.post(
                    "/v1/embeddings",
                    json={"model": MODEL, "input": "a"},
                    headers={"X-Swarm-Verify": "9"},
                )
                bad_body = await http.post(
                    "/v1/embeddings", json={"model": MODEL, "input": "a", "verify": "one"}
                )
                streamed = await http.post(
                    "/v1/completions",
                    json={"model": MODEL, "prompt": "p", "stream": True, "verify": 1},
                )
    for answer in (emb, chat, v2):
        assert answer.status_code == 200, answer.text
        assert answer.headers["x-swarm-verify-verdict"] == "agree"
        assert set(answer.headers["x-swarm-verify-nodes"].split(",")) == both
    assert float(emb.headers["x-swarm-verify-min-cosine"]) == 1.0
    assert plain.status_code == 200 and "x-swarm-verify-verdict" not in plain.headers
    assert bad.status_code == 400 and "x-swarm-verify" in bad.text
    assert bad_body.status_code == 400 and "verify" in bad_body.text
    assert streamed.status_code == 400 and "streamed" in streamed.text


async def test_swarm_submit_verify_prints_how_the_runs_compared(
    node_factory: NodeFactory, seed: int, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    import json

    from node.cli import main as cli

    async with (
        node_factory("b", models=(f"fake:{MODEL}",)) as b,
        node_factory("c", models=(f"fake:{MODEL}",)) as c,
    ):
        config = verify_config(seed, rate=0.0)
        peers = (b.addrs[0], c.addrs[0])
        async with node_factory("a", models=(), peers=peers, verify=config) as a:
            await wait_serving(a, (b, c))
            submit = ["submit", "--data-dir", str(tmp_path / "cli"), "--peer", a.addrs[0]]
            submit += [MODEL, "hello", "--verify", "1"]
            assert await trio.to_thread.run_sync(cli.main, [*submit, "--json"]) == 0
            meta = json.loads(capsys.readouterr().out)["meta"]
            assert await trio.to_thread.run_sync(cli.main, submit) == 0
            text = capsys.readouterr().out
    assert (meta["verify_verdict"], meta["verify_ran"]) == ("agree", 2)
    assert set(meta["verify_nodes"].split(",")) == {b.peer_id, c.peer_id}
    assert "verify: agree (2 of 2 ran: " in text
