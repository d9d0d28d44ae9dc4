"""The peer table: who is out there, how we found them, what they serve. A pure reducer.

Discovery adapters, the capability exchange and heartbeats all report into one
place, and the router, ``swarm peers`` and ``swarm status`` all read from it.
Keeping it a pure function, ``table = apply(table, event)``, with frozen state and
no clock, no I/O and no trio, means every rule below is tested by feeding events,
and the node's loop that feeds it stays short. Every event carries its time (the
reducer never reads a clock); times are seconds on one clock the caller picks.

Rules:

- A peer enters on ``Reported(Discovered)`` or ``RecordVerified``; it is ``linked``
  (and serves models) only while it holds a verified record. ``RecordRefused`` makes
  it ``refused`` and forgets its record; ``Unreachable`` makes it ``unreachable``
  until it is heard from again. Events about peers not in the table are ignored
  (a stranger cannot add itself by pinging), except the two that admit peers.
- Liveness: ``Discovered``, ``RecordVerified`` and ``Heard`` are evidence that a
  peer is there and move its ``last_seen`` forward (never back). On ``Tick(now)``
  a peer not seen for more than ``dead_after_s`` is dropped; it may come back with
  a new ``Discovered`` or ``RecordVerified``. Adapters therefore report fresh
  evidence only (an mDNS answer, a dial that worked), not cached hints on a timer.
  Evidence already older than ``dead_after_s`` when it arrives is ignored.
- A record with a seq below the one held is ignored (it arrived late); a record's
  ``expires_at``, if given, takes it back on the first Tick past it, unless a
  ``Heard`` with ``renews_until`` (a heartbeat vouching for the record) moved it on.
- ``RecordRefused`` should be applied only for records a peer sent about itself on
  its own authenticated connection, so that a replay of B's old record relayed
  by C cannot get B refused.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from protocols.errors import ConfigError

from .events import Discovered, DiscoveryProblem, Source


class Status(enum.StrEnum):
    DISCOVERED = "discovered"  # known, no verified record yet
    LINKED = "linked"  # verified record held: it serves what the record says
    UNREACHABLE = "unreachable"  # the last dial or call failed; record kept, not served
    REFUSED = "refused"  # its record failed verification


@dataclass(frozen=True, slots=True)
class TableConfig:
    dead_after_s: float = 15.0
    max_peers: int = 1024  # a flood of discovered ids evicts the stalest unlinked ones
    max_addrs: int = 16  # addresses kept per peer, first come first kept

    def __post_init__(self) -> None:
        if not (self.dead_after_s > 0 and self.max_peers > 0 and self.max_addrs > 0):
            raise ConfigError("dead_after_s, max_peers and max_addrs must be positive")


# ---------------------------------------------------------------------------
# events (besides Discovered and DiscoveryProblem, which come wrapped in Reported)


@dataclass(frozen=True, slots=True)
class Reported:
    """A discovery adapter's event, stamped with when the node received it."""

    event: Discovered | DiscoveryProblem
    at: float


@dataclass(frozen=True, slots=True)
class RecordVerified:
    """A signed record passed ``capabilities.signing`` (signature, window, seq)."""

    peer_id: str
    seq: int
    body: Mapping[str, Any]
    at: float
    expires_at: float | None = None  # on the table's clock


@dataclass(frozen=True, slots=True)
class RecordRefused:
    peer_id: str
    reason: str  # RecordRejected.reason and its message
    at: float


@dataclass(frozen=True, slots=True)
class Heard:
    """A heartbeat, ping or load update from the peer itself (load kept while linked)."""

    peer_id: str
    at: float
    load: Mapping[str, Any] | None = None
    # A signed heartbeat naming the version of the record held: its new expiry.
    renews_until: float | None = None


@dataclass(frozen=True, slots=True)
class Unreachable:
    peer_id: str
    reason: str
    at: float


@dataclass(frozen=True, slots=True)
class Tick:
    now: float


Event = Reported | RecordVerified | RecordRefused | Heard | Unreachable | Tick


# ---------------------------------------------------------------------------
# state


@dataclass(frozen=True, slots=True)
class Peer:
    peer_id: str
    addrs: tuple[str, ...]  # multiaddrs without /p2p
    sources: frozenset[Source]  # how it was found
    last_seen: float
    status: Status = Status.DISCOVERED
    reason: str | None = None  # why refused or unreachable
    seq: int | None = None  # highest verified seq
    body: Mapping[str, Any] | None = None  # latest verified record body, None unless held
    models: tuple[str, ...] = ()  # model names in body, as written there
    load: Mapping[str, Any] | None = None  # from the record, then from heartbeats
    expires_at: float | None = None


@dataclass(frozen=True, slots=True)
class Problem:
    text: str
    since: float


@dataclass(frozen=True, slots=True)
class PeerTable:
    config: TableConfig = field(default_factory=TableConfig)
    peers: Mapping[str, Peer] = field(default_factory=dict)
    problems: Mapping[Source, Problem] = field(default_factory=dict)  # for swarm status
    now: float = 0.0  # the latest time any event carried
    refusals: int = 0  # records refused, known peers or not
    drops: int = 0  # peers dropped for silence


