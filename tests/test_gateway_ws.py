"""WebSocket /ws/{client_id} against real nodes, driven by trio-websocket (a client
that shares no code with the server). The gateway node serves nothing itself;
a second node serves fake models (runners/fake.py), so every answer crossed
the swarm."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
from conftest import NodeFactory
from trio_websocket import ConnectionClosed, ConnectionRejected, WebSocketConnection
from trio_websocket import open_websocket_url as open_ws

from node.daemon import Node
from node.gateway import GatewayConfig
from node.membership.config import MembershipConfig
from node.observe.feed import Feed, Topic
from runners.fake import WORDS

FAST = MembershipConfig(heartbeat_s=0.3, dead_after_s=1.5, relink_after_s=0.2)
TOKEN = "ws-s3cret"
WAIT_S = 20


@asynccontextmanager
async def swarm(node_factory: NodeFactory, **http: Any) -> AsyncIterator[tuple[Node, Node, str]]:
    """(gateway node, serving node, ws://host:port)."""
    async with (
        node_factory("serving", models=("fake:echo", "fake:lazy:3000"), membership=FAST) as serving,
        node_factory(
            "gateway",
            models=(),
            peers=(serving.addrs[0],),
            http=GatewayConfig(**http),
            membership=FAST,
        ) as gateway,
    ):
        assert gateway.gateway is not None
        yield gateway, serving, gateway.gateway.url.replace("http://", "ws://")


async def send(ws: WebSocketConnection, message: dict[str, Any]) -> None:
    await ws.send_message(json.dumps(message))


async def until(ws: WebSocketConnection, match: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    """The next frame ``match`` accepts (frames before it are skipped), within WAIT_S."""
    with trio.fail_after(WAIT_S):
        while True:
            frame: dict[str, Any] = json.loads(await ws.get_message())
            if match(frame):
                return frame


def is_(kind: str, tag: str | None = None) -> Callable[[dict[str, Any]], bool]:
    return lambda f: f.get("type") == kind and (tag is None or f.get("id") == tag)


def words(text: str, n: int) -> str:
    return "".join(WORDS[(len(text) + i) % len(WORDS)] + " " for i in range(n))


async def test_ping_status_and_inference_answered_by_a_peer(node_factory: NodeFactory) -> None:
    async with swarm(node_factory) as (gateway, serving, url), open_ws(f"{url}/ws/c1") as ws:
        await send(ws, {"type": "ping", "id": "p"})
        pong = await until(ws, is_("pong", "p"))
        await send(ws, {"type": "status", "id": "s"})
        status = await until(ws, is_("status", "s"))
        await send(ws, {"type": "inference", "id": "one", "model": "ECHO", "inputs": "hello"})
        result = await until(ws, is_("result", "one"))
    assert pong["at_ms"] > 0
    assert status["node"]["peer_id"] == gateway.peer_id
    assert [p["peer_id"] for p in status["peers"]] == [serving.peer_id]
    assert status["peers"][0]["models"] == ["echo", "lazy"]
    assert result["meta"]["served_by"] == serving.peer_id
    embedding = result["outputs"]["embedding"]
    assert embedding["dtype"] == "float32" and embedding["shape"] == [1, 8]
    assert len(embedding["data"]) == 1 and len(embedding["data"][0]) == 8  # nested rows
    assert result["outputs"]["text"] == words("hello", 3)


async def test_streamed_inference_delivers_every_chunk_in_order(node_factory: NodeFactory) -> None:
    async with swarm(node_factory) as (_, serving, url), open_ws(f"{url}/ws/c1") as ws:
        await send(
            ws,
            {
                "type": "inference",
                "id": "s1",
                "model": "echo",
                "inputs": {"text": "streamed"},
                "params": {"chunks": 5},
                "stream": True,
            },
        )
        chunks = []
        with trio.fail_after(WAIT_S):
            while (frame := json.loads(await ws.get_message()))["type"] == "chunk":
                chunks.append(frame)
    assert frame["type"] == "result" and frame["meta"]["served_by"] == serving.peer_id
    assert [c["seq"] for c in chunks] == list(range(5))
    assert "".join(c["outputs"]["text"] for c in chunks) == words("streamed", 5)


async def test_tensor_inputs_and_several_inferences_at_once(node_factory: NodeFactory) -> None:
    x = {"dtype": "float32", "shape": [2, 3], "data": [1, 2, 3, 0.5, 0.5, 0.5]}
    async with swarm(node_factory) as (_, _, url), open_ws(f"{url}/ws/c1") as ws:
        for i in range(4):
            await send(
                ws, {"type": "inference", "id": f"t{i}", "model": "echo", "inputs": {"x": x}}
            )
        got: dict[str, dict[str, Any]] = {}
        with trio.fail_after(WAIT_S):
            while len(got) < 4:
                frame = json.loads(await ws.get_message())
                got[frame["id"]] = frame
    assert sorted(got) == ["t0", "t1", "t2", "t3"]
    for frame in got.values():
        assert frame["type"] == "result"
        assert frame["outputs"]["embedding"]["data"] == [[12.0] * 8, [3.0] * 8]  # 2 * row sums


async def test_bad_messages_get_typed_errors_and_the_connection_stays(
    node_factory: NodeFactory,
) -> None:
    cases: list[tuple[str | bytes, str]] = [
        ("not json", "MALFORMED"),
        ("[1, 2]", "MALFORMED"),
        (b"\x00binary", "MALFORMED"),
        (json.dumps({"type": "teleport"}), "BAD_REQUEST"),
        (json.dumps({"type": "inference", "model": "nope", "inputs": "a"}), "MODEL_NOT_FOUND"),
        (json.dumps({"type": "inference", "model": "echo", "inputs": 5}), "BAD_REQUEST"),
        (json.dumps({"type": "inference", "model": "echo", "inputs": {"x": [1]}}), "BAD_REQUEST"),
        (
            json.dumps(
                {
                    "type": "inference",
                    "model": "echo",
                    "inputs": {"x": {"dtype": "float32", "shape": [2, 2], "data": [1.0]}},
                }
            ),
            "BAD_REQUEST",
        ),
        (
            json.dumps({"type": "inference", "model": "echo", "inputs": "a", "priority": "x"}),
            "BAD_REQUEST",
        ),
        (json.dumps({"type": "subscribe", "topics": ["weather"]}), "BAD_REQUEST"),
        (json.dumps({"type": "cancel", "id": "never-started"}), "BAD_REQUEST"),
        ("x" * 5000, "TOO_LARGE"),
    ]
    async with swarm(node_factory, max_body=4096) as (_, _, url), open_ws(f"{url}/ws/c1") as ws:
        codes = []
        for message, _ in cases:
            await ws.send_message(message)
            codes.append((await until(ws, is_("error")))["code"])
        await send(ws, {"type": "inference", "id": "ok", "model": "echo", "inputs": "still here"})
        result = await until(ws, is_("result", "ok"))
    assert codes == [code for _, code in cases]
    assert result["outputs"]["text"] == words("still here", 3)


async def test_runner_errors_arrive_with_their_code(node_factory: NodeFactory) -> None:
    async with swarm(node_factory) as (_, _, url), open_ws(f"{url}/ws/c1") as ws:
        request = {"type": "inference", "id": "f", "model": "echo", "inputs": "a"}
        await send(ws, {**request, "params": {"fail": "BAD_REQUEST"}})
        error = await until(ws, is_("error", "f"))
    assert error["code"] == "BAD_REQUEST"


async def test_cancel_and_leaving_stop_the_work_on_the_peer(node_factory: NodeFactory) -> None:
    async def in_flight_drops(node: Node) -> None:
        with trio.fail_after(WAIT_S):
            while node.services.service.in_flight:  # noqa: ASYNC110 (polling another node's state)
                await trio.sleep(0.05)

    async def started(node: Node) -> None:
        with trio.fail_after(WAIT_S):
            while not node.services.service.in_flight:  # noqa: ASYNC110
                await trio.sleep(0.02)

    async with swarm(node_factory) as (_, serving, url):
        async with open_ws(f"{url}/ws/c1") as ws:
            await send(ws, {"type": "inference", "id": "slow", "model": "lazy", "inputs": "a"})
            await started(serving)
            await send(ws, {"type": "cancel", "id": "slow"})
            error = await until(ws, is_("error", "slow"))
            await in_flight_drops(serving)
        async with open_ws(f"{url}/ws/c2") as ws:
            await send(ws, {"type": "inference", "id": "slow", "model": "lazy", "inputs": "a"})
            await started(serving)
        await in_flight_drops(serving)  # the client left without a word: its job stops
    assert error["code"] == "CANCELLED"


async def test_job_and_load_events_reach_subscribers(node_factory: NodeFactory) -> None:
    async with swarm(node_factory) as (gateway, serving, url), open_ws(f"{url}/ws/c1") as ws:
        await send(ws, {"type": "subscribe", "id": "sub", "topics": ["jobs", "load"]})
        subscribed = await until(ws, is_("subscribed", "sub"))
        await send(ws, {"type": "inference", "id": "j", "model": "echo", "inputs": "hi"})
        started = await until(ws, lambda f: f.get("kind") == "started")
        finished = await until(ws, lambda f: f.get("kind") == "finished")
        load = await until(ws, lambda f: f.get("topic") == "load")
        await send(ws, {"type": "unsubscribe", "topics": ["jobs", "load"]})
        after = await until(ws, is_("subscribed"))
    assert subscribed["topics"] == ["jobs", "load"] and after["topics"] == []
    assert started["topic"] == "jobs" and started["data"]["model"] == "echo"
    assert finished["data"]["id"] == started["data"]["id"]
    assert finished["data"]["outcome"] == "ok"
    assert finished["data"]["served_by"] == serving.peer_id
    assert set(load["data"]["nodes"]) == {gateway.peer_id, serving.peer_id}


async def test_peer_events_follow_a_peer_joining_and_leaving(node_factory: NodeFactory) -> None:
    async with swarm(node_factory) as (gateway, _, url), open_ws(f"{url}/ws/c1") as ws:
        await send(ws, {"type": "subscribe", "topics": ["peers"]})
        await until(ws, is_("subscribed"))
        async with node_factory(
            "late", models=("fake:late",), peers=(gateway.addrs[0],), membership=FAST
        ) as late:
            joined = await until(ws, lambda f: f.get("kind") == "joined")
        left = await until(ws, lambda f: f.get("kind") == "left")
    assert joined["data"]["peer_id"] == late.peer_id and joined["data"]["models"] == ["late"]
    assert left["data"]["peer_id"] == late.peer_id


async def test_a_newer_connection_of_the_same_client_replaces_the_older(
    node_factory: NodeFactory,
) -> None:
    async with (
        swarm(node_factory) as (_, _, url),
        open_ws(f"{url}/ws/same") as first,
        open_ws(f"{url}/ws/same") as second,
    ):
        with trio.fail_after(WAIT_S), pytest.raises(ConnectionClosed) as closed:
            while True:
                await first.get_message()
        await send(second, {"type": "ping", "id": "p"})
        assert (await until(second, is_("pong")))["id"] == "p"
    assert closed.value.reason is not None and closed.value.reason.code == 4000


async def test_token_is_required_as_header_or_query(node_factory: NodeFactory) -> None:
    async with swarm(node_factory, token=TOKEN) as (_, _, url):
        with trio.fail_after(WAIT_S), pytest.raises(ConnectionRejected) as rejected:
            async with open_ws(f"{url}/ws/c1"):
                pass
        for ws_url, headers in (
            (f"{url}/ws/c2?token={TOKEN}", None),
            (f"{url}/ws/c3", [(b"authorization", f"Bearer {TOKEN}".encode())]),
        ):
            async with open_ws(ws_url, extra_headers=headers) as ws:
                await send(ws, {"type": "ping", "id": "p"})
                await until(ws, is_("pong"))
        with trio.fail_after(WAIT_S), pytest.raises(ConnectionRejected):
            async with open_ws(f"{url}/ws/bad%20id?token={TOKEN}"):
                pass
    assert rejected.value.status_code == 403


async def test_a_slow_subscriber_is_told_how_many_events_it_lost() -> None:
    feed = Feed(recent=3)
    with feed.subscribe({Topic.JOBS}, size=2) as slow, feed.subscribe({Topic.PEERS}) as other:
        for i in range(5):
            feed.publish(Topic.JOBS, "finished", {"n": i})
        first = [slow.events.receive_nowait() for _ in range(2)]
        feed.publish(Topic.JOBS, "finished", {"n": 5})
        notice = slow.events.receive_nowait()
        feed.publish(Topic.JOBS, "finished", {"n": 6})
        latest = [slow.events.receive_nowait() for _ in range(2)]
        with pytest.raises(trio.WouldBlock):
            other.events.receive_nowait()  # other topics never reach it
    assert [e.data["n"] for e in first] == [0, 1]
    # 2, 3 and 4 were lost while the buffer was full; the notice comes before 5.
    assert (notice.topic, notice.kind, notice.data) == ("feed", "dropped", {"count": 3})
    assert [e.data["n"] for e in latest] == [5, 6]
    assert [j["data"]["n"] for j in feed.recent_jobs()] == [4, 5, 6]
