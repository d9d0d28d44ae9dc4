"""Jobs: each routed by the node's real ``Router.plan`` over the node's real table.

A job follows ``node.jobs.dispatch.Dispatcher.forward``: plan, try the first
candidate, on a failure tell the breakers and the table (``Unreachable``) and
plan again without the ones tried, up to ``max_attempts``. A candidate that is
this node runs it (always live); a linked peer that is gone fails the attempt
after ``outbound.OPEN_TIMEOUT_S`` twice (that time is added to the job's, the
next attempt is planned on the same table otherwise).

When no candidate is left and attempts remain, the issue's design applies
(the first job may pay a lookup; later ones do not): providers the node learnt
from the DHT before (cached for ``CACHE_S``) are linked on demand, two at once,
the others kept for a second try; with none cached, a DHT provider lookup finds
some (its round trips are the job's). Jobs for a model that another job of the
node is already finding a provider for wait for that search. The router gives
no load difference between providers (they report idle load: the simulation is
about membership, not capacity).
"""

from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass, field

from bootstrap.table import Status, Tick, Unreachable, apply
from node.jobs import outbound
from node.jobs.router import RouteRequest

from .model import Job, SimNode
from .world import CACHE_S, World

PARALLEL_LINKS = 2
FAILED_CALL_S = 2 * outbound.OPEN_TIMEOUT_S


@dataclass(slots=True)
class Outcomes:
    """What the jobs did, for the report."""

    submitted: dict[str, int] = field(default_factory=lambda: {"rest": 0, "churn": 0})
    live: dict[str, int] = field(default_factory=lambda: {"rest": 0, "churn": 0})
    unservable: dict[str, int] = field(default_factory=lambda: {"rest": 0, "churn": 0})
    lookups: dict[str, list[int]] = field(default_factory=lambda: {"rest": [], "churn": []})
    # A new node's first job: (seconds to routed, DHT round trips, found a live provider).
    first: list[tuple[float, int, bool]] = field(default_factory=list)
    why: dict[str, int] = field(default_factory=dict)  # counters, for diagnosis
    # Jobs that found no live provider, by phase and why (servable ones only).
    failed: dict[str, dict[str, int]] = field(default_factory=lambda: {"rest": {}, "churn": {}})


