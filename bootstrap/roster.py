"""The roster: how a node that joined through one peer comes to know the others.

Every member provides one well-known DHT key; its providers (the DHT's answer
is capped at about 20 per lookup) arrive as Discovered hints and get linked.
Lookups come soon after joining, then ever more rarely while they find nobody
new: one costs kilobytes (every provider with its addresses), a node that joins
later links to us itself, and linked peers name the peers they know in their
records (a node's peer sample), which carry most news once a node has joined.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Collection

import trio

from .dht import ModelDHT

ROSTER_KEY = "swarm/members/v1"  # a DHT key every member provides (not a model name)
LOOKUP_S = 5.0
FIRST_S = 1.0
ASK = 3  # closest peers asked per lookup; each answers with every member it holds
EVERY_S = 15.0  # at most this long between lookups that find new members
MAX_S = 480.0  # lookups that find nobody new back off to this


async def run_roster(
    dht: ModelDHT,
    self_id: str,
    known: Callable[[], Collection[str]],
    rng: random.Random | None = None,
) -> None:
    """Look the roster up for ever; ``known`` gives the peer ids already in the table
    (hints for those are not news). The hints themselves flow into membership
    through the DHT adapter's event channel."""
    rng = rng or random.Random()
    pause, seen = FIRST_S, set[str]()
    while True:
        await trio.sleep(pause * rng.uniform(0.8, 1.2))
        hints = await dht.find_providers(ROSTER_KEY, LOOKUP_S, ask=ASK)
        found = {h.peer_id for h in hints} - set(known()) - seen - {self_id}
        seen |= found
        # Hold the pace while lookups bring news; else back off fast (x4).
        pause = min(pause, EVERY_S) if found else min(pause * 4, MAX_S)
