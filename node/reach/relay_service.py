"""Circuit relay v2 on this host: the hop service public nodes offer, and the stop
side every node needs to accept circuits.

One ``CircuitV2Protocol`` runs per host. Its stop handler is always on (a NATed
node is reached through circuits that end here). Its hop handler is registered
when the relay service is enabled, but a hop request is served only while this
node knows itself publicly reachable (``is_public() is True``) and the peer may
use this node (an allow-list); else it is refused with PERMISSION_DENIED, and
no reason text reaches the peer.

What we change of py-libp2p 0.8.1's relay (``libp2p/relay/circuit_v2/``):

- The data pump is ours (``_relay_data``). Upstream's ends a circuit by closing
  the streams it finds under the destination's peer id in ``_active_relays``
  (``protocol.py``, the ``finally`` of ``_relay_data``): with two circuits to one
  destination, the end of the first tears down the second. Ours closes only the
  two streams of its own circuit. It also enforces the bandwidth limit
  (``HopConfig.max_bandwidth_per_circuit`` is never read upstream), checks the
  duration limit while a circuit is idle (upstream checks it only after a
  read returns), and ends on yamux EOF at once (upstream retries a yamux EOF
  three times as an "unexpected error", ~0.6 s and three error logs per close).
- Reservations of peers that are no longer connected are dropped when slots are
  counted (upstream keeps them until their TTL, so departed peers hold slots).

Limits (``RelayServiceConfig``): reservation slots, a reservation's duration,
circuits per reservation, and per circuit its duration, bytes (both directions
together) and bandwidth (bytes per second, both directions together).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import multiaddr
import trio
from libp2p.abc import INetStream
from libp2p.connection_types import ConnectionType
from libp2p.network.stream.exceptions import StreamEOF
from libp2p.peer.id import ID
from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage
from libp2p.relay.circuit_v2.protocol import CircuitV2Protocol
from libp2p.relay.circuit_v2.protocol_buffer import StatusCode, to_proto_status
from libp2p.relay.circuit_v2.resources import RelayLimits, RelayResourceManager
from libp2p.relay.circuit_v2.utils import write_delimited_msg
from libp2p.tools.anyio_service import background_trio_service
from trio_typing import TaskStatus  # libp2p installs trio-typing, whose stubs shadow trio's

from protocols.config import Table
from protocols.errors import ConfigError

log = logging.getLogger(__name__)

READ_MAX = 64 * 1024  # one yamux frame at most
WRITE_TIMEOUT_S = 15.0
REFUSE_TIMEOUT_S = 2.0
# After one direction of a circuit ends cleanly, the other gets this long to end
# too (its peer closes the connection both ways) before both streams are reset.
HALF_CLOSE_GRACE_S = 5.0
CLOSE_TIMEOUT_S = 2.0
# Below this a sender's yamux window (256 KiB) would stay full past yamux's 5 s
# write timeout and the stream would be reset under it (LIBP2P.md, defect 4).
MIN_BANDWIDTH = 64 * 1024
MIB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class RelayServiceConfig:
    """The relay (hop) service public nodes offer, and its limits. 0 = unlimited
    for ``circuit_s``, ``circuit_bytes`` and ``circuit_bandwidth``."""

    enabled: bool = True  # offered while this node is publicly reachable
    reservations: int = 64  # slots: peers holding a reservation at once
    reservation_s: int = 900  # a reservation's lifetime; holders renew before it ends
    circuits_per_peer: int = 8  # circuits open at once to one reserving peer
    circuit_s: int = 3600  # a circuit's lifetime
    circuit_bytes: int = 256 * MIB  # per circuit, both directions together
    circuit_bandwidth: int = 8 * MIB  # bytes/s per circuit, both directions together

    def __post_init__(self) -> None:
        if not 1 <= self.reservations <= 100_000:
            raise ConfigError("relay reservations must be 1 to 100000")
        if not 10 <= self.reservation_s <= 86_400:
            raise ConfigError("relay reservation_s must be 10 to 86400 seconds")
        if not 1 <= self.circuits_per_peer <= 1024:
            raise ConfigError("relay circuits_per_peer must be 1 to 1024")
        if not 0 <= self.circuit_s <= 86_400:
            raise ConfigError("relay circuit_s must be 0 (unlimited) to 86400 seconds")
        if self.circuit_bytes < 0:
            raise ConfigError("relay circuit_bytes must be >= 0 (0: unlimited)")
        if self.circuit_bandwidth and self.circuit_bandwidth < MIN_BANDWIDTH:
            raise ConfigError(
                f"relay circuit_bandwidth must be 0 (unlimited) or >= {MIN_BANDWIDTH} bytes/s"
            )

    @classmethod
    def from_table(cls, table: Table, *, enabled: bool = True) -> RelayServiceConfig:
        """config.toml's ``[relay]`` table: any of the limits, each optional."""
        base = cls()
        values = {
            name: table.integer(name, getattr(base, name), high=2**62)
            for name in cls.__dataclass_fields__
            if name != "enabled"
        }
        table.done()
        return cls(enabled=enabled, **values)

    def limits(self) -> RelayLimits:
        return RelayLimits(
            duration=self.circuit_s,
            data=self.circuit_bytes,
            max_circuit_conns=self.circuits_per_peer,
            max_reservations=self.reservations,
            reservation_ttl=self.reservation_s,
        )

    def describe(self) -> dict[str, int]:
        """The limits as a record or status shows them."""
        return {
            "reservations": self.reservations,
            "reservation_s": self.reservation_s,
            "circuits_per_peer": self.circuits_per_peer,
            "circuit_s": self.circuit_s,
            "circuit_bytes": self.circuit_bytes,
            "circuit_bandwidth": self.circuit_bandwidth,
        }