class Jobs:
    def __init__(self, world: World) -> None:
        self.world = world
        config = world.config
        weights = [r**-config.zipf_s for r in range(1, config.models + 1)]
        self._cumulative = list(itertools.accumulate(weights))
        self.outcomes = Outcomes()
        world.jobs = self

    def draw(self, exclude: tuple[str, ...] = ()) -> str:
        names, cum, rng = self.world.model_names, self._cumulative, self.world.rng
        while True:
            model = names[bisect.bisect(cum, rng.random() * cum[-1])]
            if model not in exclude:
                return model

    def arrivals(self, node: SimNode) -> None:
        """The node's Poisson stream of jobs."""
        if not node.alive:
            return
        self.submit(node, self.draw())
        self.world.at(
            self.world.now + self.world.rng.expovariate(self.world.config.job_rate),
            self.arrivals,
            node,
        )

    def first(self, node: SimNode) -> None:
        if node.alive:
            self.submit(node, self.draw(exclude=node.models), first=True)

    def submit(self, node: SimNode, model: str, first: bool = False) -> None:
        world = self.world
        job = Job(node, model, world.now, first=first, servable=world.serving[model] > 0)
        node.demand[model] = world.now
        node.table = apply(node.table, Tick(world.now))
        self._route(job)

    # -- routing -----------------------------------------------------------------

    def _route(self, job: Job) -> None:
        world, node = self.world, job.node
        local = node.local if job.model in node.models else None
        router, max_attempts = node.router, node.router.config.max_attempts
        while job.attempts < max_attempts:
            request = RouteRequest(model=job.model, exclude=frozenset(job.tried))
            plan = router.plan(node.table, local, request, {})
            if not plan:
                break
            choice = plan[0]
            job.tried.add(choice.peer_id)
            if not choice.local and router.breakers.admit(choice.peer_id) is not None:
                continue
            job.attempts += 1
            if choice.local:
                self._done(job, True)
                return
            j = world.index[choice.peer_id]
            peer = world.nodes[j]
            link = node.links.get(j)
            if peer.alive:
                router.breakers.success(choice.peer_id)
                if link is not None:
                    link.last_used = world.now
                else:  # a known peer, not linked: the job's stream needs a connection
                    world.dial(node.idx, j, answered=True)
                self._done(job, True)
                return
            router.breakers.failure(choice.peer_id)
            node.table = apply(node.table, Unreachable(choice.peer_id, "call failed", world.now))
            job.wasted_s += FAILED_CALL_S
            if link is not None:
                world.unlink(node, j)
        if job.attempts >= max_attempts:
            self._done(job, False, "attempts")
        else:
            self._find(job)

    def _note(self, what: str) -> None:
        if self.world.config.phase(self.world.now) != "warmup":
            self.outcomes.why[what] = self.outcomes.why.get(what, 0) + 1

    def _done(self, job: Job, live: bool, why: str = "") -> None:
        world, out = self.world, self.outcomes
        if not live:
            self._note(f"failed: {why}")
        phase = world.config.phase(job.submitted)
        if job.first and phase == "churn":
            seconds = world.now - job.submitted + job.wasted_s
            out.first.append((seconds, job.rounds, live))
        if phase == "warmup":
            return
        out.submitted[phase] += 1
        if not job.servable:
            out.unservable[phase] += 1
        elif live:
            out.live[phase] += 1
        else:
            out.failed[phase][why] = out.failed[phase].get(why, 0) + 1

    # -- finding a provider ----------------------------------------------------------

    def _find(self, job: Job) -> None:
        world, node, model = self.world, job.node, job.model
        waiting = node.waiting.get(model)
        if waiting is not None:
            waiting.append(job)
            return
        node.waiting[model] = [job]
        cached = node.cache.get(model)
        if cached is not None and world.now - cached[0] <= CACHE_S:
            todo = [p for p in cached[1] if p != node.idx and p not in job.asked]
            if todo:
                node.seeking[model] = (todo, set())
                self._try_links(node, model)
                return
        self._lookup(node, model)

    def _lookup(self, node: SimNode, model: str) -> None:
        world = self.world
        for job in node.waiting.get(model, ()):
            job.searched = True
        found = world.dht_lookup(node, world.model_keys[model], providers=True)
        self._note("lookup" if found.providers else "lookup found none")
        phase = world.config.phase(world.now)
        if phase != "warmup":
            self.outcomes.lookups[phase].append(found.rounds)
        world.at(
            world.now + found.seconds, self._found, (node, model, found.rounds, found.providers)
        )

    def _found(self, arg: tuple[SimNode, str, int, list[int]]) -> None:
        node, model, rounds, providers = arg
        if not node.alive:
            return
        world = self.world
        jobs = node.waiting.get(model, [])
        for job in jobs:
            job.rounds += rounds
        world.rng.shuffle(providers)
        node.cache[model] = (world.now, providers)
        asked = set().union(*(job.asked for job in jobs)) if jobs else set()
        node.seeking[model] = ([p for p in providers if p != node.idx and p not in asked], set())
        self._try_links(node, model)

    def _try_links(self, node: SimNode, model: str) -> None:
        """Link the next providers on the list, two at once; give up when none is left."""
        world = self.world
        todo, trying = node.seeking[model]
        jobs = node.waiting.get(model, [])
        while todo and len(trying) < PARALLEL_LINKS:
            j = todo.pop(0)
            for job in jobs:
                job.asked.add(j)
            peer = node.table.peers.get(world.nodes[j].pid)
            if peer is not None and peer.status == Status.LINKED:  # linked or known already
                self._serve(node, model)
                return
            if j in node.links:
                continue
            if j in node.linking:
                continue
            if not self._room(node, j):
                self._note("no room")
                continue
            trying.add(j)
            world.link(node, j, lambda a, j, ok: self._linked(a, j, ok, model))
        if not trying:
            self._exhausted(node, model)

    def _room(self, node: SimNode, j: int) -> bool:
        world = self.world
        admit = world.admit(node, j, needed=True)
        if admit.evict is not None:
            world.unlink(node, world.index[admit.evict])
        return admit.accept

    def _linked(self, node: SimNode, j: int, ok: bool, model: str) -> None:
        seeking = node.seeking.get(model)
        if not node.alive or seeking is None or j not in seeking[1]:
            return  # that search is over (another link served it)
        seeking[1].discard(j)
        if ok:
            self._serve(node, model)
            return
        self._note("provider link failed")
        if not seeking[1]:
            self._try_links(node, model)

    def _serve(self, node: SimNode, model: str) -> None:
        jobs = node.waiting.pop(model, [])
        node.seeking.pop(model, None)
        for job in jobs:
            self._route(job)

    def _exhausted(self, node: SimNode, model: str) -> None:
        """No provider on the list answered: ask the DHT once, else the jobs fail."""
        jobs = node.waiting.get(model, [])
        if jobs and not all(job.searched for job in jobs):
            self._lookup(node, model)
            return
        node.waiting.pop(model, None)
        node.seeking.pop(model, None)
        for job in jobs:
            self._done(job, False, "no provider linked")