# ---------------------------------------------------------------------------
# the reducer


def apply(table: PeerTable, event: Event) -> PeerTable:
    """The table after ``event``. Never raises for odd input: it ignores it."""
    match event:
        case Tick(now=now):
            return _tick(table, max(table.now, now))
        case Reported(event=DiscoveryProblem(source=source, problem=problem), at=at):
            problems = {s: p for s, p in table.problems.items() if s != source}
            if problem is not None:
                old = table.problems.get(source)
                since = old.since if old is not None and old.text == problem else at
                problems[source] = Problem(problem, since)
            return replace(table, problems=problems, now=max(table.now, at))
        case Reported(event=Discovered() as found, at=at):
            return _discovered(_clock(table, at), found, at)
        case RecordVerified():
            return _record(_clock(table, event.at), event)
        case RecordRefused(peer_id=pid, reason=reason, at=at):
            table = replace(_clock(table, at), refusals=table.refusals + 1)
            peer = table.peers.get(pid)
            if peer is None:
                return table
            refused = replace(
                peer, status=Status.REFUSED, reason=reason, body=None, models=(), load=None
            )
            return _put(table, replace(refused, expires_at=None))
        case Heard(peer_id=pid, at=at, load=load, renews_until=renews):
            table = _clock(table, at)
            peer = table.peers.get(pid)
            if peer is None or _stale(table, at):
                return table
            if load is not None and at >= peer.last_seen and peer.body is not None:
                peer = replace(peer, load=load)
            if renews is not None and peer.expires_at is not None and peer.body is not None:
                peer = replace(peer, expires_at=max(peer.expires_at, renews))
            if peer.status == Status.UNREACHABLE:
                status = Status.DISCOVERED if peer.body is None else Status.LINKED
                peer = replace(peer, status=status, reason=None)
            return _put(table, replace(peer, last_seen=max(peer.last_seen, at)))
        case Unreachable(peer_id=pid, reason=reason, at=at):
            table = _clock(table, at)
            peer = table.peers.get(pid)
            if peer is None or peer.status == Status.REFUSED or at < peer.last_seen:
                return table  # heard from since the failure began
            return _put(table, replace(peer, status=Status.UNREACHABLE, reason=reason))
    return table


def _clock(table: PeerTable, at: float) -> PeerTable:
    return table if at <= table.now else replace(table, now=at)


def _stale(table: PeerTable, at: float) -> bool:
    return at + table.config.dead_after_s < table.now


def _put(table: PeerTable, peer: Peer) -> PeerTable:
    return replace(table, peers={**table.peers, peer.peer_id: peer})


def _admit(table: PeerTable, pid: str, at: float) -> tuple[PeerTable, Peer] | None:
    """The peer, or a new entry (evicting the stalest unlinked one when full)."""
    peer = table.peers.get(pid)
    if peer is not None:
        return table, peer
    if not pid:
        return None
    if len(table.peers) >= table.config.max_peers:
        unlinked = [p for p in table.peers.values() if p.status != Status.LINKED]
        if not unlinked:
            return None
        victim = min(unlinked, key=lambda p: (p.last_seen, p.peer_id))
        table = replace(table, peers={k: v for k, v in table.peers.items() if k != victim.peer_id})
    return table, Peer(pid, (), frozenset(), at)


def _merge_addrs(table: PeerTable, old: tuple[str, ...], new: Any, pid: str) -> tuple[str, ...]:
    out = list(old)
    for addr in new if isinstance(new, list | tuple) else ():
        if not isinstance(addr, str):
            continue
        addr = addr.removesuffix(f"/p2p/{pid}")
        if addr and addr not in out and len(out) < table.config.max_addrs:
            out.append(addr)
    return tuple(out)


def _discovered(table: PeerTable, found: Discovered, at: float) -> PeerTable:
    admitted = None if _stale(table, at) else _admit(table, found.peer_id, at)
    if admitted is None:
        return table
    table, peer = admitted
    return _put(
        table,
        replace(
            peer,
            addrs=_merge_addrs(table, peer.addrs, found.addrs, peer.peer_id),
            sources=peer.sources | {found.source},
            last_seen=max(peer.last_seen, at),
        ),
    )


def _record(table: PeerTable, event: RecordVerified) -> PeerTable:
    admitted = None if _stale(table, event.at) else _admit(table, event.peer_id, event.at)
    if admitted is None:
        return table
    table, peer = admitted
    if peer.seq is not None and event.seq < peer.seq:
        return table  # an older record that arrived late
    load = event.body.get("load")
    return _put(
        table,
        replace(
            peer,
            # The addresses a peer signs for itself come first; older hints after them.
            addrs=_merge_addrs(
                table,
                _merge_addrs(table, (), event.body.get("addrs"), peer.peer_id),
                list(peer.addrs),
                peer.peer_id,
            ),
            last_seen=max(peer.last_seen, event.at),
            status=Status.LINKED,
            reason=None,
            seq=event.seq,
            body=event.body,
            models=_model_names(event.body),
            load=load if isinstance(load, Mapping) else None,
            expires_at=event.expires_at,
        ),
    )


def _tick(table: PeerTable, now: float) -> PeerTable:
    limit = now - table.config.dead_after_s
    peers: dict[str, Peer] = {}
    for pid, peer in table.peers.items():
        if peer.last_seen < limit:
            continue
        if peer.expires_at is not None and peer.expires_at <= now:
            status = Status.DISCOVERED if peer.status == Status.LINKED else peer.status
            peer = replace(peer, status=status, body=None, models=(), load=None, expires_at=None)
        peers[pid] = peer
    dropped = len(table.peers) - len(peers)
    return replace(table, peers=peers, now=now, drops=table.drops + dropped)


def _model_names(body: Mapping[str, Any]) -> tuple[str, ...]:
    models = body.get("models")
    if not isinstance(models, list | tuple):
        return ()
    names = (m.get("name") for m in models if isinstance(m, Mapping))
    return tuple(n for n in names if isinstance(n, str) and n)


# ---------------------------------------------------------------------------
# queries


def live_peers(table: PeerTable) -> list[Peer]:
    """Linked peers (verified record, heard within dead_after_s), by peer id."""
    return sorted(
        (p for p in table.peers.values() if p.status == Status.LINKED), key=lambda p: p.peer_id
    )


def serving(table: PeerTable, model: str) -> list[Peer]:
    """Linked peers whose verified record lists ``model`` (case-insensitive), by peer id."""
    want = model.casefold()
    return [p for p in live_peers(table) if any(m.casefold() == want for m in p.models)]


def content_of(body: Mapping[str, Any] | None) -> set[str]:
    """The content ids (base58) a record says its node shares: each model's
    ``content`` and the record's ``content`` list."""
    if not body:
        return set()
    out = set()
    models = body.get("models")
    for m in models if isinstance(models, list | tuple) else ():
        if isinstance(m, Mapping) and isinstance(m.get("content"), str):
            out.add(m["content"])
    shares = body.get("content")
    if isinstance(shares, list):
        out.update(c for c in shares if isinstance(c, str))
    return out


def model_content(body: Mapping[str, Any] | None) -> dict[str, str]:
    """Each model's content id in a record body, by model name."""
    models = body.get("models") if body else None
    return {
        str(m["name"]): m["content"]
        for m in (models if isinstance(models, list | tuple) else ())
        if isinstance(m, Mapping) and isinstance(m.get("content"), str) and m.get("name")
    }


def content_providers(table: PeerTable, content: str) -> list[Peer]:
    """Linked peers whose verified record shares ``content`` (base58), by peer id."""
    return [p for p in live_peers(table) if content in content_of(p.body)]


def rows(table: PeerTable) -> list[dict[str, Any]]:
    """Plain data for ``swarm peers``: one row per peer in the table, by peer id."""
    return [
        {
            "peer_id": p.peer_id,
            "status": str(p.status),
            "reason": p.reason,
            "addrs": list(p.addrs),
            "hardware": hardware_summary(p.body),
            "models": list(p.models),
            "content": sorted(content_of(p.body)),  # content ids it shares (swarm models)
            "model_content": model_content(p.body),
            "load": None if p.load is None else dict(p.load),
            "last_seen": p.last_seen,
            "seen_ago_s": max(0.0, table.now - p.last_seen),
            "found_by": sorted(str(s) for s in p.sources),
        }
        for p in sorted(table.peers.values(), key=lambda p: p.peer_id)
    ]


def hardware_summary(body: Mapping[str, Any] | None) -> str:
    """One line from a record body's hardware (see capabilities/record.py), or ""."""
    hw = _map(body.get("hardware")) if body is not None else {}
    cpu, ram = _map(hw.get("cpu")), _map(hw.get("ram"))
    parts: list[str] = []
    if cpu:
        cores = cpu.get("logical_cores")
        parts.append(str(cpu.get("model") or "CPU"))
        parts[-1] += f" ({cores} threads)" if isinstance(cores, int) else ""
    if isinstance(ram.get("total"), int):
        parts.append(f"{ram['total'] / 2**30:.0f} GiB RAM")
    if cuda := _names(hw.get("cuda"), lambda d: True):
        parts.append("CUDA: " + ", ".join(cuda))
    if ov := _names(hw.get("openvino"), lambda d: d.get("available") is True):
        parts.append("OpenVINO: " + ", ".join(ov))
    return ", ".join(parts)


def _map(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _names(devices: Any, keep: Callable[[Mapping[str, Any]], bool]) -> list[str]:
    if not isinstance(devices, list | tuple):
        return []
    found = (d.get("name") for d in devices if isinstance(d, Mapping) and keep(d))
    return [n for n in found if isinstance(n, str) and n]
