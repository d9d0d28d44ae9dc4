"""Which node should run this request: a pure planner over the peer table.

The forwarding loop (I/O, failover, streaming) asks ``Router.plan`` for an
ordered list of candidates, the local node included, tries them in order and
reports each outcome to ``Router.breakers``. Everything here is a decision: no
I/O, no trio; time comes from an injected clock and every random choice from an
injected ``random.Random``, so tests replay plans exactly.

Candidates
    The local node (when given and it serves the model) and every *linked* peer
    (verified record, heard from lately) whose record lists the model (name
    compared case-insensitively) with the task and precision asked (case-
    insensitive, exact) and a device starting with the one asked (case-
    insensitive prefix: "cuda" matches "cuda:0", "GPU" matches "GPU.0"). Left
    out: ids in ``request.exclude`` (already tried), peers whose breaker is open
    or whose half-open probe is already out, and nodes whose record says that
    model's backend circuit is "open". A peer whose breaker is half-open is a
    *probe*: at most one per plan, placed after all others.
    Peers in ``request.held_back`` are left out too: this node found their answers
    wrong (``node.jobs.reputation``). The local node is never held back.

    Resuming a stream (``request.continues``: the input it continues, "messages",
    "prompt" or "text"), only nodes whose entry says the model continues that input
    qualify (``runners.continuation.continues``), and those whose entry has every
    field of ``request.alike`` (the dead producer's runner and numerics) as it has
    come first, whatever the strategy: greedy text resumed at the same numerics
    is the text the producer would have given.

    Intermediaries: when no node above qualifies and ``request.via`` allows it
    (the job was not forwarded to us already), linked peers whose record says
    they forward the model (``node.reach.records``: they link a provider others
    may not dial, in a swarm without relays) are candidates too, at the cost of
    ``w.forwarded`` for the extra hop.

Paths
    ``paths`` (peer id -> "direct", "hole-punched" or "relayed", from the
    connection a new stream would use; absent: direct) prices a relayed peer
    ``w.relayed`` higher than a direct one of the same load. A request larger
    than ``relay_max_bytes`` (its inputs' bytes, ``request.size_bytes``) tries
    every direct candidate before any relayed one or intermediary, whatever the
    strategy: a relay's byte limits are spent only when nothing else is left.

Score (lower is better): how long a job would take there, in typical job times

    queue = w.ours * ours                      # our calls to that peer now: exact and fresh
          + fade * max(0, reported - then)     # the others' work there, as last reported
    # then: our calls there when it reported (``ours_then``; absent: ours now)
    reported = w.queue_ahead  * ahead          # queued at the request's priority or above
             + w.queue_behind * behind         # queued below it (they hold slots)
             + w.in_flight    * running        # in_flight less the queued (a node counts
                                               # its queued jobs as in flight too)
    # fade = 0.5 ** (report age / load_half_life_s): an old report says less about now
    speed = service_ms / typical_ms            # 1 while unknown, or within 2x (SPEED_BAND)
    score = (queue + 1) * speed - 1            # with every node alike: the queue
          + w.hop          * (0 if local else 1)       # a network hop costs
          + w.half_open    * (record says the model's backend circuit is half-open)
          + w.relayed      * (the connection to it is relayed)
          + w.forwarded    * (an intermediary: its load, not the provider's)
          + w.unknown      * (its load is unknown, below)
          - w.accelerator  * (no device asked and the model runs off CPU)

    ``service_ms`` is a peer's time per job for this model: what our own calls'
    answers said it took (``service_ms`` given to ``plan``, an EWMA of their
    ``run_ms``; the dispatcher passes those an answer refreshed in the last
    10 s), else the EWMA its record reports; ``typical_ms`` is the median of
    the candidates' known ones. The local node's queue is its own load (exact).
    A report counts our calls of its time, so those are taken out of it, and ours
    now added: subtracting our calls *now* would leave a ghost of the call that
    just ended on the very peer that just freed up, and adding the report to ours
    counted ours twice (both herded jobs away from fresh reporters).

Unknown load
    A candidate whose row has no load (``load`` None: a provider known but not
    linked, no heartbeats) is neither idle nor left out: its others' work is the
    median of the known candidates' (``config.unknown_load`` when none is known),
    plus ``w.unknown``. Linked peers of known load win ties; an unlinked provider
    is used when it is the only one or the known ones are busy. Our own calls to
    it count as for any peer.

Strategies (exact ties broken by the rng)
    least-loaded (default): join the shortest queue, by the score above; the
        candidates within ``TIE`` of the best take turns (round-robin per model),
        the rest follow by score. Our own calls count at once, so jobs do not pile
        onto one peer between its reports.
    round-robin: candidates by id (the local node under its own id), rotated one
        step per plan for that model.
    best-performance: by effective latency (EWMA + ``hop_ms`` for a remote
        node; unknown latency after known ones), then higher tokens/s, then score.
    local-first: the local node first when it serves the model and is not
        saturated (ahead + in_flight below ``saturation``), then least-loaded.
"""

