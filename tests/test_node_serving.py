"""Real libp2p hosts in one process: a node answers, refuses bad input with typed
errors, and keeps serving everyone else."""

from __future__ import annotations

import socket
import struct
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import msgpack
import numpy as np
import pytest
import trio
from conftest import NodeFactory
from libp2p.custom_types import TProtocol
from support import eventually

from bootstrap.addrs import peer_info
from node.client import SwarmClient, new_request_id
from node.daemon import Node
from node.jobs.outbound import Caller
from node.net.framed import FramedStream
from node.net.host import running_host
from protocols import (
    INFER_PROTOCOL,
    Chunk,
    Error,
    ErrorCode,
    Param,
    Priority,
    RemoteError,
    Request,
    Retry,
    Tensor,
    Value,
    encode,
)
from runners.base import Outputs
from runners.fake import FakeRunner


@asynccontextmanager
async def raw_stream(address: str) -> AsyncIterator[tuple[Any, FramedStream]]:
    """A bare /swarm/infer stream, for sending bytes no well-behaved client would."""
    info = peer_info(address)
    async with running_host(None, ()) as host:
        await host.connect(info)
        stream = await host.new_stream(info.peer_id, [TProtocol(INFER_PROTOCOL)])
        yield stream, FramedStream(stream)


async def test_two_hosts_answer_and_say_who_served(node_factory: NodeFactory) -> None:
    async with (
        node_factory(models=("fake:echo",)) as node,
        SwarmClient.connect(node.addrs[0]) as client,
    ):
        result = await client.infer("echo", {"text": ["a", "b"]})
        again = await client.infer("echo", {"text": ["a", "b"]})
    emb = result.outputs["embedding"]
    assert isinstance(emb, Tensor) and emb.shape == (2, 8) and emb.dtype == "float32"
    assert emb == again.outputs["embedding"]  # deterministic
    assert not np.array_equal(emb.numpy()[0], emb.numpy()[1])  # derived from each input
    assert result.meta["served_by"] == node.peer_id
    assert result.meta["runner"] == "fake"


async def test_three_nodes_forward_to_the_peer_that_serves(node_factory: NodeFactory) -> None:
    async with (
        node_factory("b", models=("fake:echo",)) as b,
        node_factory("c", models=("fake:other",)) as c,
        node_factory("a", models=(), peers=(b.addrs[0], c.addrs[0])) as a,
        SwarmClient.connect(a.addrs[0]) as client,
    ):
        echo = await client.infer("echo", {"text": "hello"})
        other = await client.infer("OTHER", {"text": "hello"})
        chunks: list[Chunk] = []

        async def on_chunk(chunk: Chunk) -> None:
            chunks.append(chunk)

        streamed = await client.infer(
            "echo", {"text": "hi"}, params={"chunks": 4}, on_chunk=on_chunk
        )
        with pytest.raises(RemoteError) as missing:
            await client.infer("nobody-serves-this", {"text": "x"})
    assert echo.meta["served_by"] == b.peer_id and echo.meta["forwarded_by"] == a.peer_id
    assert other.meta["served_by"] == c.peer_id
    assert [c.seq for c in chunks] == [0, 1, 2, 3]
    assert all(isinstance(c.outputs["text"], str) for c in chunks)
    assert streamed.meta["chunks"] == 4 and streamed.outputs == {}
    assert missing.value.code is ErrorCode.MODEL_NOT_FOUND
    assert missing.value.retry is Retry.ELSEWHERE


async def test_bad_requests_get_typed_errors_and_the_stream_still_works(
    node_factory: NodeFactory,
) -> None:
    async with (
        node_factory(models=("fake:echo",)) as node,
        SwarmClient.connect(node.addrs[0]) as client,
    ):
        bad_dtype = {"x": np.zeros((2, 3), dtype=np.int64)}
        bad_shape = {"x": np.zeros((2, 3, 4), dtype=np.float32)}
        for inputs, code in [
            (bad_dtype, ErrorCode.BAD_REQUEST),
            (bad_shape, ErrorCode.BAD_REQUEST),
            ({"nope": "x"}, ErrorCode.BAD_REQUEST),
        ]:
            with pytest.raises(RemoteError) as info:
                await client.infer("echo", inputs)
            assert info.value.code is code
            assert info.value.retry is Retry.NEVER
        with pytest.raises(RemoteError) as unknown:
            await client.infer("no-such-model", {"text": "x"})
        assert unknown.value.code is ErrorCode.MODEL_NOT_FOUND
        assert "echo" in unknown.value.message
        ok = await client.infer("echo", {"x": np.ones((2, 3), dtype=np.float32)})
    assert ok.outputs["embedding"].numpy()[0, 0] == pytest.approx(6.0)  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "payload, code",
    [
        (b"\x00\x00\x00\x05garbage", ErrorCode.MALFORMED),
        (struct.pack(">I", 1 << 30), ErrorCode.TOO_LARGE),
        (
            encode(Error("x", ErrorCode.INTERNAL, "servers send errors, callers do not"))[0],
            ErrorCode.MALFORMED,
        ),
        (
            b"".join(
                struct.pack(">I", len(p)) + p for p in [msgpack.packb({"t": "teleport", "id": "x"})]
            ),
            ErrorCode.MALFORMED,
        ),
    ],
    ids=["garbage", "oversized-frame", "out-of-order", "unknown-tag"],
)
async def test_malformed_frames_get_an_error_then_close(
    node_factory: NodeFactory, payload: bytes, code: ErrorCode
) -> None:
    async with node_factory(models=("fake:echo",)) as node:
        async with raw_stream(node.addrs[0]) as (raw, framed):
            await raw.write(payload)
            with trio.fail_after(5):
                reply = await framed.receive()
                assert isinstance(reply, Error) and reply.code is code
                assert await framed.receive() is None  # then the node closes the stream
        async with SwarmClient.connect(node.addrs[0]) as client:
            assert (await client.infer("echo", {"text": "still here"})).outputs


