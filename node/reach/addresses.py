"""Which of this node's addresses go where: a pure policy.

Two audiences, two lists:

- *wide* (capability records, the DHT's provider records): addresses a peer
  anywhere may dial. Configured public addresses (``--public-addr``), listen
  addresses on a global IP that no dial-back refuted, addresses confirmed by
  dial-backs over fresh connections (``node.reach.reachability``), and the
  ``/p2p-circuit`` addresses through this node's relays. A private address
  (192.168.x, 10.x, ...) goes here only once peers have dialled it back: on a
  flat network with no NAT that is the address peers use, behind a NAT it never
  passes (see the verdict's rules).
- *lan* (mDNS): every interface address, private ones included; loopback only
  when there is nothing else, as mDNS announced before.

Loopback: a node that listens on loopback only is a swarm on one machine (a
test, a demo); its loopback addresses are its wide ones too, because every peer
it can have is on the same machine. A node that also has other interfaces never
announces loopback widely (a remote peer dialling 127.0.0.1 reaches itself).

``--reachability private`` announces only circuit addresses, loopback-only
nodes included, so that a test on one machine can make a node that peers reach
through a relay only.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .config import Mode, Reach

IP = ipaddress.IPv4Address | ipaddress.IPv6Address
MAX_WIDE = 16  # addresses in a record; the peer table keeps 16 per peer as well
MAX_CANDIDATES = 8  # addresses one dial-back request names (the server's cap)


class Scope(enum.StrEnum):
    LOOPBACK = "loopback"
    PRIVATE = "private"  # RFC 1918, CGNAT, link-local, ULA: reachable on some LAN only
    GLOBAL = "global"


@dataclass(frozen=True, slots=True)
class Endpoint:
    """The IP and TCP port of a ``/ip4|ip6/IP/tcp/PORT[/p2p/ID]`` address."""

    ip: IP
    port: int

    @property
    def family(self) -> str:
        return "ip4" if self.ip.version == 4 else "ip6"

    def addr(self) -> str:
        return f"/{self.family}/{self.ip}/tcp/{self.port}"


def endpoint(addr: str) -> Endpoint | None:
    """The TCP endpoint of a direct address; None for anything else (relayed, DNS,
    other transports, junk)."""
    parts = addr.split("/")
    if len(parts) < 5 or parts[0] != "" or parts[1] not in ("ip4", "ip6") or parts[3] != "tcp":
        return None
    rest = parts[5:]
    if rest and not (len(rest) == 2 and rest[0] == "p2p" and rest[1]):
        return None  # /p2p-circuit, /ws, ...: not a plain TCP address
    try:
        ip = ipaddress.ip_address(parts[2])
        port = int(parts[4])
    except ValueError:
        return None
    if ip.version != (4 if parts[1] == "ip4" else 6) or not 0 < port < 65536:
        return None
    return Endpoint(ip, port)


def ip_scope(ip: IP) -> Scope:
    if ip.is_loopback:
        return Scope.LOOPBACK
    if ip.is_global:
        return Scope.GLOBAL
    return Scope.PRIVATE


def scope(addr: str) -> Scope | None:
    point = endpoint(addr)
    return None if point is None else ip_scope(point.ip)


def without_peer_id(addr: str) -> str:
    """``addr`` without a trailing ``/p2p/<id>`` (a relayed address keeps its relay's)."""
    head, sep, tail = addr.rpartition("/p2p/")
    return head if sep and "/" not in tail and "/p2p-circuit" not in tail else addr


def with_peer_id(addrs: Iterable[str], peer_id: str) -> tuple[str, ...]:
    return tuple(f"{without_peer_id(a)}/p2p/{peer_id}" for a in addrs)


def loopback_only(listening: Sequence[str]) -> bool:
    """Whether every direct address is on loopback (a swarm on one machine)."""
    scopes = [scope(a) for a in listening]
    direct = [s for s in scopes if s is not None]
    return bool(direct) and all(s is Scope.LOOPBACK for s in direct)


def lan_addrs(listening: Sequence[str]) -> tuple[str, ...]:
    """What mDNS announces: every non-loopback address, or loopback if only that."""
    wide = tuple(a for a in listening if scope(a) is not Scope.LOOPBACK)
    return wide or tuple(listening)


def wide_addrs(
    listening: Sequence[str],
    *,
    mode: Mode,
    reach: Reach,
    confirmed: Sequence[str] = (),
    refuted: Sequence[str] = (),
    public_addrs: Sequence[str] = (),
    circuits: Sequence[str] = (),
) -> tuple[str, ...]:
    """What records and the DHT announce (see the module docstring); no /p2p suffix.

    ``listening``: this node's direct addresses with 0.0.0.0 expanded;
    ``confirmed``/``refuted``: addresses dial-backs reached or could not reach
    (``confirmed`` is used only while the verdict is public); ``circuits``: our
    ``/p2p-circuit`` addresses through relays, announced in every mode.
    """
    base: list[str] = []
    if mode is not Mode.PRIVATE:
        base += public_addrs
        if loopback_only(listening):
            base += listening
        elif mode is Mode.PUBLIC and not public_addrs:
            base += [a for a in listening if scope(a) is not Scope.LOOPBACK]
        else:
            gone = {without_peer_id(a) for a in refuted}
            base += [a for a in listening if scope(a) is Scope.GLOBAL and a not in gone]
    if reach is Reach.PUBLIC and mode is not Mode.PRIVATE:
        base += [a for a in confirmed if scope(a) is not None]
    out: list[str] = []
    for addr in (*base, *circuits):
        addr = without_peer_id(addr)
        if addr and addr not in out:
            out.append(addr)
    return tuple(out[:MAX_WIDE])


def dial_back_candidates(listening: Sequence[str], observed_ips: Iterable[str]) -> tuple[str, ...]:
    """The addresses to ask a peer to dial: each IP peers see us at (a NAT's outside
    address, say) with each port we listen on, then our own addresses.

    A peer dials only those whose IP is the one it sees us connect from, so the
    observed ones come first; loopback ones only on a loopback-only node. At most
    ``MAX_CANDIDATES``.
    """
    points = [p for p in (endpoint(a) for a in listening) if p is not None]
    ports = sorted({p.port for p in points})
    local = loopback_only(listening)
    out: list[str] = []
    for text in observed_ips:
        try:
            ip = ipaddress.ip_address(text)
        except ValueError:
            continue
        if ip.is_loopback and not local:
            continue
        for port in ports:
            out.append(Endpoint(ip, port).addr())
    for point in points:
        if local or not point.ip.is_loopback:
            out.append(point.addr())
    unique: list[str] = []
    for addr in out:
        if addr not in unique:
            unique.append(addr)
    return tuple(unique[:MAX_CANDIDATES])


def own_ips(listening: Sequence[str]) -> frozenset[str]:
    """The IPs of our own addresses (loopback included), as text."""
    return frozenset(str(p.ip) for p in (endpoint(a) for a in listening) if p is not None)
