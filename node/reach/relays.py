"""Reservations on relays, for a node that is not publicly reachable.

A node behind NAT can be dialled only through a relay it holds a reservation on
(circuit relay v2). ``Relays`` keeps ``want`` (default 2) reservations, on
relays chosen from the linked public peers that offer one
(``candidates()``), and publishes this node's circuit addresses
(``/ip4/R/tcp/P/p2p/R/p2p-circuit/p2p/SELF``, ``circuit_addrs``) for the
addresses it announces.

py-libp2p gives no help past the first reservation: nothing reconnects or
re-reserves after a relay restarts, its own refresher spins without sleeping
while a relay is down (``transport.py``, ``_refresh_reservations_worker``
sleeps ``max(0, expiry - now - 30)``), and a relay frozen without closing its
connection stays "open" for 45 s and more. So each reservation is held by a
task of ours that:

- connects to the relay and reserves (our own RESERVE exchange, under a
  deadline), then renews at ``renew_at`` of the reservation's lifetime;
- pings the relay every ``ping_every_s`` under ``trio.fail_after``; after
  ``misses`` missed pings the relay counts as gone, and its connection is
  closed, so circuits through it end now rather than in 45 s;
- notices the connection it reserved on closing (a relay that restarted has
  forgotten every reservation: they are held per connection) and reserves again
  at once on a new one.

A relay that failed is retried after a backoff (full jitter, exponential, to
``backoff_max_s``); meanwhile another candidate takes its place. A node that
learns it is public (``is_public() is True``) drops its reservations.
Everything is bounded: ``want`` holders, ``MAX_FAILED`` remembered failures.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import multiaddr
import trio
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP_PROTOCOL
from libp2p.relay.circuit_v2.protocol_buffer import StatusCode
from libp2p.relay.circuit_v2.utils import read_delimited_msg, write_delimited_msg
from trio_typing import TaskStatus  # libp2p installs trio-typing, whose stubs shadow trio's

from node.errors import NodeError, PeerUnavailable
from protocols.errors import ConfigError
from protocols.resilience import Backoff

from .conns import is_relayed, live
from .ping import ping

log = logging.getLogger(__name__)

# A linked peer that offers a relay: its peer id and its direct addresses.
Candidate = tuple[str, Sequence[str]]
MAX_FAILED = 64
TICK_S = 1.0
CLOSE_TIMEOUT_S = 2.0


class ReservationRefused(NodeError):
    """The relay answered our RESERVE with something other than OK."""


@dataclass(frozen=True, slots=True)
class RelaysConfig:
    want: int = 2  # reservations held at once
    ping_every_s: float = 5.0
    ping_timeout_s: float = 3.0
    misses: int = 2  # missed pings in a row after which a relay is gone
    renew_at: float = 0.5  # of a reservation's lifetime
    connect_timeout_s: float = 8.0
    reserve_timeout_s: float = 8.0
    backoff_base_s: float = 1.0
    backoff_max_s: float = 8.0

    def __post_init__(self) -> None:
        if not 0 <= self.want <= 16:
            raise ConfigError("relays.want must be 0 to 16")
        if not 0 < self.ping_timeout_s <= self.ping_every_s:
            raise ConfigError("relays: ping_timeout_s must be positive and <= ping_every_s")
        if self.misses < 1:
            raise ConfigError("relays.misses must be >= 1")
        if not 0.1 <= self.renew_at <= 0.9:
            raise ConfigError("relays.renew_at must be 0.1 to 0.9 (of the lifetime)")
        if self.connect_timeout_s <= 0 or self.reserve_timeout_s <= 0:
            raise ConfigError("relays: timeouts must be positive")

    @property
    def backoff(self) -> Backoff:
        return Backoff(base_s=self.backoff_base_s, max_s=self.backoff_max_s)


@dataclass(slots=True)
class Held:
    """A reservation this node holds."""

    relay: str  # peer id
    addr: str  # where we reached it: /ip4/R/tcp/P/p2p/R
    expires: float  # wall clock (epoch seconds), as the relay said
    since: float  # trio clock
    conn: Any  # the connection it was made on: the relay holds it per connection
    reserved_at: float  # wall clock of the last RESERVE answered
    rtt_s: float | None = None
    renewals: int = 0


@dataclass(slots=True)
class _Failed:
    attempts: int
    retry_at: float  # trio clock
    reason: str


class Relays:
    """Holds reservations on relays while this node is not known to be public."""

    def __init__(
        self,
        host: Any,
        config: RelaysConfig = RelaysConfig(),
        *,
        is_public: Callable[[], bool | None],
        candidates: Callable[[], Sequence[Candidate]],
        rng: random.Random | None = None,
    ) -> None:
        self._host = host
        self.config = config
        self._is_public = is_public
        self._candidates = candidates
        self._rng = rng or random.Random()
        self.self_id: str = host.get_id().to_base58()
        self._held: dict[str, Held] = {}
        self._holders: dict[str, trio.CancelScope] = {}
        self._failed: dict[str, _Failed] = {}
        self._changed = trio.Event()
        self.lost = 0  # reservations that ended other than by our choice

    # -- what others read ----------------------------------------------------------

    def circuit_addrs(self) -> tuple[str, ...]:
        """This node's addresses through the relays it holds, ordered by relay id."""
        return tuple(
            f"{h.addr}/p2p-circuit/p2p/{self.self_id}" for _, h in sorted(self._held.items())
        )

    def held(self) -> tuple[str, ...]:
        return tuple(sorted(self._held))

    async def wait_changed(self) -> None:
        """Until the reservations held next change."""
        await self._changed.wait()

    def _change(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def describe(self) -> dict[str, Any]:
        """For ``swarm status``: relays held, and those failing now."""
        now, wall = trio.current_time(), time.time()
        return {
            "reserving": self._is_public() is not True,
            "want": self.config.want,
            "held": [
                {
                    "relay": h.relay,
                    "addr": h.addr,
                    "expires_in_s": round(h.expires - wall, 1),
                    "held_s": round(now - h.since, 1),
                    "rtt_ms": None if h.rtt_s is None else round(h.rtt_s * 1000, 2),
                    "renewals": h.renewals,
                }
                for _, h in sorted(self._held.items())
            ],
            "failing": {
                relay: {"attempts": f.attempts, "reason": f.reason}
                for relay, f in sorted(self._failed.items())
            },
            "lost": self.lost,
        }

    # -- the supervisor ------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                if self._is_public() is True or self.config.want == 0:
                    for scope in self._holders.values():
                        scope.cancel()
                else:
                    for relay, addrs in self._pick(self.config.want - len(self._holders)):
                        scope = trio.CancelScope()
                        self._holders[relay] = scope
                        nursery.start_soon(self._hold, relay, tuple(addrs), scope)
                await trio.sleep(TICK_S)

    def _pick(self, count: int) -> list[Candidate]:
        """Up to ``count`` candidates not held, not this node, not backing off."""
        if count <= 0:
            return []
        now = trio.current_time()
        fresh: list[Candidate] = []
        for relay, addrs in self._candidates():
            if relay == self.self_id or relay in self._holders:
                continue
            direct = [a for a in addrs if "/p2p-circuit" not in a]
            failed = self._failed.get(relay)
            if direct and (failed is None or failed.retry_at <= now):
                fresh.append((relay, direct))
        # Relays that never failed first, in random order (spread the load of a
        # swarm's NATed nodes over its relays), then those due for a retry.
        self._rng.shuffle(fresh)
        fresh.sort(key=lambda c: c[0] in self._failed)
        return fresh[:count]

    async def _hold(self, relay: str, addrs: tuple[str, ...], scope: trio.CancelScope) -> None:
        reason = "cancelled"
        try:
            with scope:
                reason = await self._keep(relay, addrs)
        except NodeError as exc:  # our own words: safe to show in status
            reason = str(exc)
        except Exception as exc:  # a relay's fault never ends the service
            reason = type(exc).__name__
            log.debug("holding relay %s failed", relay, exc_info=True)
        finally:
            self._holders.pop(relay, None)
            if self._held.pop(relay, None) is not None:
                self._change()
        if scope.cancel_called:
            return
        self.lost += 1
        before = self._failed.get(relay)
        attempts = before.attempts + 1 if before is not None else 0
        delay = self.config.backoff.delay(attempts, self._rng)
        self._failed[relay] = _Failed(attempts, trio.current_time() + delay, reason)
        while len(self._failed) > MAX_FAILED:
            del self._failed[min(self._failed, key=lambda r: self._failed[r].retry_at)]
        log.info("relay %s: %s; retrying it in %.1f s", relay, reason, delay)

    async def _keep(self, relay: str, addrs: tuple[str, ...]) -> str:
        """Reserve on ``relay`` and keep the reservation; returns why it ended."""
        pid = ID.from_base58(relay)
        held = await self._reserve_anew(pid, addrs)
        self._failed.pop(relay, None)
        cfg = self.config
        next_ping = trio.current_time() + cfg.ping_every_s
        misses = 0
        while True:
            await trio.sleep(TICK_S)
            now = trio.current_time()
            if held.conn.is_closed:
                log.info("relay %s: connection closed; reserving again", relay)
                held = await self._reserve_anew(pid, addrs)  # raises when it is gone
                continue
            lifetime = max(1.0, held.expires - held.reserved_at)
            if time.time() >= held.reserved_at + lifetime * cfg.renew_at:
                held.expires, held.reserved_at = await self._reserve(pid), time.time()
                held.renewals += 1
            if now < next_ping:
                continue
            next_ping = now + cfg.ping_every_s
            rtt = await ping(self._host, pid, cfg.ping_timeout_s)
            if rtt is not None:
                held.rtt_s, misses = rtt, 0
                continue
            misses += 1
            if misses >= cfg.misses:
                await self._drop_connection(pid)
                return f"no answer to {misses} pings"
            next_ping = trio.current_time()  # a miss is checked again at once

    async def _reserve_anew(self, pid: ID, addrs: tuple[str, ...]) -> Held:
        relay = pid.to_base58()
        if self._held.pop(relay, None) is not None:
            self._change()
        try:
            with trio.fail_after(self.config.connect_timeout_s):
                conn = await self._connect_directly(pid, addrs)
        except trio.TooSlowError:
            raise PeerUnavailable(f"relay {relay}: no connection in time") from None
        except Exception as exc:  # libp2p raises many types for a failed dial
            raise PeerUnavailable(f"relay {relay}: cannot connect ({type(exc).__name__})") from exc
        expires = await self._reserve(pid)
        addr = _dialled_addr(conn, relay, addrs)
        held = Held(relay, addr, expires, trio.current_time(), conn, time.time())
        self._held[relay] = held
        self._change()
        log.info("reserved on relay %s (%s)", relay, held.addr)
        return held

    async def _connect_directly(self, pid: ID, addrs: tuple[str, ...]) -> Any:
        """A direct connection to the relay: the one there is, else a new one.

        A relay refuses reservations over a relayed connection (as the spec says),
        and a relay that restarted may well have reached us through another relay
        first: then a direct one is dialled beside it, and new streams (ours) take
        the direct one.
        """
        network = self._host.get_network()
        # Our own backoff decides when to try again: not the swarm's negative
        # cache, which refuses every dial to a peer for 60 s after one failed.
        network.unblock_peer(pid)
        direct = [c for c in live(self._host, pid) if not is_relayed(c)]
        if direct:
            return direct[0]
        infos = [multiaddr.Multiaddr(a) for a in addrs]
        if not live(self._host, pid):
            await self._host.connect(PeerInfo(pid, infos))
        else:
            for info in infos:
                with contextlib.suppress(Exception):
                    await network.dial_addr(info, pid)
                    break
        direct = [c for c in live(self._host, pid) if not is_relayed(c)]
        if not direct:
            raise PeerUnavailable(f"relay {pid}: no direct connection")
        return direct[0]

    async def _reserve(self, pid: ID) -> float:
        """One RESERVE on a fresh hop stream; the reservation's expiry (epoch s)."""
        stream = None
        try:
            with trio.fail_after(self.config.reserve_timeout_s):
                stream = await self._host.new_stream(pid, [HOP_PROTOCOL])
                await write_delimited_msg(stream, HopMessage(type=HopMessage.RESERVE))
                answer = await read_delimited_msg(stream, HopMessage)
        except trio.TooSlowError:
            raise PeerUnavailable(f"relay {pid}: no reservation answer in time") from None
        except Exception as exc:
            raise PeerUnavailable(
                f"relay {pid}: reservation failed ({type(exc).__name__})"
            ) from exc
        finally:
            if stream is not None:
                with (
                    trio.CancelScope(shield=True),
                    trio.move_on_after(CLOSE_TIMEOUT_S),
                    contextlib.suppress(Exception),
                ):
                    await stream.close()
        code = answer.status if answer.HasField("status") else StatusCode.UNUSED
        if answer.type != HopMessage.STATUS or code != StatusCode.OK:
            raise ReservationRefused(f"relay {pid} refused the reservation ({_status(code)})")
        if not answer.HasField("reservation"):
            raise ReservationRefused(f"relay {pid} answered OK without a reservation")
        return float(answer.reservation.expire)

    async def _drop_connection(self, pid: ID) -> None:
        with (
            trio.CancelScope(shield=True),
            trio.move_on_after(CLOSE_TIMEOUT_S),
            contextlib.suppress(Exception),
        ):
            await self._host.disconnect(pid)


def _status(code: int) -> str:
    try:
        return StatusCode(code).name
    except ValueError:
        return str(code)


def _dialled_addr(conn: Any, relay: str, addrs: Sequence[str]) -> str:
    """The relay's address as this connection reached it, /p2p/ included."""
    try:
        for addr in conn.get_transport_addresses():
            text = str(addr).split("/p2p/", 1)[0]
            if "/p2p-circuit" not in text and text in addrs:
                return f"{text}/p2p/{relay}"
    except Exception:
        pass
    return f"{addrs[0].split('/p2p/', 1)[0]}/p2p/{relay}"