async def test_wrong_tensor_bytes_are_malformed(node_factory: NodeFactory) -> None:
    frame = msgpack.packb(
        {
            "t": "request",
            "id": "r1",
            "model": "echo",
            "inputs": {"x": {"dtype": "float32", "shape": [2, 2], "data": b"\x00" * 15}},
        }
    )
    async with (
        node_factory(models=("fake:echo",)) as node,
        raw_stream(node.addrs[0]) as (
            raw,
            framed,
        ),
    ):
        await raw.write(struct.pack(">I", len(frame)) + frame)
        with trio.fail_after(5):
            reply = await framed.receive()
    assert isinstance(reply, Error) and reply.code is ErrorCode.MALFORMED
    assert "16 bytes" in reply.message


async def test_peer_vanishing_mid_request_leaves_the_node_serving(
    node_factory: NodeFactory,
) -> None:
    async with node_factory(models=("fake:slow:500",)) as node:
        async with raw_stream(node.addrs[0]) as (raw, framed):
            await framed.send(Request(new_request_id(), "slow", {"text": "x"}))
            service = node.services.service
            assert service is not None
            await eventually(lambda: service.in_flight == 1)
            await raw.reset()
        await eventually(lambda: service.in_flight == 0)
        async with SwarmClient.connect(node.addrs[0]) as client:
            result = await client.infer("slow", {"text": "after"})
    assert result.meta["served_by"] == node.peer_id


async def test_full_queue_answers_overloaded_at_once(node_factory: NodeFactory) -> None:
    async with node_factory(models=("fake:slow:400",), max_queue=1) as node:
        outcomes: list[str] = []

        async def submit(priority: Priority) -> None:
            async with SwarmClient.connect(node.addrs[0]) as client:
                started = trio.current_time()
                try:
                    await client.infer("slow", {"text": "x"}, priority=priority)
                    outcomes.append("ok")
                except RemoteError as exc:
                    assert exc.code is ErrorCode.OVERLOADED
                    assert exc.retry is Retry.ELSEWHERE and (exc.retry_after_ms or 0) > 0
                    assert trio.current_time() - started < 0.3  # refused, not queued
                    outcomes.append("overloaded")

        async with trio.open_nursery() as nursery:
            for _ in range(4):
                nursery.start_soon(submit, Priority.NORMAL)
    # one runs, one waits in the queue of one, the rest are refused
    assert sorted(outcomes) == ["ok", "ok", "overloaded", "overloaded"]


async def test_deadline_and_cancel(node_factory: NodeFactory) -> None:
    async with (
        node_factory(models=("fake:slow:2000",)) as node,
        SwarmClient.connect(node.addrs[0]) as client,
    ):
        with pytest.raises(RemoteError) as late:
            await client.infer("slow", {"text": "x"}, deadline_s=0.2)
        assert late.value.code is ErrorCode.DEADLINE_EXCEEDED
        service = node.services.service
        async with trio.open_nursery() as nursery:  # a caller that gives up once it runs
            nursery.start_soon(client.infer, "slow", {"text": "x"})
            await eventually(lambda: service.in_flight == 1)
            nursery.cancel_scope.cancel()
        # Well before the job's own end (2 s): the Cancel reached the node and stopped it.
        await eventually(lambda: service.in_flight == 0, 1.0)
        ok = await client.infer("slow", {"text": "x"}, deadline_s=5)
    assert ok.meta["served_by"] == node.peer_id


async def test_large_tensor_travels_in_parts(node_factory: NodeFactory) -> None:
    x = np.random.default_rng(0).random((4, 400_000), dtype=np.float32)  # 6.4 MB
    async with (
        node_factory(models=("fake:echo",)) as node,
        SwarmClient.connect(node.addrs[0]) as client,
    ):
        result = await client.infer("echo", {"x": x})
    got = result.outputs["embedding"].numpy()  # type: ignore[union-attr]
    np.testing.assert_allclose(got[:, 0], 2 * x.sum(axis=1), rtol=1e-5)


