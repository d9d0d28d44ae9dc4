"""A Kademlia model: XOR routing tables and iterative lookups counted in round trips.

The model (what ``simulate_swarm`` prints as its DHT assumptions):

- Keys are 64 bits (the top of sha2-256 of a peer id or of a model's DHT key);
  at 10,000 nodes only the first ~14 bits tell nodes apart, so 64 lose nothing.
- A routing table keeps, per common-prefix length with the node's own key, a
  bucket of at most ``K`` = 20 contacts, least recently seen first. A contact
  heard from (it answered us, or queried us) moves to the tail; a newcomer to a
  full bucket costs a ping of the head, which is replaced only if it is gone
  (py-libp2p's rule). A contact whose query timed out is removed.
- A lookup runs in lock-step rounds (py-libp2p 0.8.1's ``find_closest_peers_network``):
  each round asks the ``ALPHA`` = 3 closest contacts not yet asked, all at once,
  and waits for every answer or its timeout. An answer lists the answering node's
  ``K`` closest contacts to the key and, for a provider lookup, every provider
  record it holds for the key. A node lookup ends when a round leaves the ``K``
  closest unchanged, when none is left to ask, or after 20 rounds. A provider
  lookup ends at the first round whose answers held a provider record.
- One round trip is one such round; its time is its slowest answer (the pair's
  RTT, plus a connection set-up when the two are not linked) or, for a node that
  is gone, the query timeout.

Everything here is deterministic: ties in distance cannot happen (keys are
distinct), and no randomness is drawn.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

K = 20
ALPHA = 3
BITS = 64
MAX_ROUNDS = 20


def key_of(text: str) -> int:
    """A 64-bit Kademlia key for a peer id or a DHT key's name."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def bucket_of(own: int, other: int) -> int:
    """The bucket ``other`` falls in for ``own``: their common prefix length."""
    return BITS - (own ^ other).bit_length()


class RoutingTable:
    """One node's buckets of contacts (node indices), by common prefix length."""

    __slots__ = ("buckets", "own")

    def __init__(self, own: int) -> None:
        self.own = own
        self.buckets: dict[int, list[int]] = {}

    def __len__(self) -> int:
        return sum(len(b) for b in self.buckets.values())

    def __contains__(self, node: int) -> bool:  # for tests; lookups use keys
        return any(node in b for b in self.buckets.values())

    def contacts(self) -> list[int]:
        return [c for b in sorted(self.buckets) for c in self.buckets[b]]

    def seen(self, node: int, key: int, head_gone: Callable[[int], bool]) -> bool:
        """``node`` (key ``key``) was heard from. Returns whether the head of a full
        bucket had to be pinged for it (``head_gone`` says whether that ping failed)."""
        if key == self.own:
            return False
        index = bucket_of(self.own, key)
        bucket = self.buckets.setdefault(index, [])
        if node in bucket:
            bucket.remove(node)
            bucket.append(node)
            return False
        if len(bucket) < K:
            bucket.append(node)
            return False
        if head_gone(bucket[0]):
            bucket.pop(0)
            bucket.append(node)
        return True

    def fill(self, index: int, nodes: Iterable[int]) -> None:
        """Set a bucket outright (a settled swarm's tables; see ``settle``)."""
        self.buckets[index] = list(nodes)[:K]

    def remove(self, node: int, key: int) -> None:
        bucket = self.buckets.get(bucket_of(self.own, key))
        if bucket is not None and node in bucket:
            bucket.remove(node)

    def closest(self, target: int, keys: list[int], count: int = K) -> list[int]:
        """The ``count`` contacts closest to ``target`` by XOR, closest first.

        Bucket ``j`` = cpl(own, target) holds contacts that share more than ``j``
        bits with the target; buckets above ``j`` share exactly ``j``; a bucket
        ``i`` below ``j`` shares exactly ``i``. So gathering in that order, until
        ``count`` are in hand, and sorting what was gathered is exact.
        """
        j = bucket_of(self.own, target)
        got: list[int] = list(self.buckets.get(j, ()))
        if len(got) < count:
            for i in sorted(self.buckets):
                if i > j:
                    got += self.buckets[i]
            i = j - 1
            while len(got) < count and i >= 0:
                got += self.buckets.get(i, ())
                i -= 1
        got.sort(key=lambda c: keys[c] ^ target)
        return got[:count]


@dataclass(slots=True)
class Lookup:
    """What one lookup did: for the caller's clock, its traffic and its metrics."""

    rounds: int = 0
    seconds: float = 0.0
    closest: list[int] = field(default_factory=list)  # the K closest found, closest first
    providers: list[int] = field(default_factory=list)  # provider records found, in order
    answered: list[int] = field(default_factory=list)  # nodes that answered
    gone: list[int] = field(default_factory=list)  # nodes whose query timed out
    provider_entries: int = 0  # provider records in all answers (for their bytes)


@dataclass(frozen=True, slots=True)
class Network:
    """What a lookup needs of the simulated world (callbacks; node indices)."""

    keys: list[int]
    table: Callable[[int], RoutingTable]
    alive: Callable[[int], bool]
    cost: Callable[[int, int], float]  # seconds for one query and its answer (RTT, dial)
    held: Callable[[int, int], list[int]]  # provider records a node holds for a key
    timeout_s: float


def lookup(
    net: Network,
    origin: int,
    target: int,
    *,
    providers: bool = False,
    start: Iterable[int] = (),
    max_rounds: int = MAX_ROUNDS,
) -> Lookup:
    """Run one iterative lookup (see the module docstring); ``start`` adds contacts
    beyond the origin's table (a new node's bootstrap peer)."""
    keys = net.keys
    result = Lookup()
    own = net.table(origin)
    shortlist = own.closest(target, keys)
    extra = [n for n in start if n != origin and n not in shortlist]
    if extra:
        shortlist = sorted({*shortlist, *extra}, key=lambda c: keys[c] ^ target)[:K]
    asked: set[int] = {origin}
    found: dict[int, None] = {}
    while result.rounds < max_rounds:
        batch = [n for n in shortlist if n not in asked][:ALPHA]
        if not batch:
            break
        result.rounds += 1
        slowest = 0.0
        learned: set[int] = set()
        for node in batch:
            asked.add(node)
            if not net.alive(node):
                result.gone.append(node)
                slowest = max(slowest, net.timeout_s)
                continue
            result.answered.append(node)
            slowest = max(slowest, net.cost(origin, node))
            learned.update(net.table(node).closest(target, keys))
            if providers:
                held = net.held(node, target)
                result.provider_entries += len(held)
                for p in held:
                    found.setdefault(p, None)
        result.seconds += slowest
        if providers and found:
            break
        learned.discard(origin)
        if not learned:
            continue  # nobody answered: ask the next ones, if any are left
        merged = sorted({*shortlist, *learned}, key=lambda c: keys[c] ^ target)[:K]
        if merged == shortlist and not providers:
            break  # no closer node came back: py-libp2p stops here ("no improvement")
        shortlist = merged
    result.closest = [n for n in shortlist if n not in result.gone]
    result.providers = list(found)
    return result
