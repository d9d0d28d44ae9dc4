"""What a running node says about itself: pure views of its services record.

Each function reads a ``Services`` and returns plain data (or the router's own
types); none changes anything, so the same record answers ``swarm status``,
the capability record peers get, ``/metrics``, the MCP tools and daemon.json.
Backend addresses and keys never appear: the runners' states are shown without
``base_url``, and keys never leave their pool.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any

from bootstrap.table import content_of, live_peers
from capabilities.record import record_body
from node.jobs.router import Candidate, LocalNode
from node.json_values import jsonable
from node.observe.metrics import Live
from node.reach.records import (
    FORWARDED_WHY,
    forwardable,
    forwarded_only,
    record_keys,
    relay_candidates,
)
from node.services import Services
from protocols import Priority

MAX_SHARES_IN_RECORD = 64  # content ids a record lists; the DHT holds them all


def describe(s: Services) -> dict[str, Any]:
    """The body of this node's full capability record (load travels in heartbeats)."""
    models = s.models.infos()
    body = record_body(
        addrs=list(s.reach.wide()),  # what any peer may dial (node.reach.addresses)
        hardware=s.hardware,
        models=models,
        load=s.service.load(),
    )
    circuits = s.models.circuits()
    extra = {"circuits": circuits} if circuits else {}
    reach = record_keys(
        s.reach.verdict.reach,
        s.reach.relay_entry(),
        forwardable(s.membership.table, (m.name for m in models)),
    )
    content = s.content.models
    body["models"] = [
        {**m, "content": content[m["name"]]} if m.get("name") in content else m
        for m in body.get("models", [])
    ]
    shares = s.content.share_ids()[:MAX_SHARES_IN_RECORD]
    return {**body, **extra, **reach, "content": shares, "peers": s.membership.peer_sample()}


def reserved_at(s: Services, relay: str) -> list[str]:
    """The peers a linked relay's record says hold a reservation there."""
    peer = s.membership.table.peers.get(relay)
    entry = (peer.body or {}).get("relay") if peer is not None else None
    reserved = entry.get("reserved") if isinstance(entry, dict) else None
    return [p for p in reserved if isinstance(p, str)] if isinstance(reserved, list) else []


def relays_holding(s: Services, peer_id: str) -> list[str]:
    """Circuit addresses to ``peer_id`` through linked relays whose records say it
    holds a reservation there (``/ip4/R/tcp/P/p2p/R/p2p-circuit``)."""
    out = []
    for relay, addrs in relay_candidates(s.membership.table):
        if peer_id in reserved_at(s, relay):
            out += [f"{a}/p2p/{relay}/p2p-circuit" for a in addrs[:2]]
    return out


def client_view(s: Services) -> dict[str, Any]:
    """This node's own view, which clients (``swarm status``) get in its record."""
    view = s.membership.view()
    # Each peer's path: how its connection runs now (direct, hole-punched or relayed;
    # None when not connected), which `swarm peers` shows beside its status.
    kinds = s.circuits.kinds()
    view["peers"] = [{**row, "path": kinds.get(str(row.get("peer_id")))} for row in view["peers"]]
    return {
        **view,
        "stats": s.service.stats.describe(),
        # Records that failed verification on arrival, before any table saw them.
        "records_refused_on_arrival": s.caps.refused_records,
        "caps": {"streams_in": s.caps.streams, "records_in": s.caps.exchanges},
        "runners": s.models.status(),
        "routing": routing_view(s),
        # Each peer's share of this node: its jobs here, what it got, who is over budget.
        "fairness": s.service.shares(),
        "reach": reach_view(s),
        "verification": s.verifier.describe(),
        "models_failed": dict(s.models.failed),
        "models_pending": dict(s.models.pending),  # content being pulled: name -> id
        "content": content_view(s),
        "access": {
            "private_swarm": s.config.swarm_key is not None,
            "allow_list": s.access.allowed is not None,
            "refused": s.access.refused,
        },
    }


def status(s: Services) -> dict[str, Any]:
    """What ``swarm status --json`` shows of this node, as plain JSON data."""
    record = s.signer.view(client_view(s))
    return {"peer_id": record.peer_id, "seq": record.seq, **jsonable(record.body)}


def reach_view(s: Services) -> dict[str, Any]:
    """Reachability and why, what is announced, relays held, and the models reached
    only through other peers (and why that is slower)."""
    only = forwarded_only(s.membership.table, (m.name for m in s.models.infos()))
    forwarding = {model: {"via": via, "why": FORWARDED_WHY} for model, via in only.items()}
    return {
        **s.reach.describe(),
        "forwarding": forwarding,
        "forwarded_jobs": s.dispatcher.via_jobs,
        # The relay work: the relay offered, the reservations held, and each
        # connected peer's kind of connection (direct, hole-punched, relayed).
        "relay_service": s.relay.describe(),
        "relays": s.relays.describe(),
        **s.circuits.describe(),
    }