async def test_client_survives_the_node_restarting(node_factory: NodeFactory) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    stopped = trio.Event()

    async def serve(stop: trio.Event, *, task_status: trio.TaskStatus[Node]) -> None:
        listen = (f"/ip4/127.0.0.1/tcp/{port}",)
        async with node_factory("n", models=("fake:echo",), listen=listen) as node:
            task_status.started(node)
            await stop.wait()
        stopped.set()

    async with trio.open_nursery() as nursery:
        stop_first = trio.Event()
        first_node: Node = await nursery.start(serve, stop_first)
        async with SwarmClient.connect(first_node.addrs[0]) as client:
            first = await client.infer("echo", {"text": "before"})
            stop_first.set()  # the node shuts down under the client's pooled stream
            with trio.fail_after(10):
                await stopped.wait()
            stop_second = trio.Event()
            second_node: Node = await nursery.start(serve, stop_second)
            second = await client.infer("echo", {"text": "after"})  # redials, same client
            stop_second.set()
    assert second_node.addrs == first_node.addrs  # same identity, same port
    assert first.meta["served_by"] == second.meta["served_by"] == second_node.peer_id


class LeakyBug(FakeRunner):
    """A runner with a bug whose exception text names an internal path."""

    async def infer(self, inputs: Mapping[str, Value], params: Mapping[str, Param]) -> Outputs:
        raise KeyError("/srv/secret/weights.bin")


async def test_an_unexpected_failure_tells_the_peer_nothing_of_our_internals(
    node_factory: NodeFactory, caplog: pytest.LogCaptureFixture
) -> None:
    async with (
        node_factory("buggy", models=(), runners=[LeakyBug("bug")]) as node,
        SwarmClient.connect(node.addrs[0]) as client,
    ):
        request_id = new_request_id()
        with trio.fail_after(10), pytest.raises(RemoteError) as failed:
            await client.infer("bug", {"text": "x"}, request_id=request_id)
        assert failed.value.code is ErrorCode.INTERNAL
        told = failed.value.message
        assert request_id in told
        assert "KeyError" not in told and "secret" not in told and "weights" not in told
        # The node keeps the detail, with the request id to find it by.
        logged = [r for r in caplog.records if r.exc_info and request_id in r.getMessage()]
        assert logged and "/srv/secret/weights.bin" in str(logged[0].exc_info[1])
        # ... and serves the next request as before.
        with trio.fail_after(10), pytest.raises(RemoteError) as again:
            await client.infer("bug", {"text": "y"}, request_id="second")
        assert again.value.code is ErrorCode.INTERNAL and "second" in again.value.message


async def test_streams_over_the_idle_cap_are_dropped_in_the_callers_task(
    node_factory: NodeFactory,
) -> None:
    """A stream the pool has no room for is reset before the call returns, by the
    caller, never by a background task that outlives it."""

    class Spawned(trio.abc.Instrument):
        def __init__(self) -> None:
            self.names: list[str] = []

        def task_spawned(self, task: trio.lowlevel.Task) -> None:
            self.names.append(task.name)

    async with node_factory(models=("fake:echo",)) as node:
        peer = peer_info(node.addrs[0]).peer_id
        async with running_host(None, ()) as host:
            await host.connect(peer_info(node.addrs[0]))
            caller = Caller(host, max_idle=1)
            spawned = Spawned()
            trio.lowlevel.add_instrument(spawned)
            try:
                async with trio.open_nursery() as nursery:
                    for k in range(6):
                        request = Request(f"r{k}", "echo", {"text": f"t{k}"})
                        nursery.start_soon(caller.call, peer, request)
            finally:
                trio.lowlevel.remove_instrument(spawned)
                await caller.close()
    assert sum(name.endswith("Caller.call") for name in spawned.names) == 6  # it saw them
    assert not [name for name in spawned.names if "reset" in name], spawned.names


async def test_a_stream_busy_when_the_pool_is_dropped_is_not_pooled_again(
    node_factory: NodeFactory,
) -> None:
    """drop_idle (a hole punch beside a relayed connection) also reaches the streams in
    an exchange then: each is closed when its exchange ends, so no later call rides
    the old connection (scripts/bench_nat found a busy stream kept on the relay)."""
    async with node_factory(models=("fake:slow:300",)) as node:
        peer = peer_info(node.addrs[0]).peer_id
        key = str(peer)
        async with running_host(None, ()) as host:
            await host.connect(peer_info(node.addrs[0]))
            caller = Caller(host)
            try:
                with trio.fail_after(10):
                    await caller.call(peer, Request("r0", "slow", {"text": "a"}))
                assert len(caller._idle[key]) == 1  # a clean exchange pools its stream
                async with trio.open_nursery() as nursery:
                    for k in (1, 2):  # one on the pooled stream, one on a new stream
                        request = Request(f"r{k}", "slow", {"text": "b"})
                        nursery.start_soon(caller.call, peer, request)
                    await trio.sleep(0.1)  # both exchanges under way
                    assert not caller._idle.get(key)  # both streams are in use
                    await caller.drop_idle(key)
                assert not caller._idle.get(key), "a stream busy at the drop was pooled"
                with trio.fail_after(10):
                    await caller.call(peer, Request("r3", "slow", {"text": "c"}))
                assert len(caller._idle[key]) == 1  # pooling goes on as before
            finally:
                await caller.close()
