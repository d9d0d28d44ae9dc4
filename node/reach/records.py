"""The capability record keys reach owns, written and read in one place.

A node's full record body carries, beside ``addrs`` (its wide addresses, see
``node.reach.addresses``)::

    "reach":    "public" | "private" | "unknown"   # the verdict (reachability)
    "relay":    {limits..., "reserved": [ids]}     # only while it offers circuit relay v2
    "forwards": ["model", ...]                     # models it can pass a job on to

``reach`` and ``relay`` let NATed peers pick relays (``relay_candidates``); the
``relay`` entry is the relay service's own (``RelayService.record_entry``: its
limits and who holds a reservation), absent while it offers none.
``forwards`` serves swarms with no relay: the models served by linked peers
whose record does not say "public" (others may not be able to dial them), so a
node that cannot reach such a provider sends the job to a peer that can
(``intermediaries``; the router places those after every direct candidate).
Records of nodes that predate these keys read as "unknown", no relay, nothing
forwarded.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from bootstrap.table import Peer, PeerTable, live_peers

from .addresses import endpoint
from .config import Reach

REACH_KEY = "reach"
RELAY_KEY = "relay"
FORWARDS_KEY = "forwards"
MAX_FORWARDS = 64  # model names in one record


def record_keys(
    reach: Reach, relay: Mapping[str, Any] | None = None, forwards: Iterable[str] = ()
) -> dict[str, Any]:
    """The reach keys of this node's record body (``relay``: the relay service's
    entry while it offers one, else None)."""
    body: dict[str, Any] = {REACH_KEY: str(reach)}
    if relay is not None:
        body[RELAY_KEY] = dict(relay)
    names = sorted(set(forwards), key=str.casefold)[:MAX_FORWARDS]
    if names:
        body[FORWARDS_KEY] = names
    return body


def reach_of(body: Mapping[str, Any] | None) -> Reach:
    """What a peer's record says of its reachability (unknown when it does not say)."""
    value = (body or {}).get(REACH_KEY)
    try:
        return Reach(value) if isinstance(value, str) else Reach.UNKNOWN
    except ValueError:
        return Reach.UNKNOWN


def offers_relay(body: Mapping[str, Any] | None) -> bool:
    """Whether a peer's record says it offers a relay (and does not say it is private)."""
    body = body or {}
    return isinstance(body.get(RELAY_KEY), Mapping) and reach_of(body) is not Reach.PRIVATE


def relay_candidates(table: PeerTable) -> list[tuple[str, tuple[str, ...]]]:
    """Linked peers whose record offers a relay: (peer id, direct addresses), by peer
    id. The relay manager of a NATed node picks its relays among these."""
    found = []
    for peer in live_peers(table):
        if offers_relay(peer.body):
            direct = tuple(a for a in peer.addrs if endpoint(a) is not None)
            if direct:
                found.append((peer.peer_id, direct))
    return found


def forwardable(table: PeerTable, own: Iterable[str] = ()) -> list[str]:
    """The models this node can forward to a linked peer others may not reach (see
    the module docstring), as the providers spell them, less those served here."""
    mine = {name.casefold() for name in own}
    names: dict[str, str] = {}
    for peer in live_peers(table):
        if reach_of(peer.body) is Reach.PUBLIC:
            continue
        for name in peer.models:
            if name.casefold() not in mine:
                names.setdefault(name.casefold(), name)
    return sorted(names.values(), key=str.casefold)[:MAX_FORWARDS]


def forwards(peer: Peer, model: str) -> bool:
    """Whether ``peer``'s record says it can pass a job for ``model`` on."""
    listed = (peer.body or {}).get(FORWARDS_KEY)
    if not isinstance(listed, list | tuple):
        return False
    want = model.casefold()
    return any(isinstance(n, str) and n.casefold() == want for n in listed[:MAX_FORWARDS])


def intermediaries(table: PeerTable, model: str) -> list[Peer]:
    """Linked peers that forward ``model`` and do not serve it themselves, by peer id."""
    want = model.casefold()
    return [
        p
        for p in live_peers(table)
        if forwards(p, model) and not any(m.casefold() == want for m in p.models)
    ]


FORWARDED_WHY = (
    "no provider of it is linked here: none can be dialled from this node, "
    "directly or through a relay; jobs go through a peer that links one "
    "(one more hop each way)"
)


def forwarded_only(table: PeerTable, own: Iterable[str] = ()) -> dict[str, list[str]]:
    """The models this node reaches only through intermediaries: model -> their ids.

    What ``swarm status`` explains: such jobs are slower by a hop."""
    mine = {name.casefold() for name in own}
    served = {m.casefold() for p in live_peers(table) for m in p.models}
    found: dict[str, list[str]] = {}
    for peer in live_peers(table):
        listed = (peer.body or {}).get(FORWARDS_KEY)
        for name in listed[:MAX_FORWARDS] if isinstance(listed, list | tuple) else ():
            if not isinstance(name, str) or name.casefold() in mine | served:
                continue
            found.setdefault(name, []).append(peer.peer_id)
    return dict(sorted(found.items()))