class Throttle:
    """A token bucket: ``take(n)`` returns once ``n`` bytes fit under ``rate``/s.

    The bucket holds at most one second's worth (the burst). A take larger than
    the burst is let through once the bucket is full and leaves it in debt, so
    one big read never blocks forever. ``rate`` 0: no limit.
    """

    def __init__(self, rate: int, clock: Callable[[], float] = trio.current_time) -> None:
        self.rate = rate
        self._clock = clock
        self._tokens = float(rate)
        self._at = clock() if rate else 0.0

    def wait_for(self, n: int) -> float:
        """Seconds to wait before ``n`` bytes may pass (0 when they may now); takes them."""
        if not self.rate:
            return 0.0
        now = self._clock()
        self._tokens = min(float(self.rate), self._tokens + (now - self._at) * self.rate)
        self._at = now
        need = min(float(n), float(self.rate))  # a take past the burst waits for a full one
        wait = max(0.0, (need - self._tokens) / self.rate)
        self._tokens -= n
        return wait

    async def take(self, n: int) -> None:
        wait = self.wait_for(n)
        if wait:
            await trio.sleep(wait)


@dataclass(slots=True)
class _Circuit:
    """One circuit's shared state: its two pumps see the same object."""

    left: int | None  # bytes the circuit may still carry; None: unlimited
    throttle: Throttle
    ended: int = 0
    done: trio.Event | None = None
    scopes: tuple[trio.CancelScope, ...] = ()


class _Reservations(RelayResourceManager):
    """Upstream's reservation book, dropping departed peers when slots are counted."""

    def _clean_expired(self) -> None:
        super()._clean_expired()
        gone = [pid for pid in self._reservations if not self._is_peer_connected(pid)]
        for pid in gone:
            del self._reservations[pid]


