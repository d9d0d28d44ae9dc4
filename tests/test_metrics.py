"""A node's Prometheus metrics, scraped and parsed with prometheus_client's own parser."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from conftest import NodeFactory
from libp2p import generate_new_ed25519_identity
from prometheus_client.parser import text_string_to_metric_families
from support import eventually

from node.client import SwarmClient
from node.gateway import GatewayConfig
from node.jobs.fairness import FairnessConfig
from node.net.host import peer_id_of
from protocols import Priority, RemoteError


def _samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def _value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_requests_outcomes_latency_and_live_state(node_factory: NodeFactory) -> None:
    async with (
        node_factory("b", models=("fake:echo",)) as b,
        node_factory("a", models=("fake:local",), peers=(b.addrs[0],)) as a,
    ):
        async with SwarmClient.connect(a.addrs[0]) as client:
            await eventually(lambda: b.peer_id in {p for p in a.services.membership.table.peers})
            await client.infer("echo", {"text": "one"})
            await client.infer("local", {"text": "two"}, priority=Priority.HIGH)
            with pytest.raises(RemoteError):
                await client.infer("nobody-serves-this", {"text": "three"})
        samples = _samples(a.services.metrics.render())
    ok = dict(outcome="ok")
    assert (
        _value(
            samples,
            "swarm_requests_total",
            model="echo",
            priority="normal",
            ran="peer",
            peer=b.peer_id,
            **ok,
        )
        == 1
    )
    assert (
        _value(
            samples,
            "swarm_requests_total",
            model="local",
            priority="high",
            ran="local",
            peer=a.peer_id,
            **ok,
        )
        == 1
    )
    missing = _value(
        samples,
        "swarm_requests_total",
        model="nobody-serves-this",
        priority="normal",
        outcome="MODEL_NOT_FOUND",
        ran="none",
        peer="",
    )
    assert missing == 1
    assert _value(samples, "swarm_request_seconds_count", model="echo", ran="peer") == 1
    assert _value(samples, "swarm_peers", status="linked") == 1
    assert _value(samples, "swarm_in_flight") == 0
    assert ("swarm_queue_depth", (("model", "local"), ("priority", "high"))) in samples
    assert _value(samples, "swarm_failovers_total") == 0


async def test_the_gateway_serves_the_nodes_metrics(node_factory: NodeFactory) -> None:
    async with node_factory("g", models=("fake:echo",), http=GatewayConfig()) as node:
        assert node.gateway is not None
        async with SwarmClient.connect(node.addrs[0]) as client:
            await client.infer("echo", {"text": "counted"})
        async with httpx.AsyncClient(base_url=node.gateway.url) as http:
            answer = await http.get("/metrics")
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/plain")
    samples = _samples(answer.content)
    ok = dict(model="echo", priority="normal", outcome="ok", ran="local", peer=node.peer_id)
    assert _value(samples, "swarm_requests_total", **ok) == 1


async def test_fair_share_series_per_peer_are_bounded_to_the_top_and_other(
    node_factory: NodeFactory,
) -> None:
    keys = [generate_new_ed25519_identity() for _ in range(3)]
    ids = [peer_id_of(k) for k in keys]
    async with node_factory("f", models=("fake:echo",), fairness=FairnessConfig(top=2)) as node:
        for n, key in enumerate(keys, start=1):  # peer i sends i jobs
            async with SwarmClient.connect(node.addrs[0], key_pair=key) as client:
                for _ in range(n):
                    await client.infer("echo", {"text": "x"})
        samples = _samples(node.services.metrics.render())
    served = {
        dict(labels)["peer"]: value
        for (name, labels), value in samples.items()
        if name == "swarm_peer_jobs_total" and dict(labels)["outcome"] == "served"
    }
    assert served == {ids[2]: 3, ids[1]: 2, "other": 1}
    assert _value(samples, "swarm_peer_in_flight", peer=ids[2]) == 0
    assert 0.4 < _value(samples, "swarm_peer_share", peer=ids[2]) < 0.6
    assert _value(samples, "swarm_fairness_refused_total") == 0
    assert _value(samples, "swarm_fairness_over_budget_total", reason="high") == 0
