"""Reaching a peer: direct when we can, through one of its relays when not, and
DCUtR's upgrade of a relayed connection to a hole-punched one.

``Circuits.connect(peer_id, addrs)`` is how membership links a peer. Direct
addresses are dialled with ``host.connect``; when that fails, or only
``/p2p-circuit`` addresses are known, we dial a circuit ourselves with
py-libp2p's ``CircuitV2Transport`` (its swarm drops every ``/p2p-circuit``
address, ``network/swarm.py:824``). The swarm registers the connection and
``new_stream(peer)`` uses it, preferring a direct one once there is one.

At most one relayed connection per peer is made by us: two circuits to one
destination through a py-libp2p relay are coupled (closing the first tears down
the second, ``protocol.py``'s ``_active_relays``); our relays do not couple them
(``relay_service``), other relays may.

DCUtR (``DCUtRProtocol``) runs on every host and tries to punch a hole for each
relayed connection. What we change of it:

- the relayed connection stays as a fallback after a successful punch
  (upstream closes it after 60 s). The peer is protected in the swarm while it
  has a relayed connection, or the swarm's per-peer limit of one connection
  would close one of the two the moment the second arrives;
- which direct connections came from a punch is recorded, so ``kind_of`` tells
  a hole-punched connection from a dialled one, and ``on_direct`` tells the
  owner (to move pooled streams off the relay).

A watcher keeps relayed peers reachable: a relayed connection that closes is
re-dialled through the peer's other relays (with backoff, a bounded number of
times), and one that stops answering our ping (a frozen relay keeps it "open"
for 45 s and more) is closed and re-dialled.

Errors: ``connect`` raises ``PeerUnavailable`` (nothing was sent) when no
address worked; the reasons are logged, never sent to a peer.
"""

from __future__ import annotations

import contextlib
import logging
import random
import weakref
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import multiaddr
import trio
from libp2p.connection_types import ConnectionType
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.relay.circuit_v2.config import RelayConfig, RelayRole
from libp2p.relay.circuit_v2.dcutr import DCUtRProtocol
from libp2p.relay.circuit_v2.protocol import CircuitV2Protocol
from libp2p.relay.circuit_v2.transport import CircuitV2Transport
from libp2p.tools.anyio_service import background_trio_service
from trio_typing import TaskStatus  # libp2p installs trio-typing, whose stubs shadow trio's

from node.errors import PeerUnavailable
from protocols.resilience import Backoff

from .conns import is_inbound, is_relayed, live, transport_addrs
from .ping import ping

log = logging.getLogger(__name__)

Kind = Literal["direct", "hole-punched", "relayed"]
PROTECT_TAG = "swarm-relayed"

DIRECT_TIMEOUT_S = 4.0  # a direct dial, when circuits are there to fall back on
DIRECT_ONLY_TIMEOUT_S = 10.0  # a direct dial, when it is all we have
CIRCUIT_TIMEOUT_S = 6.0  # one circuit dial (relay connect, hop, Noise, yamux)
MAX_CIRCUIT_TRIES = 4  # circuit addresses tried per connect
WATCH_EVERY_S = 1.0
PING_EVERY_S = 5.0
PING_TIMEOUT_S = 3.0
PING_MISSES = 2  # consecutive missed pings that close a relayed connection
MAX_WATCHED = 512
REDIALS = 5  # failed re-dials in a row before a peer is left to membership
REDIAL_BACKOFF = Backoff(base_s=0.5, max_s=8.0)
PINGS_AT_ONCE = 16
# DCUtR's own timeouts are 30 s reads and 10 s dials; a punch either works in
# about a second or not at all here.
DCUTR_READ_S = 10
DCUTR_WRITE_S = 10
DCUTR_DIAL_S = 5
UNILATERAL_S = 1.5


def is_circuit(addr: str) -> bool:
    return "/p2p-circuit" in addr


def relay_of(addr: str) -> str | None:
    """The relay's peer id in a circuit address, or None."""
    head, found, _ = addr.partition("/p2p-circuit")
    if not found or "/p2p/" not in head:
        return None
    return head.rsplit("/p2p/", 1)[1].split("/", 1)[0] or None


def connection_kind(conn: Any, punched: weakref.WeakSet[Any]) -> Kind:
    if conn in punched:
        return "hole-punched"
    return "relayed" if is_relayed(conn) else "direct"


def best_kind(kinds: Sequence[Kind]) -> Kind | None:
    """The kind of the connection new streams use: a direct one before a relayed one."""
    order: tuple[Kind, ...] = ("hole-punched", "direct", "relayed")
    return next((kind for kind in order if kind in kinds), None)


class _CircuitDialer(CircuitV2Transport):
    """py-libp2p's circuit transport, dialling only (stop role, no reservations).

    Upstream stores every circuit address it dialled in the peerstore with a TTL
    of 2**31 s and tries those first on every later dial, each without a
    timeout (``transport.py``, ``_store_multiaddrs`` and ``dial_peer_info``): a
    dead relay would be tried before the live one forever. We store none.
    """

    def _store_multiaddrs(self, peer_info: PeerInfo, relay_peer_id: ID) -> None:
        return None


class _Punch(DCUtRProtocol):
    """DCUtR that keeps the relayed connection and records which connections it made."""

    def __init__(self, host: Any, on_punched: Callable[[ID, list[Any]], Awaitable[None]]) -> None:
        super().__init__(
            host, read_timeout=DCUTR_READ_S, write_timeout=DCUTR_WRITE_S, dial_timeout=DCUTR_DIAL_S
        )
        self._on_punched = on_punched
        self.attempts = 0
        self.successes = 0

    async def _perform_hole_punch(
        self, peer_id: ID, addrs: list[multiaddr.Multiaddr], as_responder: bool = False
    ) -> bool:
        before = {id(c) for c in live(self.host, peer_id)}
        self.attempts += 1
        ok = await super()._perform_hole_punch(peer_id, addrs, as_responder)
        if ok:
            self.successes += 1
            new = [c for c in live(self.host, peer_id) if id(c) not in before]
            await self._on_punched(peer_id, [c for c in new if not is_relayed(c)])
        return bool(ok)

    def _schedule_relay_close(self, peer_id: ID) -> None:
        return None  # the relayed connection stays, as a fallback

    async def initiate_hole_punch(self, peer_id: ID) -> bool:
        # Upstream drives a punch from both ends of a relayed connection, so two
        # sessions run at once and two direct connections may result. The spec
        # has the side the circuit came to start it: so do we.
        relayed = [c for c in live(self.host, peer_id) if is_relayed(c)]
        if relayed and not any(is_inbound(c) for c in relayed):
            return False
        return bool(await super().initiate_hole_punch(peer_id))

    async def _try_unilateral_upgrade(self, peer_id: ID) -> bool:
        # A plain dial of the peer's other addresses (spec step 0) succeeds at once
        # on a shared LAN; across NATs it only hangs (a SYN to a private address
        # of another home is never answered) and would delay the punch by the
        # whole dial timeout.
        with trio.move_on_after(UNILATERAL_S):
            return bool(await super()._try_unilateral_upgrade(peer_id))
        return bool(await self._verify_direct_connection(peer_id))


@dataclass(slots=True)
class _Watch:
    """A peer we reach through a relay: how to reach it again, and how it is doing."""

    circuits: tuple[str, ...]  # its circuit addresses, as last given to connect
    misses: int = 0
    failures: int = 0
    next_ping: float = 0.0
    next_redial: float = 0.0
    outbound: bool = True  # we dialled it (we can re-dial); else it came to us


@dataclass(slots=True)
class CircuitStats:
    circuit_dials: int = 0
    circuit_dial_failures: int = 0
    redials: int = 0
    closed_unresponsive: int = 0
    failed_relays: dict[str, float] = field(default_factory=dict)  # relay -> when it failed


