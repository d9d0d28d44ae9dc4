"""The simulated swarm: a virtual clock, an event queue, a network, and what each
node's I/O does around its real peer table, link policy and router.

One ``random.Random`` (the seed's) draws everything, events run in (time, order
of scheduling) order, and nothing reads a wall clock, so a seed gives one run.
What each node does is what ``node.membership.peers`` does, written as events:

- a link is a dial and a swap of full records (``RecordVerified`` on both sides,
  with the record's 60 s expiry); each side's routing table is offered the other
  (``bootstrap.dht`` seeds connected peers); closing a link makes each side
  apply ``Unreachable`` (the table has no "unlinked" event), and silence drops
  the entry ``dead_after_s`` later;
- a node at its budget that is asked for a link answers with its own record but
  keeps no link: the asker holds the record (a known peer: routed to, not beaten)
  until silence drops it, the nearest the table comes to the issue's "known, not
  linked" peers;
- heartbeats: every ``heartbeat_s * U(0.4, 0.6)`` a node checks its linked live
  peers and beats those due (the lower id of a pair each interval, the other after
  ``LAGGARD_FACTOR`` intervals of silence; every second for ``JOIN_WINDOW_S``
  after a link); an exchange is applied to both tables as ``Heard`` (load,
  renewed expiry), stamped with its arrival times; a beat to a node that is
  gone fails after the exchange timeout (``Unreachable``, link closed);
- samples: a heartbeat from a peer that links more than we do pulls its full
  record (at most every ``SAMPLE_EVERY_S`` per peer); the sample's peers become
  hints for the link policy (bounded links: hints, not dials);
- the DHT (``kademlia``): a settled swarm's routing tables and provider records
  at the start; joins do a self-lookup through a bootstrap node, then announce
  each model and the roster key (ADD_PROVIDER to the 20 closest found), again
  every ``reprovide_s``; a self-lookup every ``refresh_s``; roster lookups on
  ``bootstrap.roster``'s schedule (ask the 3 closest, back off x4 to 480 s);
- churn: joins and leaves, each a Poisson process at ``churn_per_min`` of the
  swarm a minute; a node that leaves stops answering (nothing is closed).
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable
from typing import Any

from bootstrap import roster
from bootstrap.dht import DhtConfig, model_key
from bootstrap.table import Heard, RecordVerified, Status, Tick, Unreachable, apply
from node.membership import caps, peers
from node.membership.config import LAGGARD_FACTOR

from . import kademlia as kad
from .links import CANDIDATES_PER_BUCKET, Admit, LinkView, policy_for
from .model import Link, SimConfig, SimNode
from .sizes import DIAL_BYTES, DIAL_MESSAGES, STREAM_OPEN_BYTES, TCPIP_BYTES, Sizes, wire
from .traffic import Traffic

DHT = DhtConfig()
EXCHANGE_TIMEOUT_S = caps.EXCHANGE_TIMEOUT_S
RECORD_TTL_S = float(caps.RECORD_TTL_S)
LINK_TIMEOUT_S = peers.LINK_TIMEOUT_S
DIAL_RTTS = 2.0  # TCP, then Noise XX with multistream and identify folded into one more
HINTS = 64
CACHE_S = 600.0  # how long a node keeps the providers a DHT lookup found
IN_USE_S = 300.0  # the link policy's demand_s: a model asked for this recently is in use
KNOWN_PER_MODEL = 2  # cached providers of a model offered to the link policy
HINTS_OFFERED = 16  # the newest hints offered to it
NO_WANT = frozenset({"idle", "wanted"})  # a peer keeping a link for these does not need it
MASK = (1 << 64) - 1


def _mix(x: int) -> int:
    """splitmix64's finaliser: a deterministic hash for per-pair draws."""
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & MASK
    x = (x ^ (x >> 27)) * 0x94D049BB133111EB & MASK
    return x ^ (x >> 31)


