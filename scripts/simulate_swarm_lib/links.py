"""Which peers a simulated node links: one small interface in front of the link policy.

The simulator asks a ``LinkPolicy`` two things, with a ``LinkView`` of one node:
``plan`` (which peers to link now and which links to close) and ``admit`` (a peer
wants a link: take it, making room by closing one, or refuse). Everything else
(when to ask, what a link costs, the tables the records go into) is the
simulator's. ``policy_for`` is the one place that picks the implementation.

``Real`` is the project's pure link policy (``node.membership.link_policy``'s
``plan_links``), used whenever that module imports; ``admit`` is built on it (the
asker counted as a linked peer that wants the link, or, for this node's own job,
as a provider in use: taken if the plan keeps it, making room with the first
link the plan lets go). ``StandIn`` is the simulator's own stand-in, used only
while that module does not exist; ``policy_for`` switches by itself and the
report names the one that ran. The stand-in follows the issue's rules in their
plainest form:

- budget: at most ``max_links`` links, inbound and outbound together; outbound
  links planned ahead stop ``headroom`` short of it, so a node can always take
  a provider on demand or a peer that needs it;
- providers in use: per model asked for in the last ``demand_s``, the two most
  recently used linked providers are kept;
- the DHT's health: one link per routing-table bucket (the oldest linked peer
  in it is kept; a bucket without one gets its first contact linked);
- connectivity: ``random_links`` more, from the contacts and hints at random;
- ageing: an outbound link nothing above needs, unused for ``idle_s``, closes;
  an inbound one stays (its opener needs it) until room is needed.
"""

from __future__ import annotations

import importlib
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

REAL_MODULE = "node.membership.link_policy"
CANDIDATES_PER_BUCKET = 3  # routing-table contacts offered per bucket (the freshest)


@dataclass(frozen=True, slots=True)
class LinkInfo:
    since: float
    last_used: float  # a job went to it (its opening counts)
    outbound: bool  # this node opened it
    bucket: int  # the peer's bucket in this node's routing table
    serves: tuple[str, ...]  # models its record lists


@dataclass(frozen=True, slots=True)
class LinkView:
    """One node as the policy sees it (peers by id)."""

    now: float
    max_links: int
    links: Mapping[str, LinkInfo]
    pending: frozenset[str]  # link attempts in flight
    buckets: Mapping[int, Sequence[str]]  # routing-table contacts, least recently seen first
    demand: Mapping[str, float]  # model -> when a job last asked for it
    hints: Sequence[str] = ()  # peers heard of (samples, roster), not linked
    self_id: str = ""
    seed: int = 0  # the node's own, fixed for its life (its random links stay put)
    known: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # unlinked peer -> models
    wants: frozenset[str] = frozenset()  # linked peers whose own plan needs this link


@dataclass(frozen=True, slots=True)
class LinkPlan:
    link: tuple[str, ...] = ()
    unlink: tuple[str, ...] = ()
    why: Mapping[str, str] = field(default_factory=dict)  # peer kept or linked -> rule


@dataclass(frozen=True, slots=True)
class Admit:
    accept: bool
    evict: str | None = None  # close this link first


class LinkPolicy(Protocol):
    def plan(self, view: LinkView, rng: random.Random) -> LinkPlan: ...

    def admit(self, view: LinkView, peer: str, needed: bool, rng: random.Random) -> Admit:
        """``needed``: this node itself wants the link (a provider for its jobs)."""
        ...


