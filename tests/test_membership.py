"""Membership through real nodes: bootstrap + DHT, liveness, and refused records."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import trio
from conftest import NodeFactory
from libp2p import generate_new_ed25519_identity
from support import eventually

from bootstrap.addrs import peer_info
from bootstrap.events import Source
from bootstrap.table import Status, live_peers, serving
from capabilities.signing import sign_record
from node.client import SwarmClient
from node.daemon import Node
from node.membership.caps import CAPS, exchange_records
from node.membership.config import MembershipConfig
from node.net.framed import FramedStream
from node.net.host import build_host, running_host

FAST = MembershipConfig(heartbeat_s=0.3, dead_after_s=1.5, relink_after_s=0.2)


def _linked(node: Node) -> set[str]:
    return {p.peer_id for p in live_peers(node.services.membership.table)}


async def test_ten_nodes_through_one_bootstrap_find_providers_by_dht(
    node_factory: NodeFactory,
) -> None:
    # Models spread so that each is served by some nodes only.
    spread = ["alpha"] * 4 + ["beta"] * 3 + ["gamma"] * 3
    async with AsyncExitStack() as stack:
        boot = await stack.enter_async_context(node_factory("boot", models=(), dht=True))
        nodes = []
        for i, model in enumerate(spread):
            node = await stack.enter_async_context(
                node_factory(
                    f"n{i}", models=(f"fake:{model}",), dht=True, bootstrap=(boot.addrs[0],)
                )
            )
            nodes.append(node)
        providers = {
            m: {n.peer_id for n, s in zip(nodes, spread, strict=True) if s == m}
            for m in set(spread)
        }
        with trio.fail_after(60):
            for node, model in zip(nodes, spread, strict=True):
                wanted = next(m for m in ("alpha", "beta", "gamma") if m != model)
                async with SwarmClient.connect(node.addrs[0]) as client:
                    result = await client.infer(wanted, {"text": "who serves this?"})
                # It ran on a provider the node found through the DHT and linked.
                assert result.meta["served_by"] in providers[wanted]
                found = {p.peer_id for p in serving(node.services.membership.table, wanted)}
                assert found and found <= providers[wanted]


async def test_a_silent_peer_is_dropped_and_comes_back(node_factory: NodeFactory) -> None:
    async with node_factory("a", models=(), membership=FAST) as a:
        async with node_factory(
            "b", models=("fake:echo",), peers=(a.addrs[0],), membership=FAST
        ) as b:
            await eventually(lambda: b.peer_id in _linked(a))
        # b is gone (a killed process is tested in test_daemon_processes.py)
        await eventually(lambda: b.peer_id not in _linked(a), 10.0)

        # Restarted with its data dir: it redials a from its peerstore and is back.
        async with node_factory("b", models=("fake:echo",), membership=FAST) as b2:
            assert b2.peer_id == b.peer_id
            await eventually(lambda: b.peer_id in _linked(a), 5.0)
            async with SwarmClient.connect(a.addrs[0]) as client:
                result = await client.infer("echo", {"text": "back"})
    assert result.meta["served_by"] == b.peer_id


@asynccontextmanager
async def _raw_caps(address: str, key_pair: object) -> AsyncIterator[FramedStream]:
    info = peer_info(address)
    async with running_host(key_pair, ()) as host:
        await host.connect(info)
        yield FramedStream(await host.new_stream(info.peer_id, [CAPS]))


async def test_forged_and_replayed_records_are_refused(node_factory: NodeFactory) -> None:
    async with node_factory("n", models=("fake:echo",)) as node:
        alice, mallory = generate_new_ed25519_identity(), generate_new_ed25519_identity()
        alice_id = build_host(alice).get_id().to_base58()
        body = {"models": [{"name": "stolen"}], "addrs": []}

        # Mallory sends Alice's (genuine) record on her own connection: not hers to send.
        genuine = sign_record(alice, body, seq=10, ttl_s=60)
        async with _raw_caps(node.addrs[0], mallory) as stream:
            await stream.send(genuine)
            assert await stream.receive() is None  # refused: no answer
        # A record whose signature does not match its body.
        tampered = sign_record(mallory, body, seq=10, ttl_s=60)
        forged = type(tampered)(
            tampered.peer_id,
            tampered.seq,
            tampered.ttl_s,
            {**tampered.body, "models": [{"name": "echo"}]},
            tampered.signature,
        )
        async with _raw_caps(node.addrs[0], mallory) as stream:
            await stream.send(forged)
            assert await stream.receive() is None
        assert alice_id not in node.services.membership.table.peers  # neither got anyone listed
        assert not serving(node.services.membership.table, "stolen") and not serving(
            node.services.membership.table, "echo"
        )
        # Alice herself, then an older record of hers: on her own authenticated
        # connection an older seq is only late, so it is ignored, never applied.
        newer = {"models": [{"name": "fresh"}], "addrs": []}
        info = peer_info(node.addrs[0])
        async with running_host(alice, ()) as host:
            await host.connect(info)
            await exchange_records(host, info.peer_id, sign_record(alice, newer, seq=20, ttl_s=60))
            await exchange_records(host, info.peer_id, genuine)  # seq 10 < 20
        peer = node.services.membership.table.peers[alice_id]
        assert peer.status is Status.LINKED and peer.seq == 20
        assert peer.models == ("fresh",)  # the replayed body did not overwrite it
        # And the node goes on serving, and counts the two records it refused.
        async with SwarmClient.connect(node.addrs[0]) as client:
            assert (await client.infer("echo", {"text": "still here"})).outputs
            view = (await client.record()).body["view"]
        assert view["records_refused_on_arrival"] == 2


async def test_status_says_why_discovery_fails(node_factory: NodeFactory) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    nobody = build_host(generate_new_ed25519_identity()).get_id().to_base58()
    dead = f"/ip4/127.0.0.1/tcp/{port}/p2p/{nobody}"
    async with node_factory("lonely", models=(), bootstrap=(dead,)) as node:
        membership = node.services.membership
        assert membership is not None
        await eventually(lambda: Source.BOOTSTRAP in membership.table.problems, 10.0)
        async with SwarmClient.connect(node.addrs[0]) as client:
            view = (await client.record()).body["view"]
    assert "bootstrap unreachable" in view["discovery"]["bootstrap"]


async def test_nodes_joined_through_one_bootstrap_come_to_see_each_other(
    node_factory: NodeFactory,
) -> None:
    async with AsyncExitStack() as stack:
        boot = await stack.enter_async_context(node_factory("boot", models=(), dht=True))
        nodes = [boot]
        for i in range(4):
            nodes.append(
                await stack.enter_async_context(
                    node_factory(f"m{i}", models=(), dht=True, bootstrap=(boot.addrs[0],))
                )
            )
        everyone = {n.peer_id for n in nodes}
        started = trio.current_time()
        for node in nodes:  # the DHT roster, not the bootstrap, tells them of each other
            await eventually(lambda node=node: _linked(node) == everyone - {node.peer_id}, 30.0)
        print(f"full view of {len(nodes)} nodes after {trio.current_time() - started:.1f} s")


async def test_heartbeats_reuse_one_caps_stream_per_pair(node_factory: NodeFactory) -> None:
    async with AsyncExitStack() as stack:
        a = await stack.enter_async_context(node_factory("a", models=(), membership=FAST))
        b = await stack.enter_async_context(
            node_factory("b", models=(), peers=(a.addrs[0],), membership=FAST)
        )
        await eventually(lambda: b.peer_id in _linked(a) and a.peer_id in _linked(b))
        handlers = [h for h in (a.services.caps, b.services.caps) if h is not None]
        assert len(handlers) == 2
        streams = sum(h.streams for h in handlers)
        records = sum(h.exchanges for h in handlers)
        await trio.sleep(10 * FAST.heartbeat_s)
        beats = sum(h.exchanges for h in handlers) - records
        opened = sum(h.streams for h in handlers) - streams
        # The lower id beats every interval (the other only if that stops), on the
        # stream it already holds: about ten beats, no new stream for them.
        assert 5 <= beats <= 20, beats
        assert opened <= 1, opened
        assert b.peer_id in _linked(a) and a.peer_id in _linked(b)


async def test_members_learn_of_each_other_from_peer_samples(node_factory: NodeFactory) -> None:
    # No DHT, no mDNS: c is told only of a, and a's record names b.
    async with AsyncExitStack() as stack:
        a = await stack.enter_async_context(node_factory("a", models=(), membership=FAST))
        b = await stack.enter_async_context(
            node_factory("b", models=("fake:bee",), peers=(a.addrs[0],), membership=FAST)
        )
        await eventually(lambda: b.peer_id in _linked(a))
        c = await stack.enter_async_context(
            node_factory("c", models=(), peers=(a.addrs[0],), membership=FAST)
        )
        await eventually(lambda: _linked(c) == {a.peer_id, b.peer_id}, 10.0)
        await eventually(lambda: c.peer_id in _linked(b), 10.0)
        async with SwarmClient.connect(c.addrs[0]) as client:
            result = await client.infer("bee", {"text": "found you"})
        assert result.meta["served_by"] == b.peer_id