class World:
    def __init__(self, config: SimConfig, sizes: Sizes) -> None:
        self.config = config
        self.sizes = sizes
        self.rng = random.Random(config.seed)
        self.now = 0.0
        self._queue: list[tuple[float, int, Callable[[Any], None], Any]] = []
        self._order = 0
        self._salt = self.rng.getrandbits(64)
        self.nodes: list[SimNode] = []
        self.keys: list[int] = []
        self.index: dict[str, int] = {}
        self.live: list[int] = []
        self._live_at: dict[int, int] = {}
        self.bootstraps: list[int] = []
        self.traffic = Traffic(config)
        self.policy = policy_for(config.max_links)
        self.model_names = [f"model-{r:03d}" for r in range(1, config.models + 1)]
        self.model_keys = {m: kad.key_of(model_key(m).hex()) for m in self.model_names}
        self.roster_key = kad.key_of(roster.ROSTER_KEY)
        self.serving: dict[str, int] = dict.fromkeys(self.model_names, 0)  # live providers
        self.net = kad.Network(
            keys=self.keys,
            table=lambda n: self.nodes[n].rt,
            alive=lambda n: self.nodes[n].alive,
            cost=self._query_cost,
            held=lambda n, key: list(self.nodes[n].store.get(key, ())),
            timeout_s=DHT.query_timeout_s,
        )
        self.peak_links = 0  # the most links any node held at any time (the budget's check)
        self.jobs: Any = None  # the job path (jobs.Jobs), set by whoever runs the world

    # -- clock ---------------------------------------------------------------------

    def clock(self) -> float:
        return self.now

    def at(self, t: float, fn: Callable[[Any], None], arg: Any = None) -> None:
        self._order += 1
        heapq.heappush(self._queue, (t, self._order, fn, arg))

    def run(self, until: float, on_step: Callable[[float], None] | None = None) -> None:
        queue = self._queue
        while queue and queue[0][0] <= until:
            t, _, fn, arg = heapq.heappop(queue)
            self.now = t
            fn(arg)
        self.now = until

    # -- network -------------------------------------------------------------------

    def rtt(self, a: int, b: int) -> float:
        """The pair's round-trip time: uniform in [rtt_min_s, rtt_max_s], fixed per pair."""
        lo, hi = (a, b) if a < b else (b, a)
        u = _mix((lo * 0x9E3779B97F4A7C15 + hi + self._salt) & MASK) / MASK
        return self.config.rtt_min_s + (self.config.rtt_max_s - self.config.rtt_min_s) * u

    def _query_cost(self, a: int, b: int) -> float:
        rtt = self.rtt(a, b)
        return rtt if b in self.nodes[a].links else rtt * (1 + DIAL_RTTS)

    def send(self, a: int, b: int, kind: str, payload: int) -> None:
        self.traffic.count(self.now, a, b, kind, wire(payload))

    def dial(self, a: int, b: int, answered: bool) -> None:
        """A new connection's set-up bytes (both sides when the other answers)."""
        t = self.traffic
        t.count(self.now, a, b, "dial", DIAL_BYTES, DIAL_MESSAGES)
        if answered:
            t.count(self.now, b, a, "dial", DIAL_BYTES, DIAL_MESSAGES)

    # -- nodes ---------------------------------------------------------------------

    def new_pid(self) -> str:
        while True:
            # Not base58 (the "-"): the link policy's dht_key hashes it as text, the
            # way kademlia.key_of does, so both see the same buckets.
            pid = f"sim-{self.rng.getrandbits(48):012x}"
            if pid not in self.index:
                return pid

    def add_node(self, models: tuple[str, ...]) -> SimNode:
        pid = self.new_pid()
        idx = len(self.nodes)
        node = SimNode(
            idx, pid, kad.key_of(pid), models, self.now, self.config, self.rng, self.clock
        )
        self.nodes.append(node)
        self.keys.append(node.key)
        self.index[pid] = idx
        self._live_at[idx] = len(self.live)
        self.live.append(idx)
        for m in models:
            self.serving[m] += 1
        self.traffic.live(self.now, len(self.live))
        return node

    def remove_node(self, node: SimNode) -> None:
        node.alive = False
        spot = self._live_at.pop(node.idx)
        last = self.live.pop()
        if last != node.idx:
            self.live[spot] = last
            self._live_at[last] = spot
        for m in node.models:
            self.serving[m] -= 1
        self.traffic.live(self.now, len(self.live))

    def hint(self, node: SimNode, peers_: list[int]) -> None:
        hints = node.hints
        for p in peers_:
            if p != node.idx and p not in node.links:
                hints.append(p)
        if len(hints) > HINTS:
            del hints[: len(hints) - HINTS]

    # -- links ---------------------------------------------------------------------

    def view(self, node: SimNode, asker: int | None = None) -> LinkView:
        """What ``node``'s link policy sees; ``asker``: a peer asking for a link (its
        record came with the ask, so the models it serves are known)."""
        nodes, own, now = self.nodes, node.key, self.now
        links = {
            nodes[j].pid: _info(link, kad.bucket_of(own, nodes[j].key), nodes[j].models)
            for j, link in node.links.items()
        }
        buckets = {
            i: [nodes[c].pid for c in b[-CANDIDATES_PER_BUCKET:]]
            for i, b in node.rt.buckets.items()
            if b
        }
        # Unlinked peers whose models this node knows: records in its table, and
        # providers its DHT lookups found (cached).
        known: dict[str, tuple[str, ...]] = {}
        index = self.index
        for pid in node.table.peers:
            j = index[pid]
            if j not in node.links:
                known[pid] = nodes[j].models
        for model, (when, providers) in node.cache.items():
            # Only models in use: the policy links known providers for nothing else.
            if now - when <= CACHE_S and now - node.demand.get(model, -1e9) <= IN_USE_S:
                for j in providers[:KNOWN_PER_MODEL]:
                    if j != node.idx and j not in node.links:
                        pid = nodes[j].pid
                        known[pid] = (*known.get(pid, ()), model)
        if asker is not None and asker not in node.links:
            known[nodes[asker].pid] = nodes[asker].models
        me = node.pid
        wants = frozenset(
            nodes[j].pid for j in node.links if nodes[j].why.get(me, "idle") not in NO_WANT
        )
        return LinkView(
            now=now,
            max_links=self.config.max_links,
            links=links,
            pending=frozenset(nodes[j].pid for j in node.linking),
            buckets=buckets,
            demand=node.demand,
            hints=[nodes[h].pid for h in node.hints[-HINTS_OFFERED:]],
            self_id=me,
            seed=node.seed,
            known=known,
            wants=wants,
        )

    def admit(self, node: SimNode, asker: int, *, needed: bool) -> Admit:
        """Whether ``node`` takes a link to ``asker`` (the policy is asked only when
        the budget is spent: below it every link is taken)."""
        if asker in node.links or len(node.links) + len(node.linking) < self.config.max_links:
            return Admit(True)
        return self.policy.admit(self.view(node, asker), self.nodes[asker].pid, needed, self.rng)

    def replan(self, node: SimNode) -> None:
        """The node's periodic link policy run."""
        if not node.alive:
            return
        node.table = apply(node.table, Tick(self.now))
        plan = self.policy.plan(self.view(node), self.rng)
        node.why = plan.why
        for pid in plan.unlink:
            self.unlink(node, self.index[pid])
        for pid in plan.link:
            self.link(node, self.index[pid])
        self.at(self.now + self.config.policy_s, self.replan, node)

    def link(
        self, a: SimNode, j: int, then: Callable[[SimNode, int, bool], None] | None = None
    ) -> None:
        """Dial ``j`` and swap full records; ``then(a, j, ok)`` when it is decided."""
        if j == a.idx or j in a.links or j in a.linking:
            return
        a.linking.add(j)
        b = self.nodes[j]
        if not b.alive:
            self.traffic.count(self.now, a.idx, j, "dial", 3 * (TCPIP_BYTES + 8), 3)  # SYNs
            self.at(self.now + LINK_TIMEOUT_S, self._link_failed, (a, j, then))
            return
        rtt = self.rtt(a.idx, j)
        self.at(self.now + rtt * (DIAL_RTTS + 1), self._link_open, (a, j, then))

    def _link_failed(self, arg: tuple[SimNode, int, Any]) -> None:
        a, j, then = arg
        a.linking.discard(j)
        if not a.alive:
            return
        a.table = apply(a.table, Unreachable(self.nodes[j].pid, "no connection", self.now))
        if then is not None:
            then(a, j, False)

    def _link_open(self, arg: tuple[SimNode, int, Any]) -> None:
        a, j, then = arg
        b = self.nodes[j]
        if not a.alive:
            a.linking.discard(j)
            return
        if not b.alive:
            self._link_failed(arg)
            return
        a.linking.discard(j)
        now, sizes, rtt = self.now, self.sizes, self.rtt(a.idx, j)
        self.dial(a.idx, j, answered=True)
        self.send(a.idx, j, "full", sizes.full(min(len(a.links), peers.PEER_SAMPLE)))
        admit = self.admit(b, a.idx, needed=False)
        if not admit.accept:
            # Full: it answers with its record but keeps no link. The record stays in
            # our table until silence drops it (a known peer, not beaten, not linked).
            self.send(j, a.idx, "full", sizes.full(min(len(b.links), peers.PEER_SAMPLE)))
            self.traffic.count(now, a.idx, j, "close", TCPIP_BYTES)
            self.traffic.refused += 1
            a.table = apply(a.table, _record(b, now))
            if then is not None:
                then(a, j, True)
            return
        if admit.evict is not None:
            self.unlink(b, self.index[admit.evict])
        self.send(j, a.idx, "full", sizes.full(min(len(b.links), peers.PEER_SAMPLE)))
        a.links[j] = Link(since=now, last_used=now if then is not None else -1e9, outbound=True)
        b.links[a.idx] = Link(since=now, last_used=-1e9, outbound=False)
        self.peak_links = max(self.peak_links, len(a.links), len(b.links))
        a.joined[j] = now
        b.joined[a.idx] = now
        b.table = apply(b.table, _record(a, now - rtt / 2))
        a.table = apply(a.table, _record(b, now))
        self._seen(a, b)
        self._seen(b, a)
        self.hint(a, self._sample(b))
        self.hint(b, self._sample(a))
        if then is not None:
            then(a, j, True)

    def unlink(self, a: SimNode, j: int) -> None:
        b = self.nodes[j]
        if a.links.pop(j, None) is None:
            return
        self.traffic.count(self.now, a.idx, j, "close", TCPIP_BYTES)
        a.table = apply(a.table, Unreachable(b.pid, "link closed", self.now))
        if b.links.pop(a.idx, None) is not None:
            b.table = apply(b.table, Unreachable(a.pid, "link closed", self.now))

    def _sample(self, node: SimNode) -> list[int]:
        linked = list(node.links)
        if len(linked) > peers.PEER_SAMPLE:
            linked = self.rng.sample(linked, peers.PEER_SAMPLE)
        return linked

    def _seen(self, node: SimNode, other: SimNode) -> None:
        """``other`` answered or queried ``node``: its routing table hears of it."""
        nodes, now = self.nodes, self.now

        def head_gone(c: int) -> bool:
            self.send(node.idx, c, "dht", self.sizes.ping)
            if nodes[c].alive:
                self.send(c, node.idx, "dht", self.sizes.ping)
                return False
            return True

        del now
        node.rt.seen(other.idx, other.key, head_gone)

    # -- heartbeats ----------------------------------------------------------------

    def check(self, a: SimNode) -> None:
        """Membership's heartbeat loop: one pass over the live peers."""
        if not a.alive:
            return
        now, interval = self.now, self.config.heartbeat_s
        for other, since in list(a.joined.items()):
            if now - since > peers.JOIN_WINDOW_S:
                del a.joined[other]
        a.table = apply(a.table, Tick(now))
        nodes, held = self.nodes, a.table.peers
        for j in a.links:  # the live peers that are linked (known ones are not beaten)
            pid = nodes[j].pid
            peer = held.get(pid)
            if peer is None or peer.status != Status.LINKED or j in a.beating:
                continue
            due = interval if a.pid < pid else interval * LAGGARD_FACTOR
            if j in a.joined:
                due = min(due, peers.JOIN_BEAT_S)
            if now - peer.last_seen >= due:
                self._beat(a, j)
        pause = interval * self.rng.uniform(0.4, 0.6)
        if a.joined:
            pause = min(pause, peers.JOIN_BEAT_S / 2)
        self.at(now + pause, self.check, a)

    def _load(self, node: SimNode) -> dict[str, Any]:
        return node.body["load"]  # type: ignore[no-any-return]

    def _beat(self, a: SimNode, j: int) -> None:
        b, sizes, now = self.nodes[j], self.sizes, self.now
        self.send(a.idx, j, "heartbeat", sizes.heartbeat)
        if not (b.alive and a.idx in b.links):
            a.beating.add(j)
            self.at(now + EXCHANGE_TIMEOUT_S, self._beat_failed, (a, j))
            return
        rtt = self.rtt(a.idx, j)
        there, back = now + rtt / 2, now + rtt
        b.table = apply(b.table, Heard(a.pid, there, self._load(a), there + RECORD_TTL_S))
        self.send(j, a.idx, "heartbeat", sizes.heartbeat)
        a.table = apply(a.table, Heard(b.pid, back, self._load(b), back + RECORD_TTL_S))
        self._pull(a, b, back)
        self._pull(b, a, there)

    def _pull(self, a: SimNode, b: SimNode, at: float) -> None:
        """``a`` got a heartbeat of ``b``: pull its sample when ``b`` links more."""
        if not self.config.sample_pulls or len(b.links) <= len(a.links):
            return
        if self.now - a.sampled.get(b.idx, -1e9) < peers.SAMPLE_EVERY_S:
            return
        a.sampled[b.idx] = self.now
        self.send(a.idx, b.idx, "sample", self.sizes.heartbeat)
        self.send(b.idx, a.idx, "sample", self.sizes.full(min(len(b.links), peers.PEER_SAMPLE)))
        a.table = apply(a.table, _record(b, at))
        self.hint(a, self._sample(b))

    def _beat_failed(self, arg: tuple[SimNode, int]) -> None:
        a, j = arg
        a.beating.discard(j)
        if not a.alive:
            return
        a.table = apply(a.table, Unreachable(self.nodes[j].pid, "no answer", self.now))
        if a.links.pop(j, None) is not None:
            self.traffic.count(self.now, a.idx, j, "close", TCPIP_BYTES)

    # -- the DHT ---------------------------------------------------------------------

    def dht_lookup(
        self, node: SimNode, target: int, *, providers: bool = False, start: tuple[int, ...] = ()
    ) -> kad.Lookup:
        """One lookup by ``node``: its traffic counted and routing tables told now."""
        found = kad.lookup(self.net, node.idx, target, providers=providers, start=start)
        sizes, nodes = self.sizes, self.nodes
        for n in found.answered:
            if n not in node.links:
                self.dial(node.idx, n, answered=True)
            self.traffic.count(self.now, node.idx, n, "dht", STREAM_OPEN_BYTES)
            self.send(node.idx, n, "dht", sizes.find_request)
            held = len(nodes[n].store.get(target, ())) if providers else 0
            self.send(n, node.idx, "dht", sizes.closer_answer + held * sizes.provider_entry)
            self._seen(node, nodes[n])
            self._seen(nodes[n], node)
        for n in found.gone:
            self.traffic.count(self.now, node.idx, n, "dht", 3 * (TCPIP_BYTES + 8), 3)
            node.rt.remove(n, self.keys[n])
        return found

    def announce(self, node: SimNode) -> None:
        """ADD_PROVIDER for each model and the roster key, to the 20 closest found."""
        if not node.alive:
            return
        for key in (*(self.model_keys[m] for m in node.models), self.roster_key):
            found = self.dht_lookup(node, key)
            for n in found.closest:
                self.traffic.count(self.now, node.idx, n, "dht", STREAM_OPEN_BYTES)
                self.send(node.idx, n, "dht", self.sizes.add_provider)
                self.nodes[n].store.setdefault(key, {})[node.idx] = None
        self.at(self.now + DHT.reprovide_s, self.announce, node)

    def refresh(self, node: SimNode) -> None:
        if not node.alive:
            return
        self.dht_lookup(node, node.key)
        self.at(self.now + DHT.refresh_s, self.refresh, node)

    def roster_lookup(self, node: SimNode) -> None:
        """``bootstrap.roster.run_roster``: ask the 3 closest; back off while nothing is new."""
        if not node.alive:
            return
        key, sizes, nodes = self.roster_key, self.sizes, self.nodes
        found: set[int] = set()
        for n in node.rt.closest(key, self.keys, roster.ASK):
            if n not in node.links:
                self.dial(node.idx, n, answered=nodes[n].alive)
            self.send(node.idx, n, "roster", sizes.find_request)
            if not nodes[n].alive:
                node.rt.remove(n, self.keys[n])
                continue
            held = nodes[n].store.get(key, {})
            self.send(n, node.idx, "roster", sizes.closer_answer + len(held) * sizes.provider_entry)
            found.update(held)
        known = {self.index[p] for p in node.table.peers}
        news = found - known - node.roster_seen - {node.idx}
        node.roster_seen |= news
        if not node.roster_settled:  # a settled node's first lookup: it had seen these
            node.roster_settled, news = True, set()
        self.hint(node, sorted(news))
        pause = node.roster_pause
        pause = min(pause, roster.EVERY_S) if news else min(pause * 4, roster.MAX_S)
        node.roster_pause = pause
        self.at(self.now + pause * self.rng.uniform(0.8, 1.2), self.roster_lookup, node)


def _info(link: Link, bucket: int, serves: tuple[str, ...]) -> Any:
    from .links import LinkInfo

    return LinkInfo(link.since, link.last_used, link.outbound, bucket, serves)


def _record(node: SimNode, at: float) -> RecordVerified:
    return RecordVerified(node.pid, node.next_seq(), node.body, at, at + RECORD_TTL_S)
