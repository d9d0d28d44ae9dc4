"""Peer addresses: parsing what users type, what a host can be dialled at, and the
transport addresses discovery events carry (without /p2p).

Every layer above (the dialers here, the daemon, the client) reads addresses
through these, so a bad one fails the same way everywhere: a ConfigError that
shows the expected form.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Any

import multiaddr
import psutil
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr

from protocols.errors import ConfigError


def without_p2p(peer_id: str, addrs: Iterable[object]) -> tuple[str, ...]:
    """``addrs`` as strings, each without a trailing ``/p2p/<peer_id>``, deduplicated.

    Only the peer's own trailing id is cut, so a relayed address keeps its relay.
    """
    suffix = f"/p2p/{peer_id}"
    out: list[str] = []
    for addr in addrs:
        text = str(addr)
        text = text[: -len(suffix)] if text.endswith(suffix) else text
        if text and text not in out:
            out.append(text)
    return tuple(out)


def peer_info(address: str) -> PeerInfo:
    """Parse ``/ip4/.../tcp/.../p2p/<peer id>``; a ConfigError says what is wrong."""
    try:
        return info_from_p2p_addr(multiaddr.Multiaddr(address))
    except Exception as exc:  # multiaddr and libp2p raise several types for bad text
        raise ConfigError(
            f"{address!r} is not a peer address like /ip4/127.0.0.1/tcp/4001/p2p/12D3Koo..."
        ) from exc


def dialable_addrs(host: Any) -> list[str]:
    """Full multiaddrs (with /p2p/<id>) a peer can dial; 0.0.0.0 expanded to interfaces."""
    peer_id = host.get_id().to_base58()
    out: list[str] = []
    for addr in host.get_transport_addrs():
        ip, port = addr.value_for_protocol("ip4"), addr.value_for_protocol("tcp")
        ips = _interface_ips() if ip == "0.0.0.0" else [ip]
        out.extend(f"/ip4/{i}/tcp/{port}/p2p/{peer_id}" for i in ips)
    return out


def _interface_ips() -> list[str]:
    ips = []
    for entries in psutil.net_if_addrs().values():
        for entry in entries:
            if entry.family.name == "AF_INET":
                ips.append(entry.address)
    # Loopback last: it only reaches this machine.
    return sorted(set(ips), key=lambda i: (ipaddress.ip_address(i).is_loopback, i))