class RelayProtocol(CircuitV2Protocol):
    """py-libp2p's circuit relay v2, gated and with our own pump (module docstring)."""

    def __init__(
        self,
        host: Any,
        config: RelayServiceConfig,
        *,
        serving: Callable[[], bool],
        member: Callable[[str], bool],
        on_relayed: Callable[[ID], None] | None = None,
    ) -> None:
        super().__init__(host, limits=config.limits(), allow_hop=config.enabled)
        self.resource_manager = _Reservations(self.limits, host)
        self.config = config
        self._serving = serving
        self._member = member
        self.on_relayed = on_relayed  # an inbound circuit to this node was upgraded
        self._circuits: dict[frozenset[int], _Circuit] = {}
        self.refused = 0  # hop requests refused (not serving, or not a member)
        self.circuits_total = 0
        self.closed_for: dict[str, int] = {"bytes": 0, "duration": 0}
        self.bytes_relayed = 0

    @property
    def circuits_open(self) -> int:
        return len(self._circuits)

    def reserved(self) -> list[str]:
        """The peers holding a live reservation here, by peer id."""
        book = self.resource_manager._reservations
        return sorted(pid.to_base58() for pid, r in book.items() if not r.is_expired())

    # -- hop: gated ------------------------------------------------------------------

    async def _handle_hop_stream(self, stream: INetStream) -> None:
        peer = str(stream.muxed_conn.peer_id)
        if not (self._serving() and self._member(peer)):
            self.refused += 1
            await self._refuse(stream)
            return
        await super()._handle_hop_stream(stream)

    async def _handle_reserve(self, stream: INetStream, msg: HopMessage) -> None:
        # Upstream reserves for the peer id a RESERVE names, when it names one
        # (protocol.py, _handle_reserve): any peer could take slots in another's
        # name. The spec's RESERVE names none; reserve for the connection's peer.
        msg.ClearField("peer")
        await super()._handle_reserve(stream, msg)

    async def _refuse(self, stream: INetStream) -> None:
        try:
            with trio.move_on_after(REFUSE_TIMEOUT_S):
                status = to_proto_status(StatusCode.PERMISSION_DENIED)
                await write_delimited_msg(stream, HopMessage(type=HopMessage.STATUS, status=status))
                await stream.close()
        except Exception:  # the peer went away: nothing to tell it
            await _reset(stream)

    # -- stop: tell our owner of each inbound circuit ---------------------------------

    async def handle_incoming_connection(self, stream: INetStream, remote_peer_id: bytes) -> None:
        await super().handle_incoming_connection(stream, remote_peer_id)
        peer = ID(remote_peer_id)
        # Upstream tags the connection /p2p/<this host>/p2p-circuit/p2p/<peer>
        # (protocol.py, handle_incoming_connection: "relay" is host.get_id()). The
        # relay is the peer the stop stream came from: say so.
        relay = stream.muxed_conn.peer_id
        wrong = f"/p2p/{self.host.get_id()}/p2p-circuit/p2p/{peer}"
        right = multiaddr.Multiaddr(f"/p2p/{relay}/p2p-circuit/p2p/{peer}")
        conns: list[Any] = list(self.host.get_network().connections.get(peer) or [])
        for conn in conns:
            tagged = getattr(conn, "_actual_transport_addresses", None) or ()
            if [str(a) for a in tagged] == [wrong]:
                conn.set_transport_info([right], ConnectionType.RELAYED)
        if self.on_relayed is not None:
            self.on_relayed(peer)

    # -- the pump ------------------------------------------------------------------

    async def _relay_data(
        self,
        src_stream: INetStream,
        dst_stream: INetStream,
        peer_id: ID,
        deadline: float | None = None,
        circuit_data_limit: list[int] | None = None,
    ) -> None:
        """Move bytes from ``src_stream`` to ``dst_stream`` until either ends or a
        limit is hit; the circuit's other direction runs the same, on the same
        ``_Circuit``. ``deadline`` is upstream's (``time.monotonic``)."""
        key = frozenset((id(src_stream), id(dst_stream)))
        circuit = self._circuits.get(key)
        if circuit is None:
            data = self.config.circuit_bytes
            circuit = _Circuit(data if data else None, Throttle(self.config.circuit_bandwidth))
            circuit.done = trio.Event()
            self._circuits[key] = circuit
            self.circuits_total += 1
        clean = False
        with trio.CancelScope() as scope:
            circuit.scopes = (*circuit.scopes, scope)
            clean = await self._pump(src_stream, dst_stream, circuit, deadline)
        circuit.ended += 1
        if circuit.ended == 1:
            if clean:
                # Forward the EOF; give the other direction a moment to end as well.
                await _close_write(dst_stream)
                assert circuit.done is not None
                with trio.move_on_after(HALF_CLOSE_GRACE_S):
                    await circuit.done.wait()
            for other in circuit.scopes:
                other.cancel()
        else:
            assert circuit.done is not None
            circuit.done.set()
        if circuit.ended == 2 or not clean:
            self._circuits.pop(key, None)
            # Upstream's own bookkeeping of this circuit (ours ends it; its entries
            # would otherwise stay, one per peer id ever relayed).
            mine = {id(src_stream), id(dst_stream)}
            for pid, pair in list(self._active_relays.items()):
                if {id(s) for s in pair if s is not None} & mine:
                    del self._active_relays[pid]
            for stream in (src_stream, dst_stream):
                await (_close(stream) if clean else _reset(stream))
        log.debug("circuit to %s: one direction ended (clean=%s)", peer_id, clean)

    async def _pump(
        self, src: INetStream, dst: INetStream, circuit: _Circuit, deadline: float | None
    ) -> bool:
        """True when ``src`` ended (EOF); False on a limit or a broken stream."""
        while True:
            left_s = None if deadline is None else deadline - time.monotonic()
            if left_s is not None and left_s <= 0:
                self.closed_for["duration"] += 1
                return False
            try:
                with trio.move_on_after(left_s if left_s is not None else math.inf) as timer:
                    data = await src.read(READ_MAX)
            except StreamEOF:
                return True
            except Exception:  # a reset or a broken connection ends this direction
                return False
            if timer.cancelled_caught:
                continue  # the duration ran out while idle: the check above ends it
            if not data:
                return True
            if circuit.left is not None:
                if len(data) > circuit.left:
                    self.closed_for["bytes"] += 1
                    return False
                circuit.left -= len(data)
            await circuit.throttle.take(len(data))
            try:
                with trio.fail_after(WRITE_TIMEOUT_S):
                    await dst.write(data)
            except Exception:  # the other side went away (or a timeout)
                return False
            self.bytes_relayed += len(data)


