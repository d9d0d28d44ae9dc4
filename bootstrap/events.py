"""What discovery reports: plain, frozen events for the peer table's reducer.

Every discovery adapter (mDNS, the bootstrap list, the Kademlia DHT) is a trio
service that sends these into a bounded channel the node reads. Adapters only
say "this peer may be reachable here"; whether it is, and what it serves, is
decided when its signed capability record is fetched and verified.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Source(enum.StrEnum):
    MDNS = "mdns"
    BOOTSTRAP = "bootstrap"
    DHT = "dht"
    PEERSTORE = "peerstore"  # remembered from an earlier run
    CONFIG = "config"  # --peer on the command line
    INBOUND = "inbound"  # it connected to us


@dataclass(frozen=True, slots=True)
class Discovered:
    """A peer id and addresses (multiaddr strings, without /p2p) worth dialling."""

    peer_id: str
    addrs: tuple[str, ...]
    source: Source


@dataclass(frozen=True, slots=True)
class DiscoveryProblem:
    """Why an adapter is not finding anyone, for ``swarm status`` (None clears it)."""

    source: Source
    problem: str | None
