"""What a libp2p connection is, read off py-libp2p's swarm: live, relayed, inbound.

py-libp2p keeps a peer's connections in ``network.connections[peer_id]`` (a
list; closed ones may linger until the swarm prunes them). A connection is
relayed when its type says so or its transport address names a
``/p2p-circuit``. ``SwarmConn.get_transport_addresses`` falls back to the
peerstore's addresses when the connection's own were never set, so only the
ones set on the connection are read here.
"""

from __future__ import annotations

from typing import Any

from libp2p.connection_types import ConnectionType
from libp2p.peer.id import ID
from libp2p.rcmgr import Direction


def live(host: Any, peer_id: ID) -> list[Any]:
    """``peer_id``'s connections that are not closed."""
    conns = host.get_network().connections.get(peer_id) or []
    if not isinstance(conns, list):
        conns = [conns]
    return [c for c in conns if not c.is_closed]


def is_relayed(conn: Any) -> bool:
    try:
        if conn.get_connection_type() == ConnectionType.RELAYED:
            return True
        actual = getattr(conn, "_actual_transport_addresses", None) or ()
        return any("/p2p-circuit" in str(a) for a in actual)
    except Exception:  # a connection torn down while we look: not relayed
        return False


def is_inbound(conn: Any) -> bool:
    return getattr(conn, "direction", None) == Direction.INBOUND


def transport_addrs(conn: Any) -> list[str]:
    """The addresses set on the connection itself (none: not known)."""
    return [str(a) for a in getattr(conn, "_actual_transport_addresses", None) or ()]
