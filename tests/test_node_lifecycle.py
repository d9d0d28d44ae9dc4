"""Shutdown: work in flight finishes or gets a typed error, new work is refused,
and nothing is left behind: no listener, no task."""

from __future__ import annotations

import errno
import socket
from pathlib import Path

import pytest
import trio
from conftest import NodeFactory
from libp2p import generate_new_ed25519_identity
from support import eventually

from bootstrap.peerstore import PeerStore
from node.client import SwarmClient
from node.net.host import build_host
from protocols import ErrorCode, RemoteError


def _all_tasks() -> set[trio.lowlevel.Task]:
    tasks: set[trio.lowlevel.Task] = set()
    pending = [trio.lowlevel.current_root_task()]
    while pending:
        task = pending.pop()
        if task is None:
            continue
        tasks.add(task)
        for nursery in task.child_nurseries:
            pending.extend(nursery.child_tasks)
    return tasks


def _port(address: str) -> int:
    parts = address.split("/")
    return int(parts[parts.index("tcp") + 1])


def _refused(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == errno.ECONNREFUSED


async def test_in_flight_work_finishes_and_new_work_is_refused(node_factory: NodeFactory) -> None:
    outcome: dict[str, object] = {}
    async with node_factory(models=("fake:slow:600",), shutdown_grace_s=5.0) as node:
        service = node.services.service
        assert service is not None
        async with SwarmClient.connect(node.addrs[0]) as client:

            async def first() -> None:
                outcome["first"] = (await client.infer("slow", {"text": "x"})).meta["served_by"]

            async with trio.open_nursery() as nursery:
                nursery.start_soon(first)
                await eventually(lambda: service.in_flight == 1)
                node.stop()
                await eventually(lambda: service.draining)
                with pytest.raises(RemoteError) as refused:
                    await client.infer("slow", {"text": "late"})
                outcome["late"] = refused.value.code
    assert outcome == {"first": node.peer_id, "late": ErrorCode.NOT_EXECUTED}


async def test_work_past_the_grace_period_gets_a_typed_error(node_factory: NodeFactory) -> None:
    codes: dict[str, ErrorCode] = {}
    async with node_factory(models=("fake:slow:5000",), shutdown_grace_s=0.2) as node:
        service = node.services.service
        assert service is not None

        async def submit(name: str) -> None:
            async with SwarmClient.connect(node.addrs[0]) as client:
                try:
                    await client.infer("slow", {"text": name})
                except RemoteError as exc:
                    codes[name] = exc.code

        async with trio.open_nursery() as nursery:
            nursery.start_soon(submit, "running")
            await eventually(lambda: service.in_flight == 1)
            nursery.start_soon(submit, "queued")
            await eventually(lambda: service.in_flight == 2)
            with trio.fail_after(5):
                node.stop()
                await eventually(lambda: len(codes) == 2)
    assert codes == {"running": ErrorCode.OUTCOME_UNKNOWN, "queued": ErrorCode.NOT_EXECUTED}


async def test_shutdown_leaves_no_listener_and_no_task(node_factory: NodeFactory) -> None:
    before = _all_tasks()
    async with node_factory(models=("fake:echo",)) as node:
        port = _port(node.addrs[0])
        assert not _refused(port)
        async with SwarmClient.connect(node.addrs[0]) as client:
            await client.infer("echo", {"text": "x"})
        assert len(_all_tasks()) > len(before)
    assert _refused(port)
    await eventually(lambda: _all_tasks() == before, 2.0)


async def test_a_node_that_remembers_a_thousand_peers_starts(
    node_factory: NodeFactory, tmp_path: Path
) -> None:
    """Every peer of earlier runs is hinted to membership at start: more than the
    discovery channel holds (256) must wait for room, not fail the start."""
    data_dir = tmp_path / "veteran"
    store = PeerStore.in_data_dir(data_dir)
    remembered = []
    for _ in range(1000):
        peer_id = build_host(generate_new_ed25519_identity()).get_id().to_base58()
        remembered.append(peer_id)
    # Port 9 (discard) is closed on loopback: every redial is refused at once.
    for peer_id in remembered:
        await store.remember(peer_id, ["/ip4/127.0.0.1/tcp/9"])
    assert len(await store.known_peers()) == 1000
    async with (
        node_factory("veteran", models=("fake:echo",), data_dir=data_dir) as node,
        SwarmClient.connect(node.addrs[0]) as client,
    ):
        with trio.fail_after(10):
            result = await client.infer("echo", {"text": "still here"})
        assert result.meta["served_by"] == node.peer_id
        # The hints flow on behind the start: every remembered peer becomes known, and
        # the link planner tries them within its budget (max_links), not all at once.
        membership = node.services.membership
        await eventually(lambda: set(remembered) <= set(membership.known), timeout_s=60)
        await eventually(lambda: len(membership.tried() & set(remembered)) >= 8, timeout_s=60)