async def _close_write(stream: INetStream) -> None:
    try:
        with trio.move_on_after(CLOSE_TIMEOUT_S):
            await stream.close_write()  # type: ignore[attr-defined]  # NetStream has it
    except Exception:
        pass


async def _close(stream: INetStream) -> None:
    try:
        with trio.move_on_after(CLOSE_TIMEOUT_S):
            await stream.close()
            return
    except Exception:
        pass
    await _reset(stream)


async def _reset(stream: INetStream) -> None:
    try:
        with trio.move_on_after(CLOSE_TIMEOUT_S):
            await stream.reset()
    except Exception:
        pass


class RelayService:
    """Circuit relay v2 on this host, as a service of the daemon's nursery.

    ``is_public``: whether this node is publicly reachable (None: not known);
    hop requests are served only while it says True. ``member``: whether a peer
    (base58 id) may use this node.
    """

    def __init__(
        self,
        host: Any,
        config: RelayServiceConfig = RelayServiceConfig(),
        *,
        is_public: Callable[[], bool | None],
        member: Callable[[str], bool] = lambda _peer: True,
    ) -> None:
        self._host = host
        self.config = config
        self._is_public = is_public
        self.protocol = RelayProtocol(host, config, serving=self.offering, member=member)

    def offering(self) -> bool:
        """Whether this node serves hop requests now."""
        return self.config.enabled and self._is_public() is True

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with background_trio_service(self.protocol):
            await self.protocol.event_started.wait()
            task_status.started()
            await trio.sleep_forever()

    def record_entry(self) -> dict[str, Any] | None:
        """What this node's capability record says of its relay (None: not offered):
        its limits, and the peers that hold a reservation here now (at most
        ``reservations`` of them), so that a peer that knows of one of them but not
        its circuit address yet can dial it through us. A change of that list
        changes the record's version: linked peers pull the record, and with it
        the peer sample, at their next heartbeat."""
        if not self.offering():
            return None
        return {**self.config.describe(), "reserved": self.protocol.reserved()}

    def describe(self) -> dict[str, Any]:
        """For ``swarm status``."""
        p = self.protocol
        return {
            "enabled": self.config.enabled,
            "offering": self.offering(),
            "limits": self.config.describe(),
            "reservations": len(p.reserved()),
            "circuits_open": p.circuits_open,
            "circuits_total": p.circuits_total,
            "closed_for_limits": dict(p.closed_for),
            "refused": p.refused,
            "bytes_relayed": p.bytes_relayed,
        }


def circuit_addr(relay_addr: str, self_id: str) -> str:
    """``relay_addr`` (``/ip4/R/tcp/P/p2p/R``) + ``/p2p-circuit/p2p/SELF``."""
    return str(multiaddr.Multiaddr(relay_addr).encapsulate(f"/p2p-circuit/p2p/{self_id}"))
