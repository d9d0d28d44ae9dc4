"""Which peers a node links: a pure planner over what it knows of them.

A *link* is a peer this node keeps a connection and a heartbeat with (its load
and record stay fresh). Links cost both sides bytes and CPU on every interval,
so a node holds at most ``max_links`` of them; every other peer it knows of is
*known*: its record or a DHT provider record says what it serves, and a job can
still go to it (load unknown), or it is linked on demand. ``plan_links`` says
which links stay, which peers to link, and which links to let go. It does no
I/O and reads no clock: the caller passes ``now`` and a seed, and the same
inputs give the same plan (``node.membership.peers`` runs it; so does the
simulator, ``scripts/simulate_swarm``).

The budget is filled by rules in this order; a peer counts once, under the
first rule that picks it, and a rule takes nothing once the budget is full:

1. ``relay``: relays this node holds a reservation on (a NATed node is dialled
   through them: losing one loses reachability).
2. ``provider``: for each model in use (a job needed a peer for it within
   ``demand_s``), the last linked provider stays: one per model, most recently
   used first. Then, for a model in use that no linked peer serves, a known
   provider is linked (on demand), most recent demand first.
3. ``reserved``: linked peers holding a reservation on this node (it relays for
   them; their circuit addresses name it).
4. ``wanted``: linked peers that want the link for reasons of their own (they
   said so in their heartbeats; a peer asking for a link counts as wanting it),
   most recent activity first. Links are mutual: each side counts them, so a
   busy provider keeps its newest consumers and lets the oldest go.
5. ``bucket``: Kademlia buckets (the common prefix length of the two peers'
   DHT keys, as libp2p's routing table computes it), ``per_bucket`` peers
   each, nearest bucket first (near peers are few and hard to find again; far
   ones are plenty): keeps the link graph spread over the key space, the DHT's
   routing table fed with live peers, and every node a few hops from any other.
   Linked peers are kept before known ones are linked.
6. ``spare``: more providers of the models in use, up to
   ``providers_per_model`` linked (a second one for failover and load choice).
7. ``random``: ``random_links`` peers in a seeded random order, and more while
   the node has fewer than ``min_links`` links (a small swarm stays fully
   linked; a node that just joined gets neighbours at once).
8. ``idle``: a linked peer with no reason above stays until ``idle_s`` after
   its last use (or after it was linked); then it ages out.

Guarantees (tests/test_link_policy.py checks them on random inputs): never
more than ``max_links`` peers kept or linked; the last linked provider of a
model in use is never let go while the relays and one provider per model in use
fit in the budget; a bucket with a candidate gets one while the budget has
room; the same inputs and seed give the same plan, whatever the peers' order.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import base58

from protocols.errors import ConfigError

KEY_BITS = 256


@dataclass(frozen=True, slots=True)
class LinkPolicy:
    """The policy's knobs; ``max_links`` is the flag and config key of that name."""

    max_links: int = 32
    per_bucket: int = 1
    providers_per_model: int = 2
    random_links: int = 2
    min_links: int = 8
    demand_s: float = 300.0  # a model asked for this recently is "in use"
    idle_s: float = 120.0  # a link with no reason ages out this long after its last use

    def __post_init__(self) -> None:
        if not 1 <= self.max_links <= 4096:
            raise ConfigError("max_links must be 1 to 4096")
        for name in ("per_bucket", "providers_per_model", "random_links", "min_links"):
            if not 0 <= getattr(self, name) <= 4096:
                raise ConfigError(f"link policy {name} must be 0 to 4096")
        if not (self.demand_s > 0 and self.idle_s >= 0):
            raise ConfigError("link policy demand_s must be positive and idle_s >= 0")


@dataclass(frozen=True, slots=True)
class PeerFacts:
    """What the node knows of one peer, linked or not."""

    peer_id: str
    linked: bool = False  # a link is held now (heartbeats)
    models: tuple[str, ...] = ()  # what its record or a DHT provider record says it serves
    last_used: float | None = None  # when a job last went to it or came from it
    linked_at: float | None = None  # when the link began
    wants: bool = False  # linked: it wants the link for reasons of its own
    linkable: bool = True  # not linked: may be dialled now (not backing off)


@dataclass(frozen=True, slots=True)
class LinkInputs:
    self_id: str
    now: float
    peers: Sequence[PeerFacts]
    demand: Mapping[str, float] = field(default_factory=dict)  # model -> when last needed
    relays: frozenset[str] = frozenset()  # relays this node holds a reservation on
    reserved: frozenset[str] = frozenset()  # peers holding a reservation on this node
    seed: int = 0


@dataclass(frozen=True, slots=True)
class LinkPlan:
    keep: tuple[str, ...]  # linked peers that stay
    link: tuple[str, ...]  # peers to link now, most wanted first
    drop: tuple[str, ...]  # linked peers to let go, by peer id
    why: Mapping[str, str]  # each peer kept or to link: the rule that chose it

    @property
    def chosen(self) -> frozenset[str]:
        return frozenset(self.keep) | frozenset(self.link)


