"""One simulated swarm of one size, from a settled start through rest and churn.

The start is a swarm that has run for a while: every node's routing table holds,
per bucket, up to 20 random live nodes of that bucket's range (what refreshes
give a long-running Kademlia node), and the 20 nodes closest to each model's key
(and the roster key) hold the provider records of every node serving it. Links
do not exist yet: each node's link policy makes them in the first seconds, and
the warm-up lets them settle before anything is counted. Nodes that join later
start bare: a bootstrap node, their own lookups, and whoever queries them.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import statistics
from dataclasses import dataclass, field
from typing import Any

from bootstrap import roster
from bootstrap.dht import DhtConfig

from . import kademlia as kad
from .jobs import Jobs
from .links import policy_name
from .model import SimConfig, SimNode
from .sizes import Sizes
from .world import DIAL_RTTS, World

DHT = DhtConfig()
SAMPLE_EVERY_S = 10.0


@dataclass(slots=True)
class Samples:
    links: dict[str, list[int]] = field(default_factory=lambda: {"rest": [], "churn": []})
    joins: int = 0
    leaves: int = 0


class Swarm:
    def __init__(self, config: SimConfig, sizes: Sizes) -> None:
        self.config = config
        self.world = World(config, sizes)
        self.jobs = Jobs(self.world)
        self.samples = Samples()
        self.policy_name = policy_name(self.world.policy)
        weights = [r**-config.supply_s for r in range(1, config.models + 1)]
        self._supply = list(itertools.accumulate(weights))

    # -- the start -------------------------------------------------------------------

    def _supply_draw(self, have: list[str]) -> str:
        names, cum, rng = self.world.model_names, self._supply, self.world.rng
        while True:
            model = names[bisect.bisect(cum, rng.random() * cum[-1])]
            if model not in have:
                return model

    def _models(self, first: str | None) -> tuple[str, ...]:
        have: list[str] = [] if first is None else [first]
        while len(have) < self.config.models_per_node:
            have.append(self._supply_draw(have))
        return tuple(have)

    def build(self) -> None:
        config, world = self.config, self.world
        rng = world.rng
        spread = [m for m in world.model_names for _ in range(config.min_providers)]
        for i in range(config.nodes):
            world.add_node(self._models(spread[i] if i < len(spread) else None))
        world.bootstraps = list(range(min(config.bootstraps, config.nodes)))
        self._settle_tables()
        for key in (*world.model_keys.values(), world.roster_key):
            holders = heapq.nsmallest(kad.K, world.live, key=lambda n: world.keys[n] ^ key)
            if key == world.roster_key:
                providers = list(world.live)
            else:
                name = next(m for m, k in world.model_keys.items() if k == key)
                providers = [n for n in world.live if name in world.nodes[n].models]
            for h in holders:
                world.nodes[h].store[key] = dict.fromkeys(providers)
        for node in world.nodes:
            world.at(rng.uniform(0, config.heartbeat_s), world.check, node)
            world.at(rng.uniform(0, 2.0), world.replan, node)
            world.at(rng.expovariate(config.job_rate), self.jobs.arrivals, node)
            world.at(rng.uniform(0, DHT.reprovide_s), world.announce, node)
            world.at(rng.uniform(0, DHT.refresh_s), world.refresh, node)
            node.roster_pause = roster.MAX_S
            world.at(rng.uniform(0, roster.MAX_S), world.roster_lookup, node)
        start = config.warmup_s + config.rest_s
        rate = config.churn_per_min * config.nodes / 60.0
        if rate > 0:
            world.at(start + rng.expovariate(rate), self._join, rate)
            world.at(start + rng.expovariate(rate), self._leave, rate)
        t = config.warmup_s
        while t <= config.end_s:
            world.at(t, self._sample)
            t += SAMPLE_EVERY_S

    def _settle_tables(self) -> None:
        world = self.world
        order = sorted(world.live, key=world.keys.__getitem__)
        ranked = [world.keys[n] for n in order]
        for n in order:
            node = world.nodes[n]
            x = node.key
            for i in range(kad.BITS):
                shift = kad.BITS - 1 - i
                lo = ((x >> shift) ^ 1) << shift
                a = bisect.bisect_left(ranked, lo)
                b = bisect.bisect_left(ranked, lo + (1 << shift))
                members = order[a:b]
                if members:
                    pick = members if len(members) <= kad.K else world.rng.sample(members, kad.K)
                    node.rt.fill(i, pick)
                own = (x >> shift) << shift  # the nodes sharing i + 1 bits with x or more
                size = bisect.bisect_left(ranked, own + (1 << shift)) - bisect.bisect_left(
                    ranked, own
                )
                if size <= 1:
                    break  # only x itself: every later bucket is empty

    # -- churn -----------------------------------------------------------------------

    def _join(self, rate: float) -> None:
        world, config = self.world, self.config
        self.samples.joins += 1
        node = world.add_node(self._models(None))
        node.roster_pause = roster.FIRST_S
        node.roster_settled = True
        boot = world.nodes[world.rng.choice(world.bootstraps)]
        node.rt.seen(boot.idx, boot.key, lambda c: False)
        found = world.dht_lookup(node, node.key, start=(boot.idx,))
        took = world.rtt(node.idx, boot.idx) * DIAL_RTTS + found.seconds
        world.at(world.now + took, self._started, node)
        world.at(world.now + config.first_job_s, self.jobs.first, node)
        world.at(world.now, world.check, node)
        world.at(world.now + world.rng.expovariate(config.job_rate), self.jobs.arrivals, node)
        if world.now < config.end_s:
            world.at(world.now + world.rng.expovariate(rate), self._join, rate)

    def _started(self, node: SimNode) -> None:
        world = self.world
        if not node.alive:
            return
        world.replan(node)
        world.announce(node)
        world.at(world.now + DHT.refresh_s, world.refresh, node)
        when = world.now + roster.FIRST_S * world.rng.uniform(0.8, 1.2)
        world.at(when, world.roster_lookup, node)

    def _leave(self, rate: float) -> None:
        world = self.world
        boots = set(world.bootstraps)
        while True:
            n = world.live[world.rng.randrange(len(world.live))]
            if n not in boots:
                break
        self.samples.leaves += 1
        world.remove_node(world.nodes[n])
        if world.now < self.config.end_s:
            world.at(world.now + world.rng.expovariate(rate), self._leave, rate)

    def _sample(self, _: Any = None) -> None:
        world = self.world
        phase = self.config.phase(world.now - 1e-9)
        if phase == "warmup":
            return
        self.samples.links[phase].extend(len(world.nodes[n].links) for n in world.live)

    # -- running ---------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        self.build()
        self.world.run(self.config.end_s)
        self.world.traffic.close(self.config.end_s)
        return self.results()

    def results(self) -> dict[str, Any]:
        config, world, out = self.config, self.world, self.jobs.outcomes
        traffic = world.traffic
        phases: dict[str, Any] = {}
        for phase, seconds in (("rest", config.rest_s), ("churn", config.churn_s)):
            links = self.samples.links[phase] or [0]
            servable = out.submitted[phase] - out.unservable[phase]
            lookups = out.lookups[phase]
            phases[phase] = {
                "links_median": statistics.median(links),
                "links_max": max(links),
                "over_budget": sum(1 for n in links if n > config.max_links),
                **{k: round(v, 3) for k, v in traffic.rates(phase).items()},
                "busiest_node_bytes_s": round(traffic.busiest(phase, seconds), 1),
                "jobs": out.submitted[phase],
                "jobs_unservable": out.unservable[phase],
                "jobs_live_pct": round(100.0 * out.live[phase] / servable, 4) if servable else None,
                "jobs_failed_why": dict(sorted(out.failed[phase].items())),
                "provider_lookups": len(lookups),
                "lookup_rounds_median": _quantile(lookups, 0.5),
                "lookup_rounds_p99": _quantile(lookups, 0.99),
            }
        first = out.first
        times = [f[0] for f in first]
        rounds = [f[1] for f in first]
        return {
            "nodes": config.nodes,
            "seed": config.seed,
            "max_links": config.max_links,
            "phases_s": [config.warmup_s, config.rest_s, config.churn_s],
            "joins": self.samples.joins,
            "leaves": self.samples.leaves,
            "links_refused": traffic.refused,
            "links_peak": world.peak_links,
            "rest": phases["rest"],
            "churn": phases["churn"],
            "first_job": {
                "new_nodes": len(first),
                "seconds_median": _round(_quantile(times, 0.5)),
                "seconds_p99": _round(_quantile(times, 0.99)),
                "rounds_median": _quantile(rounds, 0.5),
                "rounds_p99": _quantile(rounds, 0.99),
                "rounds_max": max(rounds, default=None),
                "live_pct": round(100.0 * sum(f[2] for f in first) / len(first), 2)
                if first
                else None,
            },
        }


def _quantile(values: list[Any], q: float) -> Any:
    """The nearest-rank quantile (a value that occurred), None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(q * len(ordered) + 0.999999) - 1))]


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)
