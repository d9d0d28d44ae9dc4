"""The status page's snapshot (node/gateway/view.py) from plain data: health, edges,
hardware and load summaries, jobs, and what a hostile record cannot do to it."""

from __future__ import annotations

import json
from typing import Any

from bootstrap.table import Peer, PeerTable, Status, TableConfig
from node.gateway.view import MAX_MODELS, MAX_TEXT, short_id, swarm_view

SELF = "12D3KooWself000000000000000000000000000000000000000"
A = "12D3KooWaaaa000000000000000000000000000000000000000"
B = "12D3KooWbbbb000000000000000000000000000000000000000"
C = "12D3KooWcccc000000000000000000000000000000000000000"
GONE = "12D3KooWgone000000000000000000000000000000000000000"

HARDWARE = {
    "cpu": {"logical_cores": 8, "usable_cores": 6, "model": "Xeon"},
    "ram": {"total": 32 * 2**30, "available": 10},
    "cuda": [{"name": "RTX 4090", "memory": 24}],
    "openvino": [{"name": "CPU", "available": True}, {"name": "GPU", "available": False}],
}


def load(in_flight: int = 0, normal: int = 0, latency: float | None = None) -> dict[str, Any]:
    return {
        "in_flight": in_flight,
        "queue_depth": {"high": 0, "normal": normal, "low": 0},
        "ewma_latency_ms": latency,
    }


def body(*peers: str, models: list[Any] | None = None, **extra: Any) -> dict[str, Any]:
    described = [{"name": "echo", "task": "embed", "device": "CPU"}] if models is None else models
    return {
        "addrs": ["/ip4/10.0.0.1/tcp/4001"],
        "hardware": HARDWARE,
        "models": described,
        "load": load(),
        "peers": [[p, ["/ip4/10.0.0.2/tcp/1"]] for p in peers],
        **extra,
    }


def peer(pid: str, record: dict[str, Any] | None, **kw: Any) -> Peer:
    settings: dict[str, Any] = {"status": Status.LINKED, "last_seen": 100.0, "load": load()}
    settings.update(kw)
    return Peer(pid, (), frozenset(), body=record, **settings)


def table(*peers: Peer, now: float = 100.0) -> PeerTable:
    return PeerTable(TableConfig(dead_after_s=10.0), {p.peer_id: p for p in peers}, now=now)


def own(*peers: str, breakers: dict[str, str] | None = None) -> dict[str, Any]:
    held = {pid: {"state": state, "failures": 3} for pid, state in (breakers or {}).items()}
    return {
        "peer_id": SELF,
        **body(*peers, models=[]),
        "load": load(in_flight=2, normal=3, latency=12.5),
        "view": {"routing": {"peer_breakers": held}},
    }


