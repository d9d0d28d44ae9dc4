"""The simulation's parameters and its simulated nodes (state only, no behaviour).

Every constant that models the real node is imported from where the node keeps
it (membership's heartbeat interval and dead-after, the caps record TTL, the
roster's schedule, the DHT's reprovide interval), so the simulation follows the
code when the code changes.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from bootstrap.table import PeerTable, TableConfig
from capabilities.record import Load
from node.jobs.router import LocalNode, Router, RouterConfig
from node.membership.config import MembershipConfig
from runners.fake import FakeRunner

from .kademlia import RoutingTable

MEMBERSHIP = MembershipConfig()


@dataclass(frozen=True, slots=True)
class SimConfig:
    nodes: int
    seed: int = 1
    # Phases (virtual seconds): links settle, then traffic at rest, then churn.
    warmup_s: float = 60.0
    rest_s: float = 60.0
    churn_s: float = 300.0
    churn_per_min: float = 0.05  # joins a minute, and as many leaves, per node
    # Models and jobs.
    models: int = 50
    zipf_s: float = 1.0  # demand: model of rank r asked for with weight r ** -zipf_s
    supply_s: float = 0.5  # supply: a node serves rank r with weight r ** -supply_s
    models_per_node: int = 2
    min_providers: int = 2  # each model has at least this many providers at start
    job_rate: float = 0.1  # jobs a second per node
    first_job_s: float = 2.0  # a new node's first job, this long after it starts
    # Links and network.
    max_links: int = 32
    policy_s: float = 20.0  # how often a node reruns its link policy
    rtt_min_s: float = 0.020
    rtt_max_s: float = 0.150
    bootstraps: int = 2
    sample_pulls: bool = True  # pull a peer's sample when it links more than we do
    # Exactly the node's, unless a test shortens them.
    heartbeat_s: float = MEMBERSHIP.heartbeat_s
    dead_after_s: float = MEMBERSHIP.dead_after_s

    @property
    def end_s(self) -> float:
        return self.warmup_s + self.rest_s + self.churn_s

    def phase(self, t: float) -> str:
        if t < self.warmup_s:
            return "warmup"
        return "rest" if t < self.warmup_s + self.rest_s else "churn"


@dataclass(slots=True)
class Link:
    since: float
    last_used: float
    outbound: bool


@dataclass(slots=True)
class Job:
    node: SimNode
    model: str
    submitted: float
    first: bool = False
    servable: bool = True  # some live node served the model when it was submitted
    attempts: int = 0
    wasted_s: float = 0.0  # time spent on attempts that failed
    rounds: int = 0  # DHT round trips it waited for
    tried: set[str] = field(default_factory=set)  # planned and attempted (router ids)
    asked: set[int] = field(default_factory=set)  # providers a link was tried to
    searched: bool = False  # a DHT lookup was made for it


class SimNode:
    """One simulated node: the real table and router, and what its I/O would hold."""

    __slots__ = (
        "alive",
        "beating",
        "body",
        "born",
        "cache",
        "demand",
        "hints",
        "idx",
        "joined",
        "key",
        "linking",
        "links",
        "local",
        "models",
        "pid",
        "roster_pause",
        "roster_seen",
        "roster_settled",
        "router",
        "rt",
        "sampled",
        "seed",
        "seeking",
        "seq",
        "store",
        "table",
        "waiting",
        "why",
    )

    def __init__(
        self,
        idx: int,
        pid: str,
        key: int,
        models: tuple[str, ...],
        born: float,
        config: SimConfig,
        rng: random.Random,
        clock: Any,
    ) -> None:
        self.idx = idx
        self.pid = pid
        self.key = key
        self.models = models
        self.born = born
        self.alive = True
        infos = [FakeRunner(m).info for m in models]
        self.local = LocalNode(models=infos)
        # What peers hold of it: the shape node.status.describe gives (load travels
        # in heartbeats; the rest does not change in the simulation).
        self.body: dict[str, Any] = {
            "schema": 1,
            "addrs": [],
            "models": [i.describe() for i in infos],
            "load": Load().describe(),
            "reach": "public",
            "version": 1,
        }
        self.table = PeerTable(TableConfig(dead_after_s=config.dead_after_s))
        self.router = Router(
            pid, RouterConfig(), rng=random.Random(rng.getrandbits(64)), clock=clock
        )
        self.rt = RoutingTable(key)
        self.links: dict[int, Link] = {}
        self.linking: set[int] = set()
        self.beating: set[int] = set()
        self.joined: dict[int, float] = {}  # peer -> when it was linked (join beats)
        self.sampled: dict[int, float] = {}  # peer -> when its sample was last pulled
        self.hints: list[int] = []  # recent peers heard of, newest last (at most 64)
        self.cache: dict[str, tuple[float, list[int]]] = {}  # model -> (when, providers)
        self.demand: dict[str, float] = {}  # model -> last job for it
        self.waiting: dict[str, list[Job]] = {}  # model -> jobs waiting for a provider
        # model -> (providers still to try, link attempts in flight)
        self.seeking: dict[str, tuple[list[int], set[int]]] = {}
        self.store: dict[int, dict[int, None]] = {}  # DHT key -> provider records held
        self.seq = 0
        self.seed = rng.getrandbits(32)  # its link policy's seed, for its life
        self.why: Mapping[str, str] = {}  # its last link plan: peer -> the rule that kept it
        self.roster_pause = 0.0
        self.roster_seen: set[int] = set()
        self.roster_settled = False

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq
