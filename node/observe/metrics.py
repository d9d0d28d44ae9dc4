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
  and verification: judgements by verdict, and per peer checked the checks,
  agreements and strikes counted and whether it is held back from routing now.

Circuit states are exported as one gauge per state with value 1 for the current
one (the Prometheus idiom for an enum), so a dashboard can count open circuits.
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
        yield from _verification(live)


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