def by_id(view: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {n["id"]: n for n in view["nodes"]}


def test_nodes_health_and_edges() -> None:
    peers = table(
        peer(A, body(B, SELF)),
        peer(B, body(A, C, "12D3KooWstranger")),  # names a peer we hold no record of
        peer(C, body(B), last_seen=90.0),  # quiet for 10 s of a 10 s dead_after: suspect
        peer(GONE, body(), status=Status.UNREACHABLE, reason="dial failed"),
        peer("12D3KooWnorecord", None, status=Status.DISCOVERED),
    )
    view = swarm_view(own(A), peers, gateway="http://127.0.0.1:8080")
    nodes = by_id(view)
    assert list(nodes) == [SELF, A, B, C, GONE]  # no record, nothing to draw
    assert nodes[SELF]["is_self"] and not nodes[A]["is_self"]
    assert {pid: n["health"] for pid, n in nodes.items()} == {
        SELF: "live",
        A: "live",
        B: "live",
        C: "suspect",
        GONE: "unreachable",
    }
    assert nodes[C]["seen_ago_s"] == 10.0
    # Ours to each live peer, and what the records' samples name among known nodes,
    # each pair once; the stranger is no node, so no edge.
    assert view["edges"] == sorted([sorted(p) for p in [(SELF, A), (SELF, B), (A, B), (B, C)]])
    assert view["self"] == SELF and view["gateway"] == "http://127.0.0.1:8080"


def test_an_open_breaker_makes_a_peer_suspect() -> None:
    peers = table(peer(A, body()), peer(B, body()), peer(C, body()))
    assert by_id(swarm_view(own(), peers))[A]["health"] == "live"
    held = by_id(swarm_view(own(breakers={A: "open", B: "half-open", C: "closed"}), peers))
    assert (held[A]["health"], held[A]["breaker"]) == ("suspect", "open")
    assert (held[B]["health"], held[B]["breaker"]) == ("suspect", "half-open")
    assert (held[C]["health"], held[C]["breaker"]) == ("live", "closed")


def test_hardware_models_and_load_summaries() -> None:
    described = {"name": "echo", "task": "embed", "device": "GPU", "dim": 8, "streams": True}
    described["inputs"] = [{"name": "text", "kind": "text"}, {"name": "x", "kind": "tensor"}]
    record = body(models=[described])
    view = swarm_view(own(), table(peer(A, record, load=load(in_flight=1, normal=4, latency=3.25))))
    a, me = by_id(view)[A], by_id(view)[SELF]
    assert a["hardware"] == {
        "cpu_model": "Xeon",
        "cpu_cores": 6,
        "ram_bytes": 32 * 2**30,
        "cuda": ["RTX 4090"],
        "openvino": ["CPU"],  # the unavailable GPU is left out
    }
    assert a["models"] == [
        {"name": "echo", "task": "embed", "device": "GPU", "streams": True, "inputs": ["text", "x"]}
    ]
    # The heartbeat's load (the table's), not the record's older one.
    assert a["load"] == {"in_flight": 1, "queued": 4, "busy": 5, "latency_ms": 3.25}
    assert me["load"] == {"in_flight": 2, "queued": 3, "busy": 5, "latency_ms": 12.5}
    assert a["short"] == short_id(A) == "…000000" and a["addrs"] == ["/ip4/10.0.0.1/tcp/4001"]


def test_recent_jobs_newest_first_and_capped() -> None:
    jobs = [
        {
            "topic": "jobs",
            "kind": "finished",
            "at_ms": 1000 + i,
            "data": {"id": f"j{i}", "model": "echo", "outcome": "ok", "ms": 1.5, "served_by": A},
        }
        for i in range(10)
    ] + [{"topic": "jobs", "kind": "finished", "at_ms": 5, "data": "not a mapping"}]
    view = swarm_view(own(), None, jobs, max_jobs=3)
    assert [j["id"] for j in view["jobs"]] == ["j9", "j8", "j7"]
    assert view["jobs"][0] == {
        "id": "j9",
        "at_ms": 1009,
        "model": "echo",
        "outcome": "ok",
        "ms": 1.5,
        "served_by": A,
        "forwarded": False,
    }
    assert by_id(view).keys() == {SELF} and view["edges"] == []  # no table yet


def test_a_hostile_record_cannot_bloat_or_break_the_snapshot() -> None:
    hostile = {
        "addrs": ["<script>alert(1)</script>" * 50, 7, None] * 10,
        "hardware": {"cpu": "lots", "ram": {"total": -5}, "cuda": [{"name": 3}, "x"]},
        "models": [
            {"name": f"m{i}", "task": ["x"], "device": None, "streams": "yes", "inputs": [3] * 99}
            for i in range(500)
        ],
        "peers": "everyone",
    }
    wild = {"in_flight": float("nan"), "queue_depth": {"normal": True}, "ewma_latency_ms": 1e400}
    view = swarm_view(own(), table(peer(A, hostile, load=wild)))
    a = by_id(view)[A]
    assert len(a["models"]) == MAX_MODELS
    empty = {"task": "", "device": "", "streams": False, "inputs": []}
    assert a["models"][0] == {"name": "m0", **empty}
    assert all(isinstance(x, str) and len(x) <= MAX_TEXT for x in a["addrs"])
    assert a["hardware"] == {
        "cpu_model": "",
        "cpu_cores": 0,
        "ram_bytes": 0,
        "cuda": ["GPU"],
        "openvino": [],
    }
    assert a["load"] == {"in_flight": 0, "queued": 0, "busy": 0, "latency_ms": None}
    json.dumps(view, allow_nan=False)  # what the route sends: strict JSON


def test_this_nodes_fair_share_is_in_the_snapshot() -> None:
    from node.jobs.fairness import FairnessConfig, Ledger, Who
    from protocols import Priority

    ledger = Ledger(FairnessConfig(top=2))
    for peer_id, n in ((A, 5), (B, 2), (C, 1)):
        for _ in range(n):
            ledger.depart(ledger.arrive(Who(peer_id, peer_id), Priority.NORMAL, 1.0, 1), "ok", 1.0)
    for _ in range(3):  # a over its HIGH budget: two of three run as NORMAL
        ledger.arrive(Who(A, A), Priority.HIGH, 2.0, 1)
    mine = own()
    mine["view"]["fairness"] = ledger.describe(2.0, {A: 3}, {})
    shares = swarm_view(mine, None)["shares"]
    assert shares["enabled"] and shares["refused"] == 0
    rows = {r["peer"]: r for r in shares["peers"]}
    assert rows.keys() == {A, B, "other"}
    assert rows[A]["short"] == short_id(A) and rows[A]["queued"] == 3
    assert (rows[A]["served"], rows[A]["in_flight"]) == (5, 3)
    assert rows[A]["over_budget"] == 2 and rows[A]["over"] == {"high": 2}
    assert rows["other"]["short"] == "1 others" and rows["other"]["served"] == 1
    assert 0 < rows[A]["share"] <= 1 and rows[A]["fair"] == round(1 / 3, 3)
    # What the node says is plain data, but checked like the rest.
    mine["view"]["fairness"] = {"peers": [{"peer": 3}, "x", {"peer": "p", "queued": -1}]}
    assert [r["queued"] for r in swarm_view(mine, None)["shares"]["peers"]] == [0]