def routing_view(s: Services) -> dict[str, Any]:
    described = s.router.describe()
    return {
        "strategy": described["strategy"],
        "max_attempts": described["max_attempts"],
        "failovers": s.dispatcher.failovers,
        "resumes": s.dispatcher.resumes,
        "broken_streams": s.dispatcher.broken,
        "hedges": s.dispatcher.hedges.describe(),
        "peer_breakers": described["peers"],
    }


def model_entry(s: Services, node: str, model: str) -> Mapping[str, Any] | None:
    """How ``node`` (this one, or a peer by its record) announces ``model``; None when
    it does not serve it (verification compares answers by these entries)."""
    want = model.casefold()
    if node == s.peer_id:
        entries: Any = [info.describe() for info in s.models.infos()]
    else:
        peer = s.membership.table.peers.get(node)
        entries = (peer.body or {}).get("models") if peer is not None else None
    for m in entries if isinstance(entries, list | tuple) else ():
        if isinstance(m, Mapping) and str(m.get("name")).casefold() == want:
            return m
    return None


def local_node(s: Services) -> LocalNode:
    """This node as a routing candidate: its models, load and backend circuits."""
    return LocalNode(models=s.models.infos(), load=s.service.load(), circuits=s.models.circuits())


def backends_view(s: Services) -> dict[str, Any]:
    """The models served here, what runs each and its live state, and the models that
    did not load with why (MCP's list_backends). No keys, no backend addresses."""
    states = s.models.status()
    models = [
        {**runner.info.describe(), "state": states.get(name) or {}}
        for name, runner in s.models.runners.items()
    ]
    return {"node": s.peer_id, "models": models, "failed": dict(s.models.failed)}


def select_peer(
    s: Services, model: str, strategy: str | None = None, priority: Priority = Priority.NORMAL
) -> dict[str, Any]:
    """Where a job for ``model`` would run now, and the candidates with their scores
    (MCP's select_peer); runs nothing. Raises BadStrategy for an unknown strategy."""
    preview = s.planner.preview(model, strategy, priority)

    def candidate(c: Candidate) -> dict[str, Any]:
        return {
            "node": c.peer_id,
            "local": c.local,
            "model": c.model,
            "device": c.device,
            "score": round(c.score, 6),
            "probe": c.probe,
            "path": c.path,
        }

    chosen = preview.chosen
    return {
        "strategy": strategy or str(s.router.config.strategy),
        "chosen": None if chosen is None else candidate(chosen),
        "order": [c.peer_id for c in preview.order],
        "candidates": [candidate(c) for c in preview.candidates],
    }


def live_figures(s: Services) -> Live:
    """What /metrics reads at scrape time."""
    peers = Counter(str(p.status) for p in s.membership.table.peers.values())
    return Live(
        queue_depth={model: gate.depth() for model, gate in s.service.gates.items()},
        in_flight=s.service.in_flight,
        peers=dict(peers),
        backend_circuits=dict(s.models.circuits()),
        peer_circuits={
            peer: str(b.get("state")) for peer, b in s.router.breakers.describe().items()
        },
        failovers=s.dispatcher.failovers,
        resumes=s.dispatcher.resumes,
        broken_streams=s.dispatcher.broken,
        hedges=s.dispatcher.hedges.describe(),
        shares=s.service.shares(),
        reputation=s.verifier.reputation.describe(),
        verdicts=dict(s.verifier.stats.verdicts),
    )


def daemon_state(s: Services, pid: int) -> dict[str, Any]:
    """daemon.json: where the CLI, ``swarm mcp`` and HTTP clients find this daemon."""
    return {
        "pid": pid,
        "peer_id": s.peer_id,
        "addrs": list(s.addrs),
        "http": s.gateway.url if s.gateway is not None else None,
        "grpc": s.grpc.address if s.grpc is not None else None,
        "socket": str(s.local.path) if s.local is not None else None,
    }


def content_view(s: Services) -> dict[str, Any]:
    """What this node shares and pulls, and for each content id it knows of (its own
    and those in its peers' records) how many linked peers share it."""
    known: dict[str, int] = {}
    for peer in live_peers(s.membership.table):
        for cid in content_of(peer.body):
            known[cid] = known.get(cid, 0) + 1
    return {**s.content.describe(), "providers": known}
