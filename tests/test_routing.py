"""Routing and failover between real in-process nodes: where jobs land, and what
happens when the peer chosen is busy, stalls, or answers garbage.

Every node here is a real libp2p host (``node_factory``) serving FakeRunner
models, whose outputs are derived from their inputs: an answer can be checked
against the request it belongs to, whoever computed it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import numpy as np
import pytest
import trio
from conftest import NodeFactory
from libp2p.custom_types import TProtocol
from support import eventually

from bootstrap.table import serving
from node.client import SwarmClient
from node.daemon import Node
from node.jobs.router import Strategy
from protocols import INFER_PROTOCOL, Chunk, ErrorCode, Param, RemoteError, Result, Tensor, Value
from runners.base import Outputs
from runners.errors import RunnerError
from runners.fake import FakeRunner

LINK_WAIT_S = 30.0
JOB_WAIT_S = 30.0


def links(node: Node) -> dict[str, set[str]]:
    """Model -> the linked peers that ``node`` knows serve it."""
    table = node.services.membership.table
    models = {m for p in table.peers.values() for m in p.models}
    return {m: {p.peer_id for p in serving(table, m)} for m in models}


async def wait_linked(nodes: Sequence[Node], servers: dict[str, set[str]]) -> None:
    """Until every node knows, for each model, each other node that serves it."""

    def done() -> bool:
        return all(
            all(links(n).get(m, set()) >= ids - {n.peer_id} for m, ids in servers.items())
            for n in nodes
        )

    await eventually(done, LINK_WAIT_S)


REFERENCE = FakeRunner("reference")  # what any node serving a fake model computes


async def assert_answers(result: Result, text: str, request_id: str) -> None:
    """``result`` is the answer to ``request_id``, whose input was ``text``."""
    assert result.id == request_id
    got = result.outputs["embedding"]
    want = (await REFERENCE.infer({"text": text}, {}))["embedding"]
    assert isinstance(got, Tensor) and isinstance(want, Tensor)
    np.testing.assert_array_equal(got.numpy(), want.numpy())


async def streamed(
    client: SwarmClient, model: str, text: str, request_id: str, **options: Any
) -> tuple[Result, list[str]]:
    """One streamed job: its final Result and the words of its chunks, checked
    against what any node serving a fake model streams for ``text``."""
    words: list[str] = []

    async def on_chunk(chunk: Chunk) -> None:
        word = chunk.outputs["text"]
        assert isinstance(word, str)
        words.append(word)

    with trio.fail_after(JOB_WAIT_S):
        result = await client.infer(
            model, {"text": text}, request_id=request_id, on_chunk=on_chunk, **options
        )
    want = [str(c["text"]) async for c in REFERENCE.stream({"text": text}, {})]
    assert result.id == request_id
    assert words == want and result.meta["chunks"] == len(want), (words, result.meta)
    return result, words


# --- 1. where jobs land -----------------------------------------------------------------


@asynccontextmanager
async def ring_of_five(node_factory: NodeFactory) -> AsyncIterator[list[Node]]:
    """Five nodes; node i serves m{i} and m{i-1}, so m{i} is served by nodes i and i+1."""
    async with AsyncExitStack() as stack:
        nodes: list[Node] = []
        for i in range(5):
            models = (f"fake:m{i}:5", f"fake:m{(i - 1) % 5}:5")
            peers = tuple(n.addrs[0] for n in nodes)
            nodes.append(
                await stack.enter_async_context(node_factory(f"n{i}", models=models, peers=peers))
            )
        yield nodes


@pytest.mark.slow
async def test_jobs_at_every_node_land_on_a_server_for_every_strategy(
    node_factory: NodeFactory,
) -> None:
    async with ring_of_five(node_factory) as nodes:
        servers = {f"m{i}": {nodes[i].peer_id, nodes[(i + 1) % 5].peer_id} for i in range(5)}
        await wait_linked(nodes, servers)
        landed: dict[tuple[Strategy, str, str], list[str]] = {}

        async def submit_all(entry: Node) -> None:
            async with SwarmClient.connect(entry.addrs[0]) as client:
                for strategy in Strategy:
                    for model in servers:
                        for k in range(2):
                            text = f"{strategy}/{entry.peer_id[-6:]}/{model}/{k}"
                            rid = f"{strategy}-{entry.peer_id[-8:]}-{model}-{k}"
                            with trio.fail_after(JOB_WAIT_S):
                                result = await client.infer(
                                    model, {"text": text}, strategy=strategy, request_id=rid
                                )
                            await assert_answers(result, text, rid)
                            served_by = result.meta["served_by"]
                            assert served_by in servers[model], (strategy, model, result.meta)
                            assert result.meta["attempts"] == 1  # all healthy: no failover
                            if served_by != entry.peer_id:
                                assert result.meta["forwarded_by"] == entry.peer_id
                            landed.setdefault((strategy, entry.peer_id, model), []).append(
                                str(served_by)
                            )
                    streams, _ = await streamed(
                        client, model, f"s/{text}", f"s-{rid}", strategy=strategy
                    )
                    assert streams.meta["served_by"] in servers[model], streams.meta

        async with trio.open_nursery() as nursery:
            for entry in nodes:
                nursery.start_soon(submit_all, entry)

    assert len(landed) == len(Strategy) * 5 * 5
    for (strategy, entry_id, model), where in landed.items():
        if strategy is Strategy.LOCAL_FIRST and entry_id in servers[model]:
            assert where == [entry_id, entry_id], "local-first: a serving node runs it itself"
        if strategy is Strategy.ROUND_ROBIN:
            assert set(where) == servers[model], f"round-robin took turns: {where}"


# --- 2. a busy peer answers OVERLOADED ------------------------------------------------


async def test_a_busy_peer_says_overloaded_and_the_job_goes_to_the_other(
    node_factory: NodeFactory,
) -> None:
    async with (
        node_factory("free", models=("fake:job:20",)) as free,
        node_factory(
            "busy", models=("fake:job:60000",), max_queue=0, peers=(free.addrs[0],)
        ) as busy,
        node_factory("entry", models=(), peers=(busy.addrs[0], free.addrs[0])) as entry,
    ):
        servers = {"job": {busy.peer_id, free.peer_id}}
        await wait_linked([entry, busy], servers)
        busy_service = busy.services.service
        async with trio.open_nursery() as nursery:
            hold = trio.CancelScope()

            async def keep_busy() -> None:
                with hold:
                    async with SwarmClient.connect(busy.addrs[0]) as client:
                        await client.infer("job", {"text": "hold"}, strategy="local-first")

            nursery.start_soon(keep_busy)
            await eventually(lambda: busy_service.in_flight == 1, 10)

            results: list[Result] = []
            async with SwarmClient.connect(entry.addrs[0]) as client:
                for k in range(8):  # round-robin: every other plan starts at the busy peer
                    text, rid = f"job {k}", f"overloaded-{k}"
                    with trio.fail_after(JOB_WAIT_S):
                        result = await client.infer(
                            "job", {"text": text}, strategy="round-robin", request_id=rid
                        )
                    await assert_answers(result, text, rid)
                    results.append(result)
            # The busy node itself, asked to run it locally first, is overloaded too.
            async with SwarmClient.connect(busy.addrs[0]) as client:
                text, rid = "local job", "overloaded-local"
                with trio.fail_after(JOB_WAIT_S):
                    mine = await client.infer(
                        "job", {"text": text}, strategy="local-first", request_id=rid
                    )
                await assert_answers(mine, text, rid)
            assert mine.meta["served_by"] == free.peer_id
            assert mine.meta["forwarded_by"] == busy.peer_id and mine.meta["attempts"] == 2
            assert busy_service.in_flight == 1  # still busy with the one it held all along
            hold.cancel()

    assert len(results) == 8  # none lost
    assert {r.meta["served_by"] for r in results} == {free.peer_id}
    attempts = [int(r.meta["attempts"]) for r in results]  # type: ignore[arg-type]
    assert all(a >= 1 for a in attempts)
    # Round-robin takes one turn per job, not per attempt: the busy peer comes first for
    # every other job (a failover's re-plan must not move the ring on, or it always would).
    assert attempts.count(2) == 4, attempts


# --- 3. a peer that stalls past the deadline -----------------------------------------


async def test_a_stalled_peer_gives_deadline_exceeded_and_is_cancelled(
    node_factory: NodeFactory,
) -> None:
    async with (
        node_factory("stall", models=("fake:stuck:600000",)) as stall,
        node_factory("entry", models=(), peers=(stall.addrs[0],)) as entry,
        SwarmClient.connect(entry.addrs[0]) as client,
    ):
        await wait_linked([entry], {"stuck": {stall.peer_id}})
        stalled, entered = stall.services.service, entry.services.service

        with trio.fail_after(JOB_WAIT_S), pytest.raises(RemoteError) as unknown:
            await client.infer("stuck", {"text": "x"}, strategy="fastest")
        assert unknown.value.code is ErrorCode.BAD_REQUEST and "fastest" in str(unknown.value)
        assert stalled.in_flight == 0  # refused by the entry; nothing was forwarded

        started = trio.current_time()
        with trio.fail_after(15), pytest.raises(RemoteError) as late:
            await client.infer("stuck", {"text": "x"}, deadline_s=1)
        took = trio.current_time() - started
        assert late.value.code is ErrorCode.DEADLINE_EXCEEDED, late.value
        assert 0.9 <= took < 10, took
        await eventually(lambda: stalled.in_flight == 0 and entered.in_flight == 0, 10)

        # No deadline this time: the client gives up, and its Cancel travels both hops.
        with trio.move_on_after(15) as waited:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client.infer, "stuck", {"text": "y"})
                await eventually(lambda: stalled.in_flight == 1, 10)
                nursery.cancel_scope.cancel()
        assert not waited.cancelled_caught
        await eventually(lambda: stalled.in_flight == 0 and entered.in_flight == 0, 10)


# --- 4. a peer that answers garbage ----------------------------------------------------


async def answer_garbage(stream: Any) -> None:
    """Reads the request, answers bytes that are no message at all, hangs up."""
    try:
        await stream.read(65536)
        await stream.write(b"\xc1" * 64)  # 0xc1 is never valid msgpack
        await stream.close()
    except Exception:  # the caller may hang up first; it learnt what it needed
        await stream.reset()


async def test_garbage_answers_fail_over_and_open_the_peer_breaker(
    node_factory: NodeFactory,
) -> None:
    async with (
        node_factory("junk", models=("fake:emb",)) as junk,
        node_factory("good", models=("fake:emb",)) as good,
        node_factory("entry", models=(), peers=(junk.addrs[0], good.addrs[0])) as entry,
        SwarmClient.connect(entry.addrs[0]) as client,
    ):
        junk.services.host.set_stream_handler(TProtocol(INFER_PROTOCOL), answer_garbage)
        await wait_linked([entry], {"emb": {junk.peer_id, good.peer_id}})

        # Streams first, before the breaker opens: one of the two tries the garbage
        # peer first and is failed over before any chunk was relayed.
        streams = [
            (await streamed(client, "emb", f"s{k}", f"garbage-s{k}", strategy="round-robin"))[0]
            for k in range(2)
        ]
        assert {r.meta["served_by"] for r in streams} == {good.peer_id}
        assert sorted(int(r.meta["attempts"]) for r in streams) == [1, 2]  # type: ignore[arg-type]

        results = []
        for k in range(10):
            text, rid = f"emb {k}", f"garbage-{k}"
            with trio.fail_after(JOB_WAIT_S):
                result = await client.infer(
                    "emb", {"text": text}, strategy="round-robin", request_id=rid
                )
            await assert_answers(result, text, rid)
            results.append(result)
        with trio.fail_after(JOB_WAIT_S):
            view = (await client.record()).body["view"]

    assert {r.meta["served_by"] for r in results} == {good.peer_id}
    attempts = [int(r.meta["attempts"]) for r in streams + results]  # type: ignore[arg-type]
    # Every other job tries the garbage peer first, until 3 failures open its breaker.
    assert attempts.count(2) == 3 and attempts.count(1) == len(attempts) - 3, attempts
    breakers = view["routing"]["peer_breakers"]
    assert set(breakers) == {junk.peer_id}, breakers
    # Open, or half-open if the 5 s cooldown passed on a slow machine: both mean it opened.
    assert breakers[junk.peer_id]["state"] in ("open", "half-open"), breakers
    assert breakers[junk.peer_id]["failures"] >= 3, breakers
    assert view["routing"]["failovers"] >= 3


# --- 5. a local stream that breaks after its first chunks ----------------------------


class MidStreamFailureFake(FakeRunner):
    """Stands in for a runner whose backend dies mid-generation (the OpenAI runner when
    its server goes away while streaming): ``after`` chunks, then an INTERNAL error."""

    def __init__(self, name: str, after: int) -> None:
        super().__init__(name)
        self.after = after

    async def stream(
        self, inputs: Mapping[str, Value], params: Mapping[str, Param]
    ) -> AsyncIterator[Outputs]:
        self._validate(inputs, params)
        for i in range(self.after):
            await trio.sleep(0.01)
            yield {"text": f"word{i} "}
        raise RunnerError(f"{self.info.name}: the backend went away mid-stream")


async def test_a_local_stream_broken_mid_way_goes_on_elsewhere_from_where_it_broke(
    node_factory: NodeFactory,
) -> None:
    broken = MidStreamFailureFake("gen", after=2)
    async with (
        node_factory("other", models=("fake:gen",)) as other,
        node_factory("local", models=(), runners=(broken,), peers=(other.addrs[0],)) as local,
        SwarmClient.connect(local.addrs[0]) as client,
    ):
        await wait_linked([local], {"gen": {other.peer_id}})
        words: list[Chunk] = []

        async def on_chunk(chunk: Chunk) -> None:
            words.append(chunk)

        with trio.fail_after(JOB_WAIT_S):
            result = await client.infer(
                "gen",
                {"text": "x"},
                params={"chunks": 5},
                strategy="local-first",
                on_chunk=on_chunk,
            )
    # Two chunks came from this node's runner; the other node continued from there
    # (node.jobs.resume), so the stream is one answer of five chunks, not a second
    # whole answer after the first two.
    reference = [c["text"] async for c in FakeRunner("gen").stream({"text": "x"}, {"chunks": 5})]
    assert [c.outputs["text"] for c in words] == ["word0 ", "word1 ", *reference[2:]]
    assert [c.seq for c in words] == list(range(5))
    assert result.meta["producers"] == f"{local.peer_id},{other.peer_id}"
    assert result.meta["takeover_chunks"] == "0,2"
