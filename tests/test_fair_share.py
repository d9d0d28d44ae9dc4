"""Issue 14's measurement as a test: one node serving a 20 ms fake model, peer G
keeping 96 jobs in flight, peer P sending one every 200 ms. With fair share on,
every job of P is answered, its p95 stays under 5x the service time, and the
node still serves at capacity (its one slot busy), answering every job it ran; with it off (first
come, first served, as before) the same run fails those targets: P is refused.

Real nodes and clients on loopback (G and P are libp2p identities of their own);
the driver is scripts/bench_fairness_lib/flood.py, which the benchmark runs too.
"""

from __future__ import annotations

import functools
import random

import pytest
import trio
from bench_fairness_lib.flood import Flood, flood
from conftest import NodeFactory
from libp2p import generate_new_ed25519_identity
from support import eventually

from node.client import SwarmClient
from node.jobs.fairness import FairnessConfig
from node.net.host import peer_id_of
from protocols import Request

SERVICE_S = 0.020
P_JOBS = 25
# The one slot busy at least this share of P's window: 94% on a quiet machine, ~88%
# at load 4 on 2 cores, FIFO alike (the handoff between jobs, on one trio loop with
# G's 96 callers and the node, grows with the machine's load).
CAPACITY = 0.8


def meets_targets(result: Flood) -> bool:
    return (
        result.p.ok == result.p_sent
        and result.p_quantile(0.95) < 5 * SERVICE_S
        and result.capacity_use >= CAPACITY
    )


async def run(node_factory: NodeFactory, seed: int, fair: bool) -> Flood:
    config = FairnessConfig(enabled=fair)
    async with node_factory("server", models=("fake:svc:20",), fairness=config) as node:
        result = await flood(
            node.addrs[0],
            "svc",
            g_key=generate_new_ed25519_identity(),
            p_key=generate_new_ed25519_identity(),
            rng=random.Random(seed),
            service_s=SERVICE_S,
            p_jobs=P_JOBS,
        )
        shares = node.services.service.shares()
    print(f"fair share {'on' if fair else 'off'}: {result.describe()}")
    print(f"ledger: {shares}")
    return result


@pytest.mark.parametrize("fair", [True, False], ids=["fair-share-on", "fair-share-off"])
async def test_a_light_peer_is_served_promptly_while_another_floods(
    node_factory: NodeFactory, seed: int, fair: bool
) -> None:
    result = await run(node_factory, seed, fair)
    # Whatever the policy, no answer is lost: the node answered every job it ran.
    assert result.served_total == result.g.ok + result.p.ok
    assert result.g.failed == {} and result.p.failed == {}
    if fair:
        assert result.p.ok == P_JOBS and result.p.refused == 0
        assert result.p_quantile(0.95) < 5 * SERVICE_S
        assert result.capacity_use >= CAPACITY  # G's flood still keeps the one slot busy
        assert meets_targets(result)
    else:
        # First come, first served: G's queue is full whenever P comes, as issue 14
        # measured (29 of 31 refused): the targets are not met.
        assert result.p.refused >= P_JOBS // 2
        assert not meets_targets(result)


async def test_a_forwarder_is_accountable_for_the_clients_it_vouches_for(
    node_factory: NodeFactory,
) -> None:
    """Clients X and Y send to a, which forwards to b: at b the jobs are a's, divided
    between the origins a names (X and Y, as a authenticated them), never theirs."""
    x, y = generate_new_ed25519_identity(), generate_new_ed25519_identity()
    x_id, y_id = peer_id_of(x), peer_id_of(y)
    async with (
        node_factory("b", models=("fake:slow:300",)) as b,
        node_factory("a", models=(), peers=(b.addrs[0],)) as a,
        SwarmClient.connect(a.addrs[0], key_pair=x) as from_x,
        SwarmClient.connect(a.addrs[0], key_pair=y) as from_y,
    ):
        origins: list[str | None] = []
        service = b.services.service
        feed_start = service.on_start
        assert feed_start is not None

        def started(request: Request) -> None:
            origins.append(request.origin)
            feed_start(request)

        service.on_start = started
        gate = service.gates["slow"]
        async with trio.open_nursery() as nursery:
            for client in (from_x, from_x, from_y):
                nursery.start_soon(functools.partial(client.infer, "slow", {"text": "t"}))
            await eventually(lambda: gate.waiting == 2, timeout_s=10)
            assert gate.queued_by() == {a.peer_id: 2}  # one share: a's
            assert set(gate.origins(a.peer_id)) <= {x_id, y_id}
        at_b = service.shares()["peers"]
        at_a = a.services.service.shares()["peers"]
    assert sorted(origins) == sorted([x_id, x_id, y_id])
    assert [(r["peer"], r["served"]) for r in at_b] == [(a.peer_id, 3)]
    assert {r["peer"]: r["served"] for r in at_a} == {x_id: 2, y_id: 1}