from __future__ import annotations

import enum
import math
import random
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from bootstrap.table import PeerTable, serving
from capabilities.record import Load
from node.reach.records import intermediaries
from protocols import MAX_HEDGE_MS, Priority
from protocols.config import Table
from protocols.errors import ConfigError
from protocols.resilience import BreakerState
from runners.base import ModelInfo
from runners.continuation import continues

from .peer_health import PeerBreakers


class Strategy(enum.StrEnum):
    LEAST_LOADED = "least-loaded"
    ROUND_ROBIN = "round-robin"
    BEST_PERFORMANCE = "best-performance"
    LOCAL_FIRST = "local-first"


@dataclass(frozen=True, slots=True)
class Weights:
    """The score's weights (see the module docstring); all non-negative."""

    queue_ahead: float = 1.0
    queue_behind: float = 0.25
    in_flight: float = 1.0  # its running jobs, as last reported
    ours: float = 1.0  # our own calls to it now
    latency_per_s: float = 2.0  # no longer scored (service times scale the queue); old configs load
    hop: float = 0.5
    half_open: float = 2.0
    accelerator: float = 0.5
    relayed: float = 1.0  # a peer reached through a relay (see Paths)
    forwarded: float = 1.5  # an intermediary that passes the job on
    unknown: float = 0.5  # a candidate whose load nobody reported (see Unknown load)
    hop_ms: float = 5.0  # best-performance: a remote node's latency plus this

    def __post_init__(self) -> None:
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ConfigError(f"router weight {name} must be a finite number >= 0")

    @classmethod
    def from_table(cls, table: Table) -> Weights:
        """``[router.weights]``: any of the fields above, numbers >= 0."""
        base = cls()
        values = {n: table.number(n, getattr(base, n)) for n in cls.__dataclass_fields__}
        table.done()
        return cls(**values)


