"""Streams that survive their producer, and hedged requests: the pure parts, then real
in-process nodes.

A producer that dies is stood in for by a peer whose /swarm/infer handler sends
the fake model's first chunks and then breaks the stream (reset) or ends it
without an answer: what the entry node sees of a SIGKILLed peer (test_chaos.py
kills real daemons; test_resume_smollm2.py resumes real generation). The fake
model's words depend on its input alone, so the whole stream the client got can
be checked against what one uninterrupted run streams.
"""

from __future__ import annotations

import json
import random
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from typing import Any

import httpx
import pytest
import trio
from conftest import NodeFactory
from libp2p.custom_types import TProtocol
from support import eventually
from test_routing import wait_linked
from trio_websocket import open_websocket_url as open_ws

from bootstrap.table import PeerTable, RecordVerified, apply
from node.client import SwarmClient
from node.daemon import Node
from node.gateway import GatewayConfig
from node.jobs.hedge import Failed, HedgeStats, race
from node.jobs.resume import (
    Progress,
    Resume,
    continued,
    kind_of,
    may_resume,
    meta,
    resume_of,
)
from node.jobs.router import LocalNode, Router, RouterConfig, RouteRequest, Strategy
from node.net.framed import FramedStream
from protocols import INFER_PROTOCOL, Chunk, ErrorCode, RemoteError, Request, Result
from runners.errors import RunnerError
from runners.fake import FakeRunner

JOB_WAIT_S = 30.0
CHUNKS = 12
TEXT = "a text to stream"


# --- the pure parts ------------------------------------------------------------------


def request(**fields: Any) -> Request:
    base: dict[str, Any] = {"id": "r1", "model": "gen", "inputs": {"messages": "[]"}}
    return Request(**{**base, "stream": True, **fields})


def test_progress_counts_chunks_text_and_tokens() -> None:
    progress = Progress()
    start = progress.mark()
    progress.relayed({"text": "Hel", "tokens": 2})
    progress.relayed({"text": "lo", "tokens": 1})
    progress.relayed({"text": " word"})  # no count (the fake, a backend): one token
    progress.relayed({"text": "", "tokens": 0, "finish_reason": "stop"})  # a last chunk
    progress.produced("p1", start)
    assert (progress.chunks, progress.tokens, progress.text) == (4, 4, "Hello word")
    assert progress.resumes == 0 and meta(progress) == {"chunks": 4}
    later = progress.mark()
    progress.relayed({"text": "!", "tokens": 1})
    progress.produced("p2", later)
    assert progress.resumes == 1
    assert meta(progress) == {
        "chunks": 5,
        "resumes": 1,
        "producers": "p1,p2",
        "takeover_chunks": "0,4",
        "takeover_tokens": "0,4",
    }


def test_which_input_a_continuation_goes_on_from() -> None:
    assert kind_of(request()) == "messages"
    assert kind_of(request(inputs={"prompt": "Once"})) == "prompt"
    assert kind_of(request(inputs={"text": "x"})) == "text"
    assert kind_of(request(inputs={"x": 1})) is None


@pytest.mark.parametrize(
    ("code", "idempotent", "resumed"),
    [
        (ErrorCode.OUTCOME_UNKNOWN, True, True),  # the stream broke, or ended unanswered
        (ErrorCode.INTERNAL, True, True),  # the producer failed inside (its backend died)
        (ErrorCode.NOT_EXECUTED, True, True),  # it shut down
        (ErrorCode.OUTCOME_UNKNOWN, False, False),  # not safe to run twice, even in part
        (ErrorCode.BAD_REQUEST, True, False),  # the request's own fault
        (ErrorCode.DEADLINE_EXCEEDED, True, False),
        (ErrorCode.CANCELLED, True, False),
    ],
)
def test_what_may_be_resumed(code: ErrorCode, idempotent: bool, resumed: bool) -> None:
    error = RemoteError(code, "gone")
    assert may_resume(error, request(idempotent=idempotent)) is resumed
    assert not may_resume(error, request(stream=False))  # a whole answer fails over instead