@dataclass(frozen=True, slots=True)
class StandIn:
    """The simulator's stand-in policy (see the module docstring)."""

    max_links: int = 32
    headroom: int = 6
    demand_s: float = 120.0
    idle_s: float = 60.0
    random_links: int = 2
    providers_per_model: int = 2
    kept: frozenset[str] = field(default_factory=frozenset)  # never closed (bootstrap)

    def needed(self, view: LinkView) -> dict[str, int]:
        """Links this node needs, each with a rank (lower: needed more)."""
        need: dict[str, int] = {}
        for model, when in view.demand.items():
            if view.now - when > self.demand_s:
                continue
            serving = [p for p, i in view.links.items() if model in i.serves]
            serving.sort(key=lambda p: (-view.links[p].last_used, p))
            for p in serving[: self.providers_per_model]:
                need[p] = 0
        by_bucket: dict[int, str] = {}
        for p, info in sorted(view.links.items(), key=lambda kv: (kv[1].since, kv[0])):
            by_bucket.setdefault(info.bucket, p)
        for p in by_bucket.values():
            need.setdefault(p, 1)
        spare = sorted(
            (p for p in view.links if p not in need), key=lambda p: (view.links[p].since, p)
        )
        for p in spare[: self.random_links]:
            need.setdefault(p, 2)
        return need

    def plan(self, view: LinkView, rng: random.Random) -> LinkPlan:
        need = self.needed(view)
        unlink = tuple(
            sorted(
                p
                for p, info in view.links.items()
                if info.outbound
                and p not in need
                and p not in self.kept
                and view.now - info.last_used > self.idle_s
            )
        )
        room = self.max_links - self.headroom - len(view.links) - len(view.pending) + len(unlink)
        linked = set(view.links) | view.pending
        covered = {view.links[p].bucket for p in view.links}
        want: list[str] = []
        for index in sorted(view.buckets):
            if index in covered:
                continue
            fresh = [c for c in view.buckets[index] if c not in linked]
            if fresh:
                want.append(fresh[0])
        spare = len([p for p in need.values() if p == 2])
        if spare < self.random_links:
            pool = sorted({*view.hints, *(c for b in view.buckets.values() for c in b)} - linked)
            want += rng.sample(pool, min(len(pool), self.random_links - spare))
        return LinkPlan(link=tuple(want[: max(0, room)]), unlink=unlink)

    def admit(self, view: LinkView, peer: str, needed: bool, rng: random.Random) -> Admit:
        if peer in view.links:
            return Admit(True)
        if len(view.links) + len(view.pending) < self.max_links:
            return Admit(True)
        need = self.needed(view)
        if needed:  # our own job needs it: anything but another provider in use may go
            spare = [p for p in view.links if p not in self.kept and need.get(p, 3) >= 1]
        else:  # another's need: only a link of ours that nothing needs makes room
            spare = [
                p
                for p, info in view.links.items()
                if info.outbound and p not in need and p not in self.kept
            ]
        if not spare:
            return Admit(False)
        spare.sort(key=lambda p: (-need.get(p, 3), view.links[p].last_used, p))
        return Admit(True, evict=spare[0])


class Real:
    """``node.membership.link_policy.plan_links`` behind the simulator's interface."""

    name = REAL_MODULE

    def __init__(self, module: Any, max_links: int) -> None:
        self._plan_links = module.plan_links
        self._inputs = module.LinkInputs
        self._facts = module.PeerFacts
        self.policy = module.LinkPolicy(max_links=max_links)

    def _run(self, view: LinkView, extra: Any = None) -> Any:
        facts: dict[str, Any] = {}
        fact, known = self._facts, view.known
        for peer in view.hints:
            facts[peer] = fact(peer, models=known.get(peer, ()))
        for members in view.buckets.values():
            for peer in members:
                facts[peer] = fact(peer, models=known.get(peer, ()))
        for peer, models in known.items():
            facts[peer] = fact(peer, models=models)
        for peer in view.pending:  # a dial in flight counts against the budget
            facts[peer] = fact(peer, linked=True, models=known.get(peer, ()), linked_at=view.now)
        for peer, info in view.links.items():
            used = info.last_used if info.last_used > -1e8 else None
            facts[peer] = fact(
                peer,
                linked=True,
                models=info.serves,
                last_used=used,
                linked_at=info.since,
                wants=peer in view.wants,
            )
        if extra is not None:
            facts[extra.peer_id] = extra
        inputs = self._inputs(
            self_id=view.self_id,
            now=view.now,
            peers=tuple(facts.values()),
            demand=view.demand,
            seed=view.seed,
        )
        return self._plan_links(inputs, self.policy)

    def plan(self, view: LinkView, rng: random.Random) -> LinkPlan:
        got = self._run(view)
        drop = tuple(p for p in got.drop if p in view.links)  # not the dials in flight
        link = tuple(p for p in got.link if p not in view.pending)
        return LinkPlan(link=link, unlink=drop, why=got.why)

    def admit(self, view: LinkView, peer: str, needed: bool, rng: random.Random) -> Admit:
        if peer in view.links or len(view.links) + len(view.pending) < self.policy.max_links:
            return Admit(True)
        models = view.known.get(peer, ())
        asker = self._facts(
            peer,
            linked=True,
            models=models,
            last_used=view.now if needed else None,
            linked_at=view.now,
            wants=not needed,
        )
        got = self._run(view, asker)
        if peer not in got.keep:
            return Admit(False)
        evict = next((p for p in got.drop if p in view.links), None)
        return Admit(False) if evict is None else Admit(True, evict=evict)


def policy_for(max_links: int, kept: frozenset[str] = frozenset()) -> LinkPolicy:
    """The link policy the simulation runs: the project's when it imports, else the
    stand-in (the one place to switch it; ``policy_name`` says which ran)."""
    try:
        module = importlib.import_module(REAL_MODULE)
    except ModuleNotFoundError as exc:
        if exc.name != REAL_MODULE:
            raise  # the module exists and something it imports does not: a real failure
        return StandIn(max_links=max_links, kept=kept)
    return Real(module, max_links)


def policy_name(policy: LinkPolicy) -> str:
    if isinstance(policy, Real):
        return f"{REAL_MODULE} (the project's)"
    return "StandIn (the simulator's stand-in: node.membership.link_policy is absent)"