@dataclass(frozen=True, slots=True)
class RouterConfig:
    strategy: Strategy = Strategy.LEAST_LOADED
    max_attempts: int = 3  # candidates per plan, local included
    weights: Weights = field(default_factory=Weights)
    saturation: int = 8  # local-first: the local node is full at ahead + in_flight >= this
    load_half_life_s: float = 2.5  # a peer's reported load counts half after this long
    unknown_load: float = 1.0  # others' jobs assumed at an unknown-load peer, when none is known
    peer_failures: int = 3  # consecutive failures that open a peer's breaker
    peer_cooldown_s: float = 5.0
    peer_max_cooldown_s: float = 300.0
    max_tracked_peers: int = 1024  # breakers held at most
    # Requests with more input bytes than this use relayed paths only when no direct
    # candidate is left (relays limit the bytes of a circuit).
    relay_max_bytes: int = 1 << 20
    # A stream whose producer dies is resumed on another peer at most this often
    # (node.jobs.resume); 0: never, it fails typed naming the chunks delivered.
    max_resumes: int = 2
    # Hedge jobs that have no first chunk or answer after this long (idempotent jobs
    # only; a job's own hedge_ms overrides it); 0: off.
    hedge_ms: int = 0

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "strategy", Strategy(self.strategy))  # "round-robin" works
        except ValueError:
            raise ConfigError(
                f"router strategy must be one of {[str(s) for s in Strategy]}"
            ) from None
        names = ("max_attempts", "saturation", "peer_failures", "max_tracked_peers")
        for name in (*names, "relay_max_bytes"):
            value = getattr(self, name)
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
                raise ConfigError(f"router {name} must be an integer >= 1")
        for name, most in (("max_resumes", 64), ("hedge_ms", MAX_HEDGE_MS)):
            value = getattr(self, name)
            if not (isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= most):
                raise ConfigError(f"router {name} must be an integer from 0 to {most}")
        if not isinstance(self.weights, Weights):
            raise ConfigError("router weights must be a Weights")
        if not (math.isfinite(self.load_half_life_s) and self.load_half_life_s > 0):
            raise ConfigError("router load_half_life_s must be a positive number")
        if not (math.isfinite(self.unknown_load) and self.unknown_load >= 0):
            raise ConfigError("router unknown_load must be a finite number >= 0")
        cool, top = self.peer_cooldown_s, self.peer_max_cooldown_s
        if not (math.isfinite(cool) and cool >= 0 and math.isfinite(top) and top >= cool):
            raise ConfigError("router needs 0 <= peer_cooldown_s <= peer_max_cooldown_s, finite")

    @classmethod
    def from_table(cls, table: Table) -> RouterConfig:
        """``[router]`` in config.toml; every field optional, bad ones named (ConfigError)."""
        base = cls()
        sub = table.table("weights")
        strategy = table.text("strategy", str(base.strategy), choices=[str(s) for s in Strategy])
        cool = table.number("peer_cooldown_s", base.peer_cooldown_s, high=86400.0)
        top = table.number("peer_max_cooldown_s", max(base.peer_max_cooldown_s, cool), high=86400.0)
        if top < cool:
            raise ConfigError(
                f"{table.where}.peer_max_cooldown_s: below peer_cooldown_s ({cool:g})"
            )
        config = cls(
            strategy=Strategy(strategy),
            max_attempts=table.integer("max_attempts", base.max_attempts, low=1, high=64),
            weights=base.weights if sub is None else Weights.from_table(sub),
            saturation=table.integer("saturation", base.saturation, low=1, high=1 << 20),
            peer_failures=table.integer("peer_failures", base.peer_failures, low=1, high=1000),
            peer_cooldown_s=cool,
            peer_max_cooldown_s=top,
            max_tracked_peers=table.integer(
                "max_tracked_peers", base.max_tracked_peers, low=1, high=1 << 20
            ),
            load_half_life_s=table.number(
                "load_half_life_s", base.load_half_life_s, low=0.01, high=3600.0
            ),
            unknown_load=table.number("unknown_load", base.unknown_load, low=0.0, high=1 << 20),
            relay_max_bytes=table.integer(
                "relay_max_bytes", base.relay_max_bytes, low=1, high=1 << 40
            ),
            max_resumes=table.integer("max_resumes", base.max_resumes, low=0, high=64),
            hedge_ms=table.integer("hedge_ms", base.hedge_ms, low=0, high=MAX_HEDGE_MS),
        )
        table.done()
        return config


@dataclass(frozen=True, slots=True)
class RouteRequest:
    model: str
    task: str | None = None
    precision: str | None = None
    device: str | None = None  # a prefix of the model's device, any case: "cuda", "GPU", "CPU"
    strategy: Strategy | None = None  # None: the router's default
    priority: Priority = Priority.NORMAL
    exclude: frozenset[str] = frozenset()  # node ids already tried (the local id too)
    size_bytes: int = 0  # the inputs' bytes (see Paths)
    via: bool = True  # intermediaries may be candidates (False once forwarded to us)
    held_back: frozenset[str] = frozenset()  # peers reputation keeps out (not "tried")
    continues: str | None = None  # resuming: the input candidates must continue
    alike: tuple[tuple[str, Any], ...] = ()  # resuming: (entry field, value) to prefer

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("a route request needs a model name")
        if self.size_bytes < 0:
            raise ValueError("size_bytes must be >= 0")
        if self.strategy is not None:
            object.__setattr__(self, "strategy", Strategy(self.strategy))
        if not isinstance(self.exclude, frozenset):
            raise ValueError("exclude must be a frozenset of node ids")
        if not isinstance(self.held_back, frozenset):
            raise ValueError("held_back must be a frozenset of node ids")