def test_the_rest_asks_for_a_continuer_at_the_producers_numerics() -> None:
    producer = {"name": "gen", "runner": "openvino-genai", "precision": "int4", "device": "CPU"}
    producer |= {"inference_precision": "f32", "kv_cache_precision": "f32"}
    wanted = resume_of(request(), producer)
    assert wanted == Resume(
        "messages",
        (
            ("runner", "openvino-genai"),
            ("precision", "int4"),
            ("inference_precision", "f32"),
            ("kv_cache_precision", "f32"),
        ),
    )
    assert resume_of(request(), None) == Resume("messages")
    assert resume_of(request(inputs={"x": 1}), producer) is None


def test_the_continuation_is_the_same_request_from_the_text_sent() -> None:
    params = {"max_new_tokens": 64, "temperature": 0.7, "seed": 3}
    asked = request(params=params, hedge_ms=40, priority=0)
    progress = Progress()
    progress.relayed({"text": "Once upon", "tokens": 2})
    progress.relayed({"text": " a time", "tokens": 2})
    job = continued(asked, progress)
    assert job is not None
    assert job == Request(
        **{
            **{f: getattr(asked, f) for f in asked.__dataclass_fields__},
            "params": {**params, "continue_from": "Once upon a time", "continue_tokens": 4},
        }
    )
    # A client's own continuation stays the start of the text.
    own = request(params={"continue_from": "Title: ", "continue_tokens": 3})
    again = continued(own, progress)
    assert again is not None
    assert again.params == {"continue_from": "Title: Once upon a time", "continue_tokens": 7}
    # Nothing to go on from, or too much to send: no continuation.
    assert continued(asked, Progress()) is None
    huge = Progress()
    huge.relayed({"text": "x" * (1 << 18 + 1)})
    assert continued(asked, huge) is None


def body_of(**extra: Any) -> dict[str, Any]:
    entry = {"name": "gen", "task": "text-generation", "device": "CPU", "precision": "int4"}
    return {"models": [{**entry, **extra}], "load": {}}


def test_a_resume_plan_holds_only_peers_that_continue_the_producers_first() -> None:
    table = PeerTable()
    bodies = {
        "old": body_of(),  # an old peer: it announces no continuation
        "chat-bf16": body_of(continues="prompt messages", inference_precision="bf16"),
        "chat-f32": body_of(continues="prompt messages", inference_precision="f32"),
        "prompts": body_of(continues="prompt", inference_precision="f32"),
    }
    for pid, body in bodies.items():
        table = apply(table, RecordVerified(pid, 1, body, at=1.0))
    router = Router("me", RouterConfig(max_attempts=8), rng=random.Random(7), clock=lambda: 1.0)
    local = LocalNode(models=())
    everyone = router.plan(table, local, RouteRequest("gen"), {})
    assert {c.peer_id for c in everyone} == set(bodies)
    for _ in range(20):  # whatever the draws, the producer's numerics come first
        resume = RouteRequest(
            "gen",
            continues="messages",
            alike=(("inference_precision", "f32"),),
            strategy=Strategy.LEAST_LOADED,
        )
        found = [c.peer_id for c in router.plan(table, local, resume, {})]
        assert found == ["chat-f32", "chat-bf16"]
    prompts = router.plan(table, local, RouteRequest("gen", continues="prompt"), {})
    assert {c.peer_id for c in prompts} == {"chat-bf16", "chat-f32", "prompts"}


# --- racing a hedge, in memory ---------------------------------------------------------


