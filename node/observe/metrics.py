"""Prometheus metrics of one node, in the text format any scraper reads.

Each node has a registry of its own (several nodes may share a process, in tests
and benchmarks), with two kinds of series:

- counted as requests finish (``InferenceService.observer``): requests by model,
  priority, outcome (``ok`` or the error code), where they ran (``local``,
  ``peer``, or ``none`` when they did not run) and the id of the node that ran
  them; their latency as a histogram by model and where they ran;
- read from the node at scrape time (a collector, so they are never stale):
  queue depth per model and priority, requests in flight, peers known by status,
  each local backend's circuit state, each peer breaker's state, failovers,
  streams resumed on another producer and streams cut with no one to continue
  them, hedged requests (sent, won by the hedge, racers cancelled), and
  verification: judgements by verdict, and per peer checked the checks,
  agreements and strikes counted and whether it is held back from routing now.

Circuit states are exported as one gauge per state with value 1 for the current
one (the Prometheus idiom for an enum), so a dashboard can count open circuits.

Fair share, read at scrape time too: per peer that sends work (the top N of the
ledger by recent asking, the rest summed as ``peer="other"``, so the label set
stays bounded however many identities turn up) its jobs queued and in flight,
its recent share of the work served, and its served / refused / failed and
over-budget counts; node-wide, refusals and jobs over a peer's budget by reason.
The per-peer counts live as long as the ledger remembers the peer (an idle peer
is forgotten) and a peer moves in and out of the top N, so read them as
counters that may reset; the node-wide ones only grow.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client import Counter as PromCounter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from protocols import Request

BREAKER_STATES = ("closed", "open", "half-open")
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


@dataclass(frozen=True, slots=True)
class Live:
    """What the node reads off itself at scrape time (``node.status.live_figures``)."""

    queue_depth: Mapping[str, Mapping[str, int]] = field(default_factory=dict)  # model -> prio
    in_flight: int = 0
    peers: Mapping[str, int] = field(default_factory=dict)  # status -> how many
    backend_circuits: Mapping[str, str | None] = field(default_factory=dict)  # model -> state
    peer_circuits: Mapping[str, str | None] = field(default_factory=dict)  # peer -> state
    failovers: int = 0
    resumes: int = 0
    broken_streams: int = 0
    hedges: Mapping[str, int] = field(default_factory=dict)  # sent, won, cancelled
    shares: Mapping[str, Any] = field(default_factory=dict)  # InferenceService.shares()
    # peer -> its reputation row (node.jobs.reputation.Reputation.describe)
    reputation: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    verdicts: Mapping[str, int] = field(default_factory=dict)  # agree/disagree/unsure -> n


class NodeMetrics:
    """The node's registry; ``observe`` is given to the inference service."""

    def __init__(self, peer_id: str, live: Callable[[], Live]) -> None:
        self.peer_id = peer_id
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = PromCounter(
            "swarm_requests",
            "Requests this node finished, by model, priority, outcome, where they ran "
            "(local, peer, none) and the peer id of the node that ran them ('' if none).",
            ["model", "priority", "outcome", "ran", "peer"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "swarm_request_seconds",
            "Time from a request's arrival to its answer, by model and where it ran.",
            ["model", "ran"],
            buckets=LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self.registry.register(_Live(live))

    def observe(self, request: Request, outcome: str, seconds: float, by: str | None) -> None:
        ran = "none" if by is None else ("local" if by == self.peer_id else "peer")
        model = request.model.lower()
        # The peer label is bounded by the swarm's size (a node links at most max_peers).
        peer = by or ""
        self.requests.labels(model, request.priority.name.lower(), outcome, ran, peer).inc()
        if outcome == "ok":
            self.latency.labels(model, ran).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _Live(Collector):
    """Series read from the node when scraped."""

    def __init__(self, live: Callable[[], Live]) -> None:
        self.live = live

    def describe(self) -> list[Metric]:
        return []  # no fixed set up front: series come and go with models and peers

    def collect(self) -> Iterator[Metric]:
        live = self.live()
        depth = GaugeMetricFamily(
            "swarm_queue_depth",
            "Requests waiting, by model and priority.",
            labels=["model", "priority"],
        )
        for model, by_priority in live.queue_depth.items():
            for priority, n in by_priority.items():
                depth.add_metric([model, priority], n)
        yield depth
        yield GaugeMetricFamily(
            "swarm_in_flight", "Requests this node is handling now.", value=live.in_flight
        )
        peers = GaugeMetricFamily(
            "swarm_peers", "Peers in the table, by status.", labels=["status"]
        )
        for status in ("linked", "discovered", "unreachable", "refused"):
            peers.add_metric([status], live.peers.get(status, 0))
        yield peers
        yield _states(
            "swarm_backend_circuit",
            "Each local model's backend circuit breaker, 1 for its current state.",
            "model",
            live.backend_circuits,
        )
        yield _states(
            "swarm_peer_circuit",
            "Peers held back by their circuit breaker, 1 for the current state.",
            "peer",
            live.peer_circuits,
        )
        yield CounterMetricFamily(
            "swarm_failovers",
            "Attempts after the first, over all jobs routed here.",
            value=live.failovers,
        )
        yield CounterMetricFamily(
            "swarm_stream_resumes",
            "Streams whose producer failed, continued on another peer from the text sent.",
            value=live.resumes,
        )
        yield CounterMetricFamily(
            "swarm_streams_broken",
            "Streams that failed after some chunks with no peer to continue them.",
            value=live.broken_streams,
        )
        hedges = CounterMetricFamily(
            "swarm_hedges",
            "Hedged requests: sent to a second peer, won by that second request, and "
            "racers cancelled because the other delivered first.",
            labels=["event"],
        )
        for event in ("sent", "won", "cancelled"):
            hedges.add_metric([event], float(live.hedges.get(event, 0)))
        yield hedges
        yield from _shares(live.shares)
        yield from _verification(live)


def _shares(shares: Mapping[str, Any]) -> Iterator[Metric]:
    rows = [r for r in shares.get("peers") or [] if isinstance(r, Mapping)]
    other = shares.get("other")
    labelled = [(str(r.get("peer")), r) for r in rows]
    if isinstance(other, Mapping):
        labelled.append(("other", other))
    gauges = {
        "queued": GaugeMetricFamily(
            "swarm_peer_queued", "A peer's jobs waiting here now.", labels=["peer"]
        ),
        "in_flight": GaugeMetricFamily(
            "swarm_peer_in_flight",
            "A peer's jobs held here now (waiting, running, forwarded).",
            labels=["peer"],
        ),
        "share": GaugeMetricFamily(
            "swarm_peer_share",
            "A peer's part of the work served here lately (0..1, fading).",
            labels=["peer"],
        ),
    }
    jobs = CounterMetricFamily(
        "swarm_peer_jobs",
        "A peer's jobs that ended here, by outcome (served, refused, failed).",
        labels=["peer", "outcome"],
    )
    over = CounterMetricFamily(
        "swarm_peer_over_budget",
        "A peer's jobs over one of its limits (rate, in_flight, queued: refused; high: "
        "run as NORMAL).",
        labels=["peer", "reason"],
    )
    for peer, r in labelled:
        for key, family in gauges.items():
            family.add_metric([peer], float(r.get(key) or 0))
        for outcome in ("served", "refused", "failed"):
            jobs.add_metric([peer, outcome], float(r.get(outcome) or 0))
        for reason, n in (r.get("over_budget") or {}).items():
            over.add_metric([peer, str(reason)], float(n))
    yield from gauges.values()
    yield jobs
    yield over
    totals = shares.get("totals") or {}
    yield CounterMetricFamily(
        "swarm_fairness_refused",
        "Jobs this node refused with OVERLOADED (a full queue or a peer's own limit).",
        value=float(totals.get("refused", 0)),
    )
    budget = CounterMetricFamily(
        "swarm_fairness_over_budget",
        "Jobs over their peer's limit, by reason, over all peers.",
        labels=["reason"],
    )
    for reason in ("rate", "in_flight", "queued", "high"):
        budget.add_metric([reason], float(totals.get(reason, 0)))
    yield budget


def _verification(live: Live) -> Iterator[Metric]:
    verdicts = CounterMetricFamily(
        "swarm_verify_judgements",
        "Spot checks and verify jobs judged here, by verdict (agree, disagree, unsure).",
        labels=["verdict"],
    )
    for verdict in ("agree", "disagree", "unsure"):
        verdicts.add_metric([verdict], live.verdicts.get(verdict, 0))
    yield verdicts
    counts = {
        "checked": "Checks of each peer's answers this node made.",
        "agreed": "Checks where the peer's answer agreed.",
        "strikes": "Checks that found the peer's answer wrong.",
    }
    for key, doc in counts.items():
        family = CounterMetricFamily(f"swarm_peer_{key}", doc, labels=["peer"])
        for peer, row in live.reputation.items():
            family.add_metric([peer], float(row.get(key, 0)))
        yield family
    held = GaugeMetricFamily(
        "swarm_peer_held_back",
        "1 while this node holds the peer back from routing for wrong answers.",
        labels=["peer"],
    )
    for peer, row in live.reputation.items():
        held.add_metric([peer], 1.0 if row.get("held_back") else 0.0)
    yield held


def _states(name: str, doc: str, key: str, current: Mapping[str, str | None]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=[key, "state"])
    for subject, state in current.items():
        if state is None:
            continue
        for candidate in BREAKER_STATES:
            family.add_metric([subject, candidate], 1.0 if state == candidate else 0.0)
    return family