@dataclass(frozen=True, slots=True)
class LocalNode:
    """This node as a candidate: the models it serves itself and how busy it is."""

    models: Sequence[ModelInfo]
    load: Load = field(default_factory=Load)
    circuits: Mapping[str, str] = field(default_factory=dict)  # model -> its backend breaker


@dataclass(frozen=True, slots=True)
class Candidate:
    peer_id: str  # the local node's own id when local
    local: bool
    model: str  # the name as that node spells it
    device: str
    score: float
    probe: bool = False  # its breaker is half-open: this call is the probe
    path: str = "direct"  # "local", "direct", "hole-punched", "relayed", or "via"


@dataclass(frozen=True, slots=True)
class Preview:
    """``Router.preview``: the order a plan would try now, and every eligible node
    (healthy ones by score, best first, then a half-open probe)."""

    order: list[Candidate]
    candidates: list[Candidate]

    @property
    def chosen(self) -> Candidate | None:
        return self.order[0] if self.order else None


@dataclass(frozen=True, slots=True)
class _Seen:
    """One eligible node, with what the strategies sort on."""

    candidate: Candidate
    latency_ms: float | None
    tokens_per_s: float | None
    ahead: int
    in_flight: int
    alike: bool = True  # its entry has every field of request.alike


@dataclass(frozen=True, slots=True)
class _Found:
    """One qualifying node before scoring: scores depend on the others (medians)."""

    pid: str
    local: bool
    name: str  # the model's name as that node spells it
    device: str
    circuit: str | None
    probe: bool
    path: str
    known: bool  # its load was reported (see Unknown load)
    reported: float  # its weighted queue and running jobs, as reported
    ours: int  # our calls to it now (0 for the local node: its load is exact)
    then: int  # our calls to it when it reported its load
    fade: float
    latency_ms: float | None  # the EWMA its record reports
    service_ms: float | None  # its time per job: ours observed, else the reported EWMA
    tokens_per_s: float | None
    ahead: int
    in_flight: int
    alike: bool = True  # its entry has every field of request.alike

    def others(self) -> float:
        """The others' work there: the report, less our calls it counted, faded."""
        return self.fade * max(0.0, self.reported - self.then)


@dataclass(frozen=True, slots=True)
class _Ours:
    """What this node knows of its own calls (see ``Router.plan``)."""

    in_flight: Mapping[str, int]
    service_ms: Mapping[str, float]
    then: Mapping[str, int]


MAX_SPEEDUP = 1000.0  # a node's speed counts at most this many times the typical one
TIE = 0.25  # least-loaded: scores this close to the best (in typical jobs) take turns
# Speeds within this factor of the typical one count as typical: run_ms is noisy (a
# busy machine stretches a 20 ms job to 40 at one worker, then at another), and a
# noisy speed only unbalances equal peers; by our own calls alone the shortest
# queue already keeps a slower peer busy with fewer jobs, and the speed is there
# so that a clearly slower one (5x) holds less of them waiting (latency).
SPEED_BAND = 2.0