def plan_links(inputs: LinkInputs, policy: LinkPolicy = LinkPolicy()) -> LinkPlan:
    """The links to keep, make and let go (see the module docstring for the rules)."""
    peers = {p.peer_id: p for p in sorted(inputs.peers, key=lambda p: p.peer_id)}
    peers.pop(inputs.self_id, None)
    now, budget = inputs.now, policy.max_links
    why: dict[str, str] = {}

    def take(candidates: Iterable[PeerFacts], reason: str, limit: int | None = None) -> int:
        taken = 0
        for peer in candidates:
            if len(why) >= budget or (limit is not None and taken >= limit):
                break
            if peer.peer_id not in why and (peer.linked or peer.linkable):
                why[peer.peer_id] = reason
                taken += 1
        return taken

    linked = [p for p in peers.values() if p.linked]
    order = _shuffled(peers.values(), inputs.seed)

    def recent(p: PeerFacts) -> float:
        return max(p.last_used or -1e18, p.linked_at or -1e18)

    # 1. relays
    take((peers[r] for r in sorted(inputs.relays) if r in peers), "relay")
    # 2. providers of the models in use: the last linked one of each, then on demand
    in_use = sorted(
        (m for m, at in inputs.demand.items() if now - at <= policy.demand_s),
        key=lambda m: (-inputs.demand[m], m),
    )
    by_use = sorted(linked, key=lambda p: (-recent(p), p.peer_id))
    for model in in_use:
        # A relay about to be linked may serve it too, but until that dial succeeds
        # the linked provider is the one that answers: it stays.
        if not any(_serves(peers[pid], model) and peers[pid].linked for pid in why):
            take((p for p in by_use if _serves(p, model)), "provider", 1)
    for model in in_use:
        if not any(_serves(peers[pid], model) for pid in why):
            known = [p for p in order if not p.linked and _serves(p, model)]
            take(sorted(known, key=lambda p: -(p.last_used or -1e18)), "provider", 1)
    # 3. peers reserving on us; 4. peers that want the link
    take((p for p in by_use if p.peer_id in inputs.reserved), "reserved")
    take((p for p in by_use if p.wants), "wanted")
    # 5. one peer (or per_bucket) for each Kademlia bucket, nearest first
    buckets: dict[int, list[PeerFacts]] = {}
    for peer in order:
        buckets.setdefault(bucket(inputs.self_id, peer.peer_id), []).append(peer)
    for index in sorted(buckets, reverse=True):
        members = sorted(buckets[index], key=lambda p: not p.linked)  # stable: order kept
        have = sum(1 for p in members if p.peer_id in why)
        take(members, "bucket", max(0, policy.per_bucket - have))
    # 6. a second provider (or providers_per_model) of each model in use
    for model in in_use:
        have = sum(1 for pid in why if _serves(peers[pid], model))
        servers = sorted((p for p in order if _serves(p, model)), key=lambda p: not p.linked)
        take(servers, "spare", max(0, policy.providers_per_model - have))
    # 7. random: a few always, more below min_links
    take(order, "random", max(policy.random_links, policy.min_links - len(why)))
    # 8. idle links age out
    take((p for p in by_use if now - recent(p) < policy.idle_s), "idle")

    keep = tuple(pid for pid in why if peers[pid].linked)
    new = tuple(pid for pid in why if not peers[pid].linked)
    drop = tuple(p.peer_id for p in linked if p.peer_id not in why)
    return LinkPlan(keep=keep, link=new, drop=drop, why=dict(why))


def bucket(self_id: str, peer_id: str) -> int:
    """The Kademlia bucket ``peer_id`` falls in for ``self_id``: the common prefix
    length of their DHT keys (0: the far half of the key space; 256: the same key)."""
    distance = int.from_bytes(dht_key(self_id), "big") ^ int.from_bytes(dht_key(peer_id), "big")
    return KEY_BITS - distance.bit_length()


@lru_cache(maxsize=8192)
def dht_key(peer_id: str) -> bytes:
    """A peer's key in the DHT, as libp2p's routing table computes it: the sha2-256
    of the peer id's bytes. An id that is not base58 (a simulator's) hashes as text."""
    try:
        raw = base58.b58decode(peer_id)
    except ValueError:
        raw = peer_id.encode()
    return hashlib.sha256(raw).digest()


def _shuffled(peers: Iterable[PeerFacts], seed: int) -> list[PeerFacts]:
    """A seeded random order that does not change while the peers stay: each peer's
    place is a hash of the seed and its id."""
    rank: Callable[[PeerFacts], bytes] = lambda p: hashlib.sha256(  # noqa: E731
        f"{seed}:{p.peer_id}".encode()
    ).digest()
    return sorted(peers, key=rank)


def _serves(peer: PeerFacts, model: str) -> bool:
    want = model.casefold()
    return any(m.casefold() == want for m in peer.models)
