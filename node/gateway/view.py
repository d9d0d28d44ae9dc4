"""The status page's snapshot of the swarm, built from plain data (no I/O, no clock).

``swarm_view`` turns what the node already holds (its own status, the membership
table, the feed's recent jobs) into one JSON document the page draws: nodes with
their hardware, models, load and health; edges between nodes that say they are
linked; the last jobs and where they ran; and this node's fair share: each
peer's jobs here, what it got, and who is over budget (``shares``).

Peer records are remote input: every value taken from one is type-checked,
strings are cut to a length and lists to a count, so a peer cannot make the
snapshot large or hand the page something other than what it expects. (The
page escapes what it renders as well; this keeps the JSON itself sane.)
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from bootstrap.table import PeerTable, Status

MAX_TEXT = 120  # characters of any string taken from a record
MAX_ADDRS = 4
MAX_MODELS = 32
MAX_INPUTS = 8  # input names of one model
MAX_DEVICES = 16
MAX_JOBS = 50
MAX_EDGES = 4096
MAX_SHARES = 16  # peers in the fair-share table (the node sends its top N, and "other")
REASONS = ("rate", "in_flight", "queued", "high")
# A linked peer not heard from for this share of the table's dead_after_s is 'suspect'.
SUSPECT_SHARE = 0.5
HELD_BREAKERS = frozenset({"open", "half-open"})  # the router holds back from such a peer


def short_id(peer_id: str) -> str:
    """The tail of a peer id: the head (12D3KooW...) is the same for every ed25519 key."""
    return peer_id if len(peer_id) <= 10 else f"…{peer_id[-6:]}"


def swarm_view(
    own: Mapping[str, Any],
    table: PeerTable | None,
    jobs: Sequence[Mapping[str, Any]] = (),
    *,
    gateway: str = "",
    max_jobs: int = MAX_JOBS,
) -> dict[str, Any]:
    """The page's snapshot.

    ``own`` is this node's status (``Node.status()``: its record body with a
    ``view``), ``table`` the membership table, ``jobs`` the feed's finished jobs
    (oldest first, as ``Feed.recent_jobs`` gives them).
    """
    self_id = _text(own.get("peer_id"))
    breakers = _breakers(own)
    nodes = [_node(self_id, own, health="live", breaker=None, seen_ago_s=0.0, is_self=True)]
    samples: dict[str, Any] = {self_id: own.get("peers")}
    links: set[str] = set()  # peers this node holds a verified record of and has heard
    if table is not None:
        suspect_after = table.config.dead_after_s * SUSPECT_SHARE
        for peer in sorted(table.peers.values(), key=lambda p: p.peer_id):
            if peer.body is None or peer.peer_id == self_id:
                continue  # no verified record: nothing to draw it with
            if peer.status not in (Status.LINKED, Status.UNREACHABLE):
                continue
            seen_ago = max(0.0, table.now - peer.last_seen)
            breaker = breakers.get(peer.peer_id)
            if peer.status == Status.UNREACHABLE:
                health = "unreachable"
            elif breaker in HELD_BREAKERS or seen_ago > suspect_after:
                health = "suspect"
            else:
                health = "live"
                links.add(peer.peer_id)
            body = {**peer.body, "load": peer.load if peer.load is not None else {}}
            nodes.append(
                _node(peer.peer_id, body, health=health, breaker=breaker, seen_ago_s=seen_ago)
            )
            samples[peer.peer_id] = peer.body.get("peers")
    known = {n["id"] for n in nodes}
    edges = _edges(self_id, links, samples, known)
    return {
        "self": self_id,
        "gateway": gateway,
        "nodes": nodes,
        "edges": edges,
        "jobs": recent_jobs(jobs, max_jobs),
        "shares": shares(_mapping(own.get("view")).get("fairness")),
    }


def shares(fairness: Any) -> dict[str, Any]:
    """This node's fair share as the page shows it: each peer's weight, its jobs
    queued and held here, served, refused, over budget (by reason), and its recent
    share of the work beside the one its weight gives it; the rest as one row."""
    fair = _mapping(fairness)

    def row(r: Mapping[str, Any], peer: str, label: str) -> dict[str, Any]:
        over = _mapping(r.get("over_budget"))
        by_reason = {k: _int(over.get(k)) for k in REASONS if _int(over.get(k))}
        return {
            "peer": peer,
            "short": label,
            "own": r.get("own") is True,
            "weight": _number(r.get("weight")),
            **{k: _int(r.get(k)) for k in ("queued", "in_flight", "served", "refused")},
            "over_budget": sum(by_reason.values()),
            "over": by_reason,
            "share": _number(r.get("share")),
            "fair": _number(r.get("fair")),
        }

    rows = []
    for r in _list(fair.get("peers"), MAX_SHARES):
        if isinstance(r, Mapping) and (peer := _text(r.get("peer"))):
            rows.append(row(r, peer, short_id(peer)))
    other = fair.get("other")
    if isinstance(other, Mapping):
        rows.append(row(other, "other", f"{_int(other.get('peers'))} others"))
    totals = _mapping(fair.get("totals"))
    return {
        "enabled": fair.get("enabled") is True,
        "refused": _int(totals.get("refused")),
        "peers": rows,
    }


def recent_jobs(jobs: Sequence[Mapping[str, Any]], limit: int = MAX_JOBS) -> list[dict[str, Any]]:
    """Finished jobs, newest first, at most ``limit``: what ran, how it went, where."""
    out: list[dict[str, Any]] = []
    for event in reversed(jobs):
        if len(out) >= limit:
            break
        data = event.get("data")
        if not isinstance(data, Mapping):
            continue
        out.append(
            {
                "id": _text(data.get("id")),
                "at_ms": _int(event.get("at_ms")),
                "model": _text(data.get("model")),
                "outcome": _text(data.get("outcome")),
                "ms": _number(data.get("ms")),
                "served_by": _text(data.get("served_by")) or None,
                "forwarded": data.get("forwarded") is True,
            }
        )
    return out


def load_summary(load: Any) -> dict[str, Any]:
    """A load description (``Load.describe()``) as the page colours it."""
    load = load if isinstance(load, Mapping) else {}
    depth = load.get("queue_depth")
    queued = sum(_int(v) for v in depth.values()) if isinstance(depth, Mapping) else 0
    in_flight = _int(load.get("in_flight"))
    return {
        "in_flight": in_flight,
        "queued": queued,
        "busy": in_flight + queued,
        "latency_ms": _number(load.get("ewma_latency_ms")),
    }


def hardware_summary(hardware: Any) -> dict[str, Any]:
    """CPU cores and model, RAM, CUDA GPUs and OpenVINO devices, from a record."""
    hw = hardware if isinstance(hardware, Mapping) else {}
    cpu = _mapping(hw.get("cpu"))
    ram = _mapping(hw.get("ram"))
    cuda = [
        _text(gpu.get("name")) or "GPU"
        for gpu in _list(hw.get("cuda"), MAX_DEVICES)
        if isinstance(gpu, Mapping)
    ]
    openvino = [
        _text(dev.get("name"))
        for dev in _list(hw.get("openvino"), MAX_DEVICES)
        if isinstance(dev, Mapping) and dev.get("available", True) is not False
    ]
    return {
        "cpu_model": _text(cpu.get("model")),
        "cpu_cores": _int(cpu.get("usable_cores") or cpu.get("logical_cores")),
        "ram_bytes": _int(ram.get("total")),
        "cuda": cuda,
        "openvino": [name for name in openvino if name],
    }


def _node(
    peer_id: str,
    body: Mapping[str, Any],
    *,
    health: str,
    breaker: str | None,
    seen_ago_s: float,
    is_self: bool = False,
) -> dict[str, Any]:
    models = [
        {
            "name": _text(m.get("name")),
            "task": _text(m.get("task")),
            "device": _text(m.get("device")),
            "streams": m.get("streams") is True,
            # Input names (the playground picks what to send by them: messages, image).
            "inputs": [
                _text(spec.get("name"))
                for spec in _list(m.get("inputs"), MAX_INPUTS)
                if isinstance(spec, Mapping) and _text(spec.get("name"))
            ],
        }
        for m in _list(body.get("models"), MAX_MODELS)
        if isinstance(m, Mapping) and _text(m.get("name"))
    ]
    return {
        "id": peer_id,
        "short": short_id(peer_id),
        # Without /p2p/<id>: the page shows the id beside it already.
        "addrs": [a.split("/p2p/")[0] for a in _texts(body.get("addrs"), MAX_ADDRS) if a],
        "hardware": hardware_summary(body.get("hardware")),
        "models": models,
        "load": load_summary(body.get("load")),
        "health": health,
        "breaker": breaker,
        "seen_ago_s": round(seen_ago_s, 1),
        "is_self": is_self,
    }


def _breakers(own: Mapping[str, Any]) -> dict[str, str]:
    """The router's breaker state per peer id, from this node's status."""
    routing = _mapping(_mapping(own.get("view")).get("routing"))
    held = _mapping(routing.get("peer_breakers"))
    return {
        str(pid): _text(entry.get("state"))
        for pid, entry in held.items()
        if isinstance(entry, Mapping)
    }


def _edges(
    self_id: str, links: Iterable[str], samples: Mapping[str, Any], known: set[str]
) -> list[list[str]]:
    """Each linked pair once, by sorted ids: ours, then those peers' records name."""
    pairs: set[tuple[str, str]] = {_pair(self_id, peer) for peer in links}
    for owner, sample in samples.items():
        for entry in _list(sample, 1024):
            other = entry[0] if isinstance(entry, list | tuple) and entry else None
            if isinstance(other, str) and other in known and other != owner:
                pairs.add(_pair(owner, other))
    return [list(p) for p in sorted(pairs)[:MAX_EDGES]]


def _pair(a: str, b: str) -> tuple[str, str]:
    return (a, b) if a <= b else (b, a)


def _text(value: Any) -> str:
    return value[:MAX_TEXT] if isinstance(value, str) else ""


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _number(value: Any) -> float | None:
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if number and math.isfinite(value) and value >= 0:  # JSON has no inf or NaN
        return round(float(value), 3)
    return None


def _texts(value: Any, limit: int) -> list[str]:
    return [_text(item) for item in _list(value, limit)]


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _list(value: Any, limit: int) -> list[Any]:
    return list(value[:limit]) if isinstance(value, list | tuple) else []