class Router:
    """Plans the order in which to try nodes for one request (see the module docstring)."""

    def __init__(
        self,
        self_id: str,
        config: RouterConfig,
        *,
        rng: random.Random,
        clock: Callable[[], float],
    ) -> None:
        self.self_id = self_id
        self.config = config
        self._rng = rng
        self._clock = clock
        self.breakers = PeerBreakers(
            config.peer_failures,
            config.peer_cooldown_s,
            config.peer_max_cooldown_s,
            clock,
            max_peers=config.max_tracked_peers,
        )
        self._turns: dict[tuple[Strategy, str], int] = {}  # turns per strategy and model

    def describe(self) -> dict[str, Any]:
        """Plain data for ``swarm status``: the default strategy and peers held against."""
        return {
            "strategy": str(self.config.strategy),
            "max_attempts": self.config.max_attempts,
            "peers": self.breakers.describe(),
        }

    def plan(
        self,
        table: PeerTable,
        local: LocalNode | None,
        request: RouteRequest,
        in_flight: Mapping[str, int],
        paths: Mapping[str, str] | None = None,
        service_ms: Mapping[str, float] | None = None,
        ours_then: Mapping[str, int] | None = None,
    ) -> list[Candidate]:
        """The nodes to try, in order, at most ``config.max_attempts`` (maybe none).

        ``in_flight``: our calls at each peer now; ``paths``: see Paths;
        ``service_ms``: each peer's time per job for this model, as our own calls
        observed it; ``ours_then``: our calls at each peer when its load in the
        table was reported (see Score; ``node.jobs.calls`` keeps both)."""
        mine = _Ours(in_flight, service_ms or {}, ours_then or {})
        return self._plan(table, local, request, mine, paths or {}, self._rng, True)[0]

    def preview(
        self,
        table: PeerTable,
        local: LocalNode | None,
        request: RouteRequest,
        in_flight: Mapping[str, int],
        paths: Mapping[str, str] | None = None,
        service_ms: Mapping[str, float] | None = None,
        ours_then: Mapping[str, int] | None = None,
    ) -> Preview:
        """What ``plan`` would answer now, changing nothing: no turn is taken and
        the draws come from a copy of the rng, so the next ``plan`` on the same
        state answers the same order. For "which node would run this, and why"."""
        rng = random.Random()
        rng.setstate(self._rng.getstate())
        mine = _Ours(in_flight, service_ms or {}, ours_then or {})
        order, eligible = self._plan(table, local, request, mine, paths or {}, rng, False)
        ranked = sorted(eligible, key=lambda c: (c.probe, c.score, c.peer_id))
        return Preview(order=order, candidates=ranked)

    def _plan(
        self,
        table: PeerTable,
        local: LocalNode | None,
        request: RouteRequest,
        mine: _Ours,
        paths: Mapping[str, str],
        rng: random.Random,
        take_turn: bool,
    ) -> tuple[list[Candidate], list[Candidate]]:
        """(the plan, every eligible candidate in no particular order)."""
        found: list[_Found] = []
        if local is not None and self.self_id not in request.exclude:
            entry = _match([m.describe() for m in local.models], request)
            load = local.load.describe()
            here = self._found(self.self_id, request, entry, load, 0, 0, local.circuits)
            found += [] if here is None else [here]
        peers = [
            (p, _match((p.body or {}).get("models"), request))
            for p in serving(table, request.model)
        ]
        for via in (False, True):
            if via:
                if found or not request.via or request.continues is not None:
                    break  # (an intermediary's provider may not continue a stream)
                stand_in = {"name": request.model, "device": ""}  # the provider's is unknown
                peers = [(p, stand_in) for p in intermediaries(table, request.model)]
            for peer, entry in peers:
                pid = peer.peer_id
                if pid == self.self_id or pid in request.exclude or peer.body is None:
                    continue
                if pid in request.held_back:
                    continue
                state = self.breakers.state(pid)
                if state == BreakerState.OPEN or self.breakers.probing(pid):
                    continue
                circuits = {} if via else _map(peer.body.get("circuits"))
                # A report fades as it ages; last_seen is when it came.
                age = max(0.0, self._clock() - peer.last_seen)
                fade = 0.5 ** (age / self.config.load_half_life_s)
                ours = _count(mine.in_flight.get(pid))
                one = self._found(
                    pid,
                    request,
                    entry,
                    peer.load,
                    ours,
                    _count(mine.then.get(pid, ours)),
                    circuits,
                    probe=state == BreakerState.HALF_OPEN,
                    fade=fade,
                    path="via" if via else str(paths.get(pid) or "direct"),
                    observed=_positive(mine.service_ms.get(pid)),
                )
                found += [] if one is None else [one]
        scored = self._score(request, found)
        seen = [s for s in scored if not s.candidate.probe]
        probes = [s for s in scored if s.candidate.probe]
        ordered = self._order(request, seen, rng, take_turn)
        if request.size_bytes > self.config.relay_max_bytes:  # direct ones first (Paths)
            ordered.sort(key=lambda s: s.candidate.path in ("relayed", "via"))
        if request.alike:  # a resumed stream: the producer's numerics first (Candidates)
            ordered.sort(key=lambda s: not s.alike)
        if probes:  # one probe at most, and only after every healthy node
            ordered.append(rng.choice(probes))
        eligible = [s.candidate for s in (*seen, *probes)]
        return [s.candidate for s in ordered[: self.config.max_attempts]], eligible

    # -- scoring -----------------------------------------------------------------

    def _found(
        self,
        pid: str,
        request: RouteRequest,
        model: Mapping[str, Any] | None,
        load: Mapping[str, Any] | None,
        ours: int,
        then: int,
        circuits: Mapping[str, Any],
        *,
        probe: bool = False,
        fade: float = 1.0,
        path: str = "direct",
        observed: float | None = None,
    ) -> _Found | None:
        """The node as an unscored candidate, or None when it does not qualify."""
        if model is None:
            return None
        name = str(model.get("name"))
        circuit = _circuit(circuits, name)
        if circuit == "open":
            return None
        w = self.config.weights
        known = isinstance(load, Mapping)
        load = _map(load)
        depth = _map(load.get("queue_depth"))
        ahead = behind = 0
        for prio in Priority:
            n = _count(depth.get(prio.name.lower()))
            if prio <= request.priority:
                ahead += n
            else:
                behind += n
        theirs = _count(load.get("in_flight"))
        running = max(0, theirs - ahead - behind)  # its in_flight counts the queued too
        reported = w.queue_ahead * ahead + w.queue_behind * behind + w.in_flight * running
        latency = _positive(load.get("ewma_latency_ms"))
        device = model.get("device")
        return _Found(
            pid,
            pid == self.self_id,
            name,
            device if isinstance(device, str) else "",
            circuit,
            probe,
            "local" if pid == self.self_id else path,
            known,
            reported,
            ours,
            then,
            fade,
            latency,
            observed or latency or None,
            _positive(load.get("tokens_per_s")),
            ahead,
            theirs,
            all(model.get(key) == value for key, value in request.alike),
        )

    def _score(self, request: RouteRequest, found: list[_Found]) -> list[_Seen]:
        w = self.config.weights
        times = [f.service_ms for f in found if f.service_ms]
        typical = statistics.median(times) if times else None
        known = [f.others() for f in found if f.known]
        unknown = statistics.median(known) if known else self.config.unknown_load
        out: list[_Seen] = []
        for f in found:
            # Our calls now are exact and fresh; the report, less them, is the others'.
            others = f.others() if f.known else unknown
            queue = w.ours * f.ours + others
            speed = f.service_ms / typical if f.service_ms and typical else 1.0
            speed = 1.0 if 1 / SPEED_BAND <= speed <= SPEED_BAND else speed
            speed = min(max(speed, 1 / MAX_SPEEDUP), MAX_SPEEDUP)  # junk stays finite
            score = (
                (queue + 1) * speed
                - 1
                + (0.0 if f.local else w.hop)
                + (w.half_open if f.circuit == "half-open" else 0.0)
                + (w.relayed if f.path == "relayed" else w.forwarded if f.path == "via" else 0.0)
                + (0.0 if f.known else w.unknown)
            )
            if request.device is None and f.device and not f.device.casefold().startswith("cpu"):
                score -= w.accelerator
            candidate = Candidate(f.pid, f.local, f.name, f.device, score, f.probe, f.path)
            seen = _Seen(candidate, f.latency_ms, f.tokens_per_s, f.ahead, f.in_flight, f.alike)
            out.append(seen)
        return out

    # -- ordering ----------------------------------------------------------------

    def _turn(self, strategy: Strategy, request: RouteRequest, take_turn: bool) -> int:
        """This job's turn for ``strategy`` and the model; a job's first plan takes
        one, its failovers (``exclude`` set) do not."""
        key = (strategy, request.model.casefold())
        turn = self._turns.get(key, 0)
        if take_turn and not request.exclude:
            self._turns[key] = turn + 1
        if len(self._turns) > 4096:  # model names come from requests: keep the map small
            self._turns = {key: turn + 1}
        return turn

    def _order(
        self, request: RouteRequest, seen: list[_Seen], rng: random.Random, take_turn: bool
    ) -> list[_Seen]:
        strategy = Strategy(request.strategy or self.config.strategy)
        tie = {s.candidate.peer_id: rng.random() for s in seen}
        by_score = sorted(seen, key=lambda s: (s.candidate.score, tie[s.candidate.peer_id]))
        if strategy == Strategy.ROUND_ROBIN:
            ring = sorted(seen, key=lambda s: s.candidate.peer_id)
            turn = self._turn(strategy, request, take_turn)
            if not ring:
                return []
            start = turn % len(ring)
            return ring[start:] + ring[:start]
        if strategy == Strategy.BEST_PERFORMANCE:
            hop = self.config.weights.hop_ms

            def speed(s: _Seen) -> tuple[float, float, float, float]:
                c = s.candidate
                lat = math.inf if s.latency_ms is None else s.latency_ms + (0 if c.local else hop)
                return (lat, -(s.tokens_per_s or 0.0), c.score, tie[c.peer_id])

            return sorted(seen, key=speed)
        if strategy == Strategy.LOCAL_FIRST:
            mine = [s for s in seen if s.candidate.local]
            if mine and mine[0].ahead + mine[0].in_flight < self.config.saturation:
                rest = [s for s in by_score if not s.candidate.local]
                return mine[:1] + _shortest(rest, self._turn(strategy, request, take_turn))
        return _shortest(by_score, self._turn(Strategy.LEAST_LOADED, request, take_turn))


