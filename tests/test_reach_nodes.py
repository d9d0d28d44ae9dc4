"""Reachability in real nodes, in one process on loopback: nodes dial each other back
and learn they are public (a swarm on one machine announces loopback), a node told
it is private announces no address, and a job for its model still reaches it
through the peer that links it, with hops, and the reason in status."""

from __future__ import annotations

from typing import Any

from conftest import NodeFactory
from support import eventually

from node.client import SwarmClient
from node.daemon import Node
from node.membership.config import MembershipConfig
from node.reach.config import Mode, ReachConfig
from node.reach.records import FORWARDED_WHY
from node.reach.relay_service import RelayServiceConfig

FAST = MembershipConfig(heartbeat_s=0.5, dead_after_s=5.0)


def reach(node: Node) -> dict[str, Any]:
    view: dict[str, Any] = node.status()["view"]["reach"]
    return view


async def test_loopback_nodes_dial_each_other_back_and_learn_they_are_public(
    node_factory: NodeFactory,
) -> None:
    async with (
        node_factory("a", models=("fake:echo",), membership=FAST) as a,
        node_factory("b", models=("fake:other",), peers=(a.addrs[0],), membership=FAST) as b,
    ):

        def settled() -> bool:
            # Each learns it is public from the other's dial-back; b's own dial-back
            # to a may finish a moment after b's verdict (it failed the test once).
            public = reach(a)["reach"] == reach(b)["reach"] == "public"
            return public and reach(b)["dialbacks"]["dials_ok"] >= 1

        await eventually(settled, 10)
        body, view = b.status(), reach(b)
    assert body["reach"] == "public" and "relay" in body  # public: it offers a relay
    assert body["addrs"] == list(b.addrs)  # loopback only: a swarm on one machine
    assert view["announced"] == list(b.addrs) and view["confirmed"]
    assert "this machine only" in view["why"] and view["mode"] == "auto"
    assert view["observed"] == ["127.0.0.1"]
    assert view["dialbacks"]["dials_ok"] >= 1  # b dialled a back too
    assert view["forwarding"] == {} and view["relays_held"] == []


async def test_configured_reach_is_announced_as_said(node_factory: NodeFactory) -> None:
    public = "/ip4/93.184.216.34/tcp/17420"
    async with (
        node_factory("p", models=(), reach=ReachConfig(public_addrs=(public,))) as p,
        node_factory("q", models=(), reach=ReachConfig(mode=Mode.PRIVATE)) as q,
    ):
        pb, qb = p.status(), q.status()
    assert pb["reach"] == "public" and pb["addrs"] == [f"{public}/p2p/{p.peer_id}", *p.addrs]
    assert pb["view"]["reach"]["why"] == "configured (--public-addr)"
    assert qb["reach"] == "private" and qb["addrs"] == []
    assert qb["view"]["reach"]["why"] == "configured (--reachability private)"


async def test_a_job_reaches_an_unannounced_provider_through_the_peer_that_links_it(
    node_factory: NodeFactory,
) -> None:
    """b announces no address (as behind a NAT with no relay): a cannot link it, m
    can (b dialled m); a's job for b's model goes a -> m -> b. a announces none either:
    on loopback b could otherwise dial a from m's record of it and link it itself (seen
    on a loaded machine), which a NATed b would do to a public a, a different case."""
    private = ReachConfig(mode=Mode.PRIVATE)
    no_relay = RelayServiceConfig(enabled=False)
    async with (
        node_factory("m", models=("fake:other",), membership=FAST, relay_service=no_relay) as m,
        node_factory(
            "b", models=("fake:echo",), peers=(m.addrs[0],), reach=private, membership=FAST
        ) as b,
        node_factory("a", models=(), peers=(m.addrs[0],), reach=private, membership=FAST) as a,
    ):

        def forwarding() -> dict[str, Any]:
            found: dict[str, Any] = reach(a)["forwarding"]
            return found

        await eventually(lambda: "echo" in forwarding(), 15)
        async with SwarmClient.connect(a.addrs[0]) as client:
            result = await client.infer("echo", {"text": "over a hop"})
        rows = {r["peer_id"]: r for r in m.status()["view"]["peers"]}
        a_rows = {r["peer_id"]: r for r in a.status()["view"]["peers"]}
        view, forwards = reach(a), m.status()["forwards"]
    assert result.meta["served_by"] == b.peer_id
    assert result.meta["via"] == m.peer_id and result.meta["forwarded_by"] == a.peer_id
    assert rows[b.peer_id]["status"] == "linked" and rows[b.peer_id]["addrs"] == []
    assert a_rows.get(b.peer_id, {}).get("status") != "linked"
    assert view["forwarding"] == {"echo": {"via": [m.peer_id], "why": FORWARDED_WHY}}
    assert view["forwarded_jobs"] == 1
    assert forwards == ["echo"]
