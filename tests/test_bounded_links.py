"""A swarm under a link budget: every node links at most ``max_links`` peers and
still gets answers for every model (providers found in the DHT, linked on demand or,
when a provider at its budget refuses the link, sent the job unlinked).

Not yet every answer: in one run in a few, one job of 120 finds no provider of its
model (ModelNotFound: two DHT lookups of the node found no provider record). The test
bounds the failures at 5%: before jobs could go to unlinked providers, 8 to 20 of 120
failed (a consumer refused by every provider at its budget had no route)."""

from __future__ import annotations

import random
from collections.abc import Mapping
from contextlib import AsyncExitStack
from typing import Any

import trio
from conftest import NodeFactory

from bootstrap.table import live_peers
from node.daemon import Node
from node.membership.config import MembershipConfig
from node.membership.link_policy import LinkPolicy
from protocols import Request, SwarmError

MODELS = ("alpha", "beta", "gamma")
LINKS = 4
BOUNDED = MembershipConfig(links=LinkPolicy(max_links=LINKS))


async def _ignore(outputs: Mapping[str, Any]) -> None:
    """Chunks of a streamed answer: none here."""


async def test_twenty_nodes_of_four_links_each_get_answers_for_every_model(
    node_factory: NodeFactory, seed: int
) -> None:
    rng = random.Random(seed)
    async with AsyncExitStack() as stack:
        boot = await stack.enter_async_context(
            node_factory("boot", models=(), dht=True, membership=BOUNDED)
        )
        nodes: list[Node] = []
        served: dict[str, set[str]] = {m: set() for m in MODELS}
        for i in range(20):
            model = MODELS[i % len(MODELS)]
            node = await stack.enter_async_context(
                node_factory(
                    f"n{i}",
                    models=(f"fake:{model}",),
                    dht=True,
                    bootstrap=(boot.addrs[0],),
                    membership=BOUNDED,
                )
            )
            nodes.append(node)
            served[model].add(node.peer_id)
        everyone = [boot, *nodes]
        most = {n.peer_id: 0 for n in everyone}
        answered: dict[str, set[str]] = {n.peer_id: set() for n in nodes}
        failed: list[str] = []

        async def watch() -> None:  # every node's links (held and being made), all along
            while True:
                for n in everyone:
                    held = len(n.services.membership.linked())
                    most[n.peer_id] = max(most[n.peer_id], held)
                await trio.sleep(0.05)

        async def ask(node: Node) -> None:
            wanted = list(MODELS)
            rng.shuffle(wanted)
            # The node's own service, as its gateway calls it: twenty in-process clients
            # would each be one more libp2p host, and measure those, not the swarm.
            for model in wanted:
                request = Request(
                    f"{node.peer_id[-6:]}-{model}-{rng.random()}", model, {"text": "hi"}
                )
                try:
                    result = await node.services.service.execute(request, _ignore)
                except SwarmError as exc:  # told whole at the end, with the others
                    failed.append(f"{node.peer_id[-6:]} {model}: {type(exc).__name__} {exc}")
                    continue
                assert result.meta["served_by"] in served[model], model
                answered[node.peer_id].add(model)

        started = trio.current_time()
        with trio.fail_after(240):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch)
                async with trio.open_nursery() as asking:
                    for node in nodes:
                        asking.start_soon(ask, node)
                took = trio.current_time() - started
                # A second round, timed (providers of the models are linked or known now).
                again = trio.current_time()
                async with trio.open_nursery() as asking:
                    for node in nodes:
                        asking.start_soon(ask, node)
                second = trio.current_time() - again
                nursery.cancel_scope.cancel()
        print(
            f"every node answered for every model {took:.1f} s after the last start; "
            f"again: {second:.1f} s; most links held: {max(most.values())}; "
            f"{len(failed)} jobs failed"
        )
        jobs = 2 * len(nodes) * len(MODELS)
        assert len(failed) <= jobs // 20, failed  # see the module's docstring
        for got in answered.values():  # every node had an answer for every model
            assert len(got) == len(MODELS), (got, failed)
        assert max(most.values()) <= LINKS, most
        for n in everyone:
            assert len(live_peers(n.services.membership.table)) <= LINKS
        # Peers beyond the budget are known, not linked.
        assert any(n.services.membership.known for n in nodes)