def _shortest(by_score: list[_Seen], turn: int) -> list[_Seen]:
    """Join the shortest queue: of those within TIE of the best, the one whose turn it
    is (by peer id) first, then the rest by score."""
    if len(by_score) < 2:
        return list(by_score)
    best = by_score[0].candidate.score
    tied = sorted(
        (s for s in by_score if s.candidate.score <= best + TIE), key=lambda s: s.candidate.peer_id
    )
    first = tied[turn % len(tied)]
    return [first] + [s for s in by_score if s is not first]


# ---------------------------------------------------------------------------
# reading records defensively (a verified record is signed, not necessarily sane)


def _match(models: Any, request: RouteRequest) -> Mapping[str, Any] | None:
    """The first of a node's model entries that fits the request, or None."""
    if not isinstance(models, list | tuple):
        return None
    for m in models:
        if isinstance(m, Mapping) and isinstance(m.get("name"), str) and _fits(m, request):
            return m
    return None


def _fits(model: Mapping[str, Any], request: RouteRequest) -> bool:
    if str(model.get("name")).casefold() != request.model.casefold():
        return False
    for key, want in (("task", request.task), ("precision", request.precision)):
        have = model.get(key)
        if want is not None and not (isinstance(have, str) and have.casefold() == want.casefold()):
            return False
    if request.device is not None:
        have = model.get("device")
        if not (isinstance(have, str) and have.casefold().startswith(request.device.casefold())):
            return False
    return request.continues is None or continues(model, request.continues)


def _circuit(circuits: Mapping[str, Any], name: str) -> str | None:
    """The record's backend circuit for ``name``; the worst when spellings disagree."""
    want = name.casefold()
    states = {
        state.casefold()
        for key, state in circuits.items()
        if isinstance(key, str) and key.casefold() == want and isinstance(state, str)
    }
    return next((s for s in ("open", "half-open", "closed") if s in states), None)


def _map(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _count(value: Any) -> int:
    """A non-negative int from a record's counter (junk and bools count as 0)."""
    if isinstance(value, bool) or not isinstance(value, int):
        return 0
    return min(max(value, 0), 1 << 30)


def _positive(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) and value >= 0 else None