class Circuits:
    """Direct and relayed connections to peers, their kinds, and DCUtR (module docstring)."""

    def __init__(
        self,
        host: Any,
        relay: CircuitV2Protocol,
        *,
        dcutr: bool = True,
        guesses: Callable[[str], Sequence[str]] = lambda _peer: (),
        rng: random.Random | None = None,
    ) -> None:
        """``guesses(peer_id)``: circuit addresses to try when the peer's own fail
        (relays whose records say the peer holds a reservation with them)."""
        self._host = host
        self._guesses = guesses
        self._self_id = host.get_id().to_base58()
        self._dialer = _CircuitDialer(host, relay, RelayConfig(roles=RelayRole.STOP))
        self._punch = _Punch(host, self._punched) if dcutr else None
        self._punched_conns: weakref.WeakSet[Any] = weakref.WeakSet()
        self._watched: dict[str, _Watch] = {}
        self._rng = rng or random.Random()
        self.stats = CircuitStats()
        # Awaited with a peer's id when a punched connection to it is up: pooled
        # streams on the relayed connection may move to it.
        self.on_direct: Callable[[str], Awaitable[None]] | None = None
        # Called with a peer's id when the watcher re-dialled it: membership links it
        # again at once (its failed jobs marked it unreachable meanwhile).
        self.on_reconnected: Callable[[str], None] | None = None

    # -- running ---------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            if self._punch is not None:
                nursery.start_soon(self._run_punch)
                await self._punch.event_started.wait()
            nursery.start_soon(self._watch, nursery)
            task_status.started()

    async def _run_punch(self) -> None:
        assert self._punch is not None
        async with background_trio_service(self._punch):
            await trio.sleep_forever()

    # -- connecting --------------------------------------------------------------

    async def connect(self, peer_id: str, addrs: Sequence[str]) -> None:
        """Make sure there is a connection to ``peer_id``: the one there is, else a
        direct dial of ``addrs`` (``/p2p/<peer_id>`` optional), else a circuit
        through the relays they name, else through the relays ``guesses`` names.
        PeerUnavailable if none gives one, or there is nothing to dial. A relayed
        connection that stopped answering is closed by the watcher, not here."""
        pid = ID.from_base58(peer_id)
        if live(self._host, pid):
            return
        texts = [_without_self(str(a), peer_id) for a in addrs]
        direct = [a for a in texts if not is_circuit(a)]
        circuits = self._circuits_of(peer_id, texts)
        if circuits:
            self._remember(peer_id, circuits, outbound=True)
        reasons: list[str] = []
        if direct:
            try:
                with trio.fail_after(DIRECT_TIMEOUT_S if circuits else DIRECT_ONLY_TIMEOUT_S):
                    await self._host.connect(
                        PeerInfo(pid, [multiaddr.Multiaddr(a) for a in direct])
                    )
                return
            except trio.TooSlowError:
                reasons.append("direct: no connection in time")
            except Exception as exc:  # libp2p raises many types for a failed dial
                reasons.append(f"direct: {type(exc).__name__}")
        guessed = self._circuits_of(peer_id, self._guesses(peer_id))
        tries = [*self._ordered(circuits), *(a for a in guessed if a not in circuits)]
        if not (direct or tries):
            # Not even a guess. (A stream opened anyway would dial what the peerstore
            # holds: behind NAT, private addresses from identify, where a SYN hangs.)
            raise PeerUnavailable(f"cannot reach {peer_id}: no address to dial")
        for addr in tries[:MAX_CIRCUIT_TRIES]:
            try:
                await self._dial_circuit(pid, addr)
                if addr not in circuits:
                    self._remember(peer_id, (addr, *circuits), outbound=True)
                return
            except Exception as exc:
                reasons.append(f"via {relay_of(addr)}: {type(exc).__name__}")
        raise PeerUnavailable(
            f"cannot reach {peer_id}: " + ("; ".join(reasons) or "no address to dial")
        )

    def _circuits_of(self, peer_id: str, addrs: Sequence[str]) -> tuple[str, ...]:
        """The circuit addresses among ``addrs``, without ``/p2p/<peer_id>``, skipping
        those through this node itself."""
        out = []
        for addr in addrs:
            text = _without_self(str(addr), peer_id)
            if is_circuit(text) and relay_of(text) not in (None, self._self_id):
                out.append(text)
        return tuple(dict.fromkeys(out))

    async def _dial_circuit(self, pid: ID, addr: str) -> None:
        self.stats.circuit_dials += 1
        relay = relay_of(addr)
        try:
            with trio.fail_after(CIRCUIT_TIMEOUT_S):
                conn = await self._dialer.dial(multiaddr.Multiaddr(f"{addr}/p2p/{pid}"))
        except BaseException:
            self.stats.circuit_dial_failures += 1
            if relay is not None:
                self.stats.failed_relays[relay] = trio.current_time()
                _trim(self.stats.failed_relays)
            raise
        # The swarm derives the kind from the raw connection; say it outright, so
        # the swarm's choice of connection (direct first) and ours agree.
        if not is_relayed(conn) and hasattr(conn, "set_transport_info"):
            conn.set_transport_info(
                [multiaddr.Multiaddr(f"{addr}/p2p/{pid}")], ConnectionType.RELAYED
            )
        self._host.get_network().protect(pid, PROTECT_TAG)
        log.info("connected to %s through relay %s", pid, relay)

    def _ordered(self, circuits: Sequence[str]) -> list[str]:
        """Relays we hold a connection to first, then ones that did not fail lately."""
        failed = self.stats.failed_relays

        def rank(addr: str) -> tuple[int, float]:
            relay = relay_of(addr)
            try:
                up = relay is not None and bool(live(self._host, ID.from_base58(relay)))
            except Exception:  # not a peer id: tried last
                up = False
            return (0 if up else 1, failed.get(relay or "", -1e9))

        return sorted(dict.fromkeys(circuits), key=rank)

    # -- inbound relayed connections, punches ---------------------------------------

    def on_relayed(self, peer: ID) -> None:
        """An inbound circuit from ``peer`` was upgraded (the relay protocol calls this)."""
        self._host.get_network().protect(peer, PROTECT_TAG)
        self._remember(peer.to_base58(), (), outbound=False)

    async def _punched(self, peer: ID, conns: list[Any]) -> None:
        for conn in conns:
            self._punched_conns.add(conn)
        log.info("hole punched to %s", peer)
        if conns and self.on_direct is not None:
            await self.on_direct(peer.to_base58())

    def _remember(self, peer_id: str, circuits: tuple[str, ...], *, outbound: bool) -> None:
        watch = self._watched.get(peer_id)
        if watch is None:
            if len(self._watched) >= MAX_WATCHED:
                return  # a bound: beyond it, membership's heartbeats find dead peers
            self._watched[peer_id] = _Watch(circuits, outbound=outbound)
            return
        if circuits:
            watch.circuits = circuits
        watch.outbound = watch.outbound or outbound

    # -- the watcher ------------------------------------------------------------------

    async def _watch(self, nursery: trio.Nursery) -> None:
        """Each second, a check of every watched peer not being checked already (at
        most MAX_WATCHED checks, each in this service's nursery)."""
        limiter = trio.CapacityLimiter(PINGS_AT_ONCE)
        checking: set[str] = set()

        async def check(peer_id: str, watch: _Watch) -> None:
            try:
                await self._check(peer_id, watch, limiter)
            finally:
                checking.discard(peer_id)

        while True:
            await trio.sleep(WATCH_EVERY_S)
            for peer_id, watch in list(self._watched.items()):
                if peer_id not in checking:
                    checking.add(peer_id)
                    nursery.start_soon(check, peer_id, watch)

    async def _check(self, peer_id: str, watch: _Watch, limiter: trio.CapacityLimiter) -> None:
        now = trio.current_time()
        pid = ID.from_base58(peer_id)
        conns = live(self._host, pid)
        relayed = [c for c in conns if is_relayed(c)]
        if not relayed:
            self._host.get_network().unprotect(pid, PROTECT_TAG)
        if conns and len(relayed) < len(conns):
            watch.misses = watch.failures = 0
            return  # a direct connection carries it
        if relayed:
            if now < watch.next_ping:
                return
            watch.next_ping = now + PING_EVERY_S
            async with limiter:
                alive = await ping(self._host, pid, PING_TIMEOUT_S) is not None
            watch.misses = 0 if alive else watch.misses + 1
            if watch.misses < PING_MISSES:
                if watch.misses:
                    watch.next_ping = trio.current_time()  # a miss is checked again at once
                return
            log.info("relayed connection to %s does not answer; closing it", peer_id)
            self.stats.closed_unresponsive += 1
            await self._close_relayed(pid)
        if not (watch.outbound and watch.circuits):
            self._watched.pop(peer_id, None)
            return
        if now < watch.next_redial:
            return
        log.info("no connection to %s left; re-dialling it through its relays", peer_id)
        try:
            self.stats.redials += 1
            await self.connect(peer_id, watch.circuits)
            watch.misses = watch.failures = 0
            if self.on_reconnected is not None:
                self.on_reconnected(peer_id)
        except Exception as exc:
            watch.failures += 1
            log.info("re-dial of %s failed (%d): %s", peer_id, watch.failures, exc)
            if watch.failures >= REDIALS:
                self._watched.pop(peer_id, None)
                return
            watch.next_redial = trio.current_time() + REDIAL_BACKOFF.delay(
                watch.failures, self._rng
            )

    async def _close_relayed(self, pid: ID) -> None:
        for conn in live(self._host, pid):
            if is_relayed(conn):
                with trio.move_on_after(2.0):
                    with contextlib.suppress(Exception):
                        await conn.close()
        self._host.get_network().unprotect(pid, PROTECT_TAG)

    def forget(self, peer_id: str) -> None:
        """Stop keeping ``peer_id`` reachable (it left the swarm)."""
        self._watched.pop(peer_id, None)

    # -- what kind each connection is ---------------------------------------------------

    def kind_of(self, peer_id: str) -> Kind | None:
        """The kind of connection new streams to ``peer_id`` use; None: not connected."""
        try:
            pid = ID.from_base58(peer_id)
        except Exception:
            return None
        return best_kind([connection_kind(c, self._punched_conns) for c in live(self._host, pid)])

    def kinds(self) -> dict[str, Kind]:
        """Every connected peer's kind (``kind_of``), by peer id."""
        out: dict[str, Kind] = {}
        for pid in list(self._host.get_network().connections):
            kind = self.kind_of(pid.to_base58())
            if kind is not None:
                out[pid.to_base58()] = kind
        return out

    def relayed_via(self) -> dict[str, str]:
        """For each peer connected through a relay only, that relay's peer id."""
        out: dict[str, str] = {}
        for peer_id, kind in self.kinds().items():
            if kind != "relayed":
                continue
            for conn in live(self._host, ID.from_base58(peer_id)):
                relay = next((r for r in map(relay_of, transport_addrs(conn)) if r), None)
                if relay is not None:
                    out[peer_id] = relay
                    break
        return out

    def describe(self) -> dict[str, Any]:
        """For ``swarm status``: each peer's kind, hole punches, circuit dials."""
        s = self.stats
        return {
            "connections": self.kinds(),
            "relayed_via": self.relayed_via(),
            "hole_punch": {
                "attempts": self._punch.attempts if self._punch else 0,
                "successes": self._punch.successes if self._punch else 0,
            },
            "circuit_dials": s.circuit_dials,
            "circuit_dial_failures": s.circuit_dial_failures,
            "redials": s.redials,
            "closed_unresponsive": s.closed_unresponsive,
        }


def _without_self(addr: str, peer_id: str) -> str:
    return addr.removesuffix(f"/p2p/{peer_id}")


def _trim(failed: dict[str, float], keep: int = 64) -> None:
    while len(failed) > keep:
        del failed[min(failed, key=failed.__getitem__)]