async def test_the_first_to_deliver_wins_and_the_other_is_cancelled() -> None:
    stats, ran, cancelled, got = HedgeStats(), [], [], []

    def runner(delays: dict[str, float]) -> Callable[[str, Any], Awaitable[Result]]:
        async def run(choice: str, emit: Any) -> Result:
            ran.append(choice)
            try:
                await trio.sleep(delays[choice])
                await emit({"text": choice})
                return Result("r", {}, {"by": choice})
            except trio.Cancelled:
                cancelled.append(choice)
                raise

        return run

    async def emit(outputs: Any) -> None:
        got.append(outputs["text"])

    # The first is slow: the hedge goes out after 0.05 s and wins.
    winner, result = await race(runner({"slow": 5, "fast": 0.01}), "slow", lambda: "fast",
                                emit, 0.05, stats)  # fmt: skip
    assert (winner, result.meta["by"], got, cancelled) == ("fast", "fast", ["fast"], ["slow"])
    assert stats.describe() == {"sent": 1, "won": 1, "cancelled": 1}
    # The first answers in time: no hedge at all.
    ran.clear()
    winner, _ = await race(runner({"a": 0.0, "b": 0.0}), "a", lambda: "b", emit, 0.05, stats)
    assert winner == "a" and ran == ["a"] and stats.sent == 1
    # No second candidate: the first is waited for.
    winner, _ = await race(runner({"a": 0.1}), "a", lambda: None, emit, 0.01, stats)
    assert winner == "a" and stats.sent == 1


async def test_a_racer_that_fails_leaves_the_other_to_answer() -> None:
    stats = HedgeStats()

    async def run(choice: str, emit: Any) -> Result:
        if choice == "first":
            await trio.sleep(0.1)
            raise RunnerError("the first failed")
        await trio.sleep(0.2)
        return Result("r", {}, {"by": choice})

    async def emit(outputs: Any) -> None:
        raise AssertionError("nothing streams here")

    winner, answer = await race(run, "first", lambda: "second", emit, 0.05, stats)
    assert answer.meta["by"] == "second"
    assert winner == "second" and stats.describe() == {"sent": 1, "won": 1, "cancelled": 0}

    async def both_fail(choice: str, emit: Any) -> Result:
        await trio.sleep(0.1 if choice == "first" else 0.2)
        raise RunnerError(f"{choice} failed")

    with pytest.raises(Failed) as failed:
        await race(both_fail, "first", lambda: "second", emit, 0.05, stats)
    assert failed.value.choice == "second" and "second failed" in str(failed.value.error)


# --- real nodes: a producer cut off mid-stream ------------------------------------------


async def reference(text: str = TEXT, chunks: int = CHUNKS) -> list[str]:
    runner = FakeRunner("gen")
    return [str(c["text"]) async for c in runner.stream({"text": text}, {"chunks": chunks})]


def cut_after(k: int, how: str = "reset") -> Callable[[Any], Awaitable[None]]:
    """A /swarm/infer handler that streams the fake's words (from where a continuation
    starts) for ``k`` chunks, then breaks the stream (``reset``) or ends it without an
    answer (``close``): a producer dying mid-stream, as the entry node sees it."""

    async def handler(raw: Any) -> None:
        stream = FramedStream(raw)
        job = await stream.receive()
        assert isinstance(job, Request)
        start = str(job.params.get("continue_from", "")).split()
        words = [
            str(c["text"])
            async for c in FakeRunner("gen").stream(
                job.inputs,
                {"chunks": int(job.params.get("chunks", 3))},  # type: ignore[arg-type]
            )
        ]
        for seq, word in enumerate(words[len(start) : len(start) + k]):
            await stream.send(Chunk(job.id, seq, {"text": word}))
        await trio.sleep(0.05)
        await (stream.reset() if how == "reset" else stream.close())

    return handler


async def stream_through(entry: Node, **options: Any) -> tuple[Result | RemoteError, list[Chunk]]:
    got: list[Chunk] = []

    async def on_chunk(chunk: Chunk) -> None:
        got.append(chunk)

    async with SwarmClient.connect(entry.addrs[0]) as client:
        try:
            with trio.fail_after(JOB_WAIT_S):
                result = await client.infer(
                    "gen",
                    {"text": TEXT},
                    params={"chunks": CHUNKS},
                    on_chunk=on_chunk,
                    strategy="round-robin",
                    **options,
                )
        except RemoteError as exc:
            return exc, got
        return result, got


async def servers(
    stack: AsyncExitStack, node_factory: NodeFactory, n: int, **fake: Any
) -> list[Node]:
    """``n`` nodes serving the fake ``gen``, by peer id: the order a fresh entry's
    round-robin tries them in is [0], then [-1], then the middle one."""
    nodes = [
        await stack.enter_async_context(
            node_factory(f"s{i}", models=(), runners=(FakeRunner("gen", **fake),))
        )
        for i in range(n)
    ]
    return sorted(nodes, key=lambda node: node.peer_id)


async def entry_of(
    stack: AsyncExitStack, node_factory: NodeFactory, peers: list[Node], **overrides: Any
) -> Node:
    entry = await stack.enter_async_context(
        node_factory("entry", models=(), peers=tuple(p.addrs[0] for p in peers), **overrides)
    )
    await wait_linked([entry], {"gen": {p.peer_id for p in peers}})
    return entry


@pytest.mark.parametrize("how", ["reset", "close"])
async def test_a_stream_whose_producer_dies_goes_on_from_another_peer(
    node_factory: NodeFactory, how: str
) -> None:
    async with AsyncExitStack() as stack:
        dying, honest = await servers(stack, node_factory, 2)
        dying.services.host.set_stream_handler(TProtocol(INFER_PROTOCOL), cut_after(5, how))
        entry = await entry_of(stack, node_factory, [dying, honest])
        result, chunks = await stream_through(entry)
        continuer = honest.services.models.runners["gen"]
    assert isinstance(result, Result), result
    assert [str(c.outputs["text"]) for c in chunks] == await reference()  # whole, once
    assert [c.seq for c in chunks] == list(range(CHUNKS))  # numbered on, unbroken
    assert result.meta["served_by"] == honest.peer_id
    assert result.meta["chunks"] == CHUNKS and result.meta["resumes"] == 1
    assert result.meta["producers"] == f"{dying.peer_id},{honest.peer_id}"
    assert (result.meta["takeover_chunks"], result.meta["takeover_tokens"]) == ("0,5", "0,5")
    assert isinstance(continuer, FakeRunner) and continuer.finished == 1
    assert entry.services.dispatcher.resumes == 1
    text = entry.services.metrics.render().decode()
    assert "swarm_stream_resumes_total 1.0" in text


async def test_a_stream_resumed_twice_after_two_deaths(node_factory: NodeFactory) -> None:
    async with AsyncExitStack() as stack:
        first, honest, second = await servers(stack, node_factory, 3)
        first.services.host.set_stream_handler(TProtocol(INFER_PROTOCOL), cut_after(3))
        second.services.host.set_stream_handler(TProtocol(INFER_PROTOCOL), cut_after(4))
        entry = await entry_of(stack, node_factory, [first, honest, second])
        result, chunks = await stream_through(entry)
    assert isinstance(result, Result), result
    assert [str(c.outputs["text"]) for c in chunks] == await reference()
    assert [c.seq for c in chunks] == list(range(CHUNKS))
    assert result.meta["producers"] == f"{first.peer_id},{second.peer_id},{honest.peer_id}"
    assert result.meta["takeover_chunks"] == "0,3,7" and result.meta["resumes"] == 2


@pytest.mark.parametrize("why", ["cannot continue", "resumes off"])
async def test_a_stream_no_peer_may_continue_fails_typed_naming_its_chunks(
    node_factory: NodeFactory, why: str
) -> None:
    async with AsyncExitStack() as stack:
        continues = why != "cannot continue"
        dying, other = await servers(stack, node_factory, 2, continues=continues)
        dying.services.host.set_stream_handler(TProtocol(INFER_PROTOCOL), cut_after(4))
        router = RouterConfig(max_resumes=0 if why == "resumes off" else 2)
        entry = await entry_of(stack, node_factory, [dying, other], router=router)
        error, chunks = await stream_through(entry)
        ran = other.services.models.runners["gen"]
    assert isinstance(error, RemoteError), error
    assert error.code is ErrorCode.OUTCOME_UNKNOWN
    assert f"{dying.peer_id} failed after 4 chunk(s) of the stream" in error.message
    assert [str(c.outputs["text"]) for c in chunks] == (await reference())[:4]
    assert isinstance(ran, FakeRunner) and ran.started == 0  # nobody ran the rest
    assert entry.services.dispatcher.broken == 1


async def test_this_node_continues_a_stream_itself_when_it_can(node_factory: NodeFactory) -> None:
    async with AsyncExitStack() as stack:
        (dying,) = await servers(stack, node_factory, 1)
        dying.services.host.set_stream_handler(TProtocol(INFER_PROTOCOL), cut_after(2))
        entry = await stack.enter_async_context(
            node_factory("entry", models=(), runners=(FakeRunner("gen"),), peers=(dying.addrs[0],))
        )
        await wait_linked([entry], {"gen": {dying.peer_id}})
        for _ in range(2):  # round-robin: one of two jobs tries the dying peer first
            result, chunks = await stream_through(entry)
            if isinstance(result, Result) and "resumes" in result.meta:
                break
    assert isinstance(result, Result), result
    assert [str(c.outputs["text"]) for c in chunks] == await reference()
    assert result.meta["served_by"] == entry.peer_id
    assert result.meta["producers"] == f"{dying.peer_id},{entry.peer_id}"


# --- real nodes: hedged requests -------------------------------------------------------


async def test_a_slow_peer_is_hedged_the_fast_one_answers_and_the_slow_job_is_cancelled(
    node_factory: NodeFactory,
) -> None:
    """hedge_ms 50: a job whose first peer says nothing for 50 ms goes to the second
    too; the fast one answers and the slow one's run is cancelled, there."""
    async with AsyncExitStack() as stack:
        slow, fast = await servers(stack, node_factory, 2, latency_s=0.01)  # round-robin: slow
        stalls = slow.services.models.runners["gen"]
        assert isinstance(stalls, FakeRunner)
        stalls.latency_s = 3.0
        entry = await entry_of(stack, node_factory, [slow, fast])
        async with SwarmClient.connect(entry.addrs[0]) as client:
            answers: list[Result] = []
            for k, stream in enumerate((False, True, False, True)):
                chunks: list[Chunk] = []

                async def on_chunk(chunk: Chunk, into: list[Chunk] = chunks) -> None:
                    into.append(chunk)

                with trio.fail_after(JOB_WAIT_S):
                    started = trio.current_time()
                    answers.append(
                        await client.infer(
                            "gen",
                            {"text": f"job {k}"},
                            strategy="round-robin",
                            hedge_ms=50,
                            on_chunk=on_chunk if stream else None,
                        )
                    )
                    assert trio.current_time() - started < 2.0  # never waited for the slow one
                if stream:
                    words = [str(c.outputs["text"]) for c in chunks]
                    assert words == await reference(f"job {k}", 3)
            await eventually(lambda: stalls.cancelled == 2, 10)  # jobs 0 and 2 started there
            hedges = entry.services.dispatcher.hedges.describe()
            # Jobs 1 and 3 went to the fast peer first and needed no hedge.
            assert hedges == {"sent": 2, "won": 2, "cancelled": 2}
            assert {a.meta["served_by"] for a in answers} == {fast.peer_id}
            assert stalls.finished == 0 and slow.services.service.in_flight == 0
            text = entry.services.metrics.render().decode()
            for event, n in hedges.items():
                assert f'swarm_hedges_total{{event="{event}"}} {float(n)}' in text

            # Never for a job not marked idempotent: it waits for the slow peer.
            with trio.fail_after(JOB_WAIT_S):
                answer = await client.infer(
                    "gen", {"text": "once"}, strategy="round-robin", hedge_ms=50, idempotent=False
                )
            assert answer.meta["served_by"] == slow.peer_id
            assert entry.services.dispatcher.hedges.sent == 2 and stalls.finished == 1


async def test_the_nodes_hedge_ms_is_the_default_and_a_job_may_turn_it_off(
    node_factory: NodeFactory,
) -> None:
    async with AsyncExitStack() as stack:
        slow, fast = await servers(stack, node_factory, 2, latency_s=0.01)
        stalls = slow.services.models.runners["gen"]
        assert isinstance(stalls, FakeRunner)
        stalls.latency_s = 1.0
        entry = await entry_of(stack, node_factory, [slow, fast], router=RouterConfig(hedge_ms=50))
        async with SwarmClient.connect(entry.addrs[0]) as client:
            with trio.fail_after(JOB_WAIT_S):
                hedged = await client.infer("gen", {"text": "a"}, strategy="round-robin")
                await client.infer("gen", {"text": "b"}, strategy="round-robin")  # fast first
                waited = await client.infer(
                    "gen", {"text": "c"}, strategy="round-robin", hedge_ms=0
                )
    assert hedged.meta["served_by"] == fast.peer_id
    assert waited.meta["served_by"] == slow.peer_id
    assert entry.services.dispatcher.hedges.describe() == {"sent": 1, "won": 1, "cancelled": 1}


async def test_the_gateway_and_the_websocket_pass_a_jobs_hedge_ms_on(
    node_factory: NodeFactory,
) -> None:
    """X-Swarm-Hedge-Ms at the HTTP gateway and "hedge_ms" on the WebSocket hedge the
    job they come with; a malformed one is refused before anything runs."""
    async with AsyncExitStack() as stack:
        slow, fast = await servers(stack, node_factory, 2, latency_s=0.01)
        stalls = slow.services.models.runners["gen"]
        assert isinstance(stalls, FakeRunner)
        stalls.latency_s = 3.0
        router = RouterConfig(strategy=Strategy.ROUND_ROBIN)  # the first job: the slow peer
        entry = await entry_of(
            stack, node_factory, [slow, fast], http=GatewayConfig(), router=router
        )
        assert entry.gateway is not None
        url = entry.gateway.url
        body = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["a"]}]}
        async with httpx.AsyncClient(base_url=url, timeout=JOB_WAIT_S) as http:
            bad = await http.post(
                "/v2/models/gen/infer", json=body, headers={"X-Swarm-Hedge-Ms": "soon"}
            )
            assert bad.status_code == 400, bad.text
            with trio.fail_after(JOB_WAIT_S):
                hedged = await http.post(
                    "/v2/models/gen/infer", json=body, headers={"X-Swarm-Hedge-Ms": "50"}
                )
            assert hedged.status_code == 200, hedged.text
        assert entry.services.dispatcher.hedges.describe() == {"sent": 1, "won": 1, "cancelled": 1}
        async with open_ws(f"{url.replace('http://', 'ws://')}/ws/hedge") as ws:
            job = {"type": "inference", "model": "gen", "inputs": {"text": "b"}, "stream": True}
            await ws.send_message(json.dumps({**job, "id": "bad", "hedge_ms": -1}))
            await ws.send_message(json.dumps({**job, "id": "ok", "hedge_ms": 50}))
            frames: list[dict[str, Any]] = []
            with trio.fail_after(JOB_WAIT_S):
                while len([f for f in frames if f["type"] in ("result", "error")]) < 2:
                    frames.append(json.loads(await ws.get_message()))
        (refused,) = [f for f in frames if f["type"] == "error"]
        assert refused["id"] == "bad" and refused["code"] == "BAD_REQUEST"
        (answer,) = [f for f in frames if f["type"] == "result"]
        assert answer["id"] == "ok" and answer["meta"]["served_by"] == fast.peer_id
        # The WebSocket's job went to the fast peer first, or to the slow one and was hedged.
        hedges = entry.services.dispatcher.hedges.describe()
        assert hedges["sent"] == hedges["won"] == hedges["cancelled"] in (1, 2), hedges
