"""The running side of reachability: serve dial-backs, ask for them, hold the verdict.

``ReachMonitor`` is a trio service (``await nursery.start(monitor.run)``). It
serves /swarm/dialback/1.0.0 for peers (``node.reach.dialback``), and asks
linked peers to dial this node back when the pure planner says so
(``node.reach.reachability.next_asks``): when the node starts, when linked
peers come while too few answers are held, when its own addresses change (it
looks every ``ADDRS_EVERY_S``), and once per ``recheck_s``. Answers go through
the reducer; the verdict and the address policy (``node.reach.addresses``) are
then read off the state by the record, the DHT, the relay manager and status.

What it takes from the layers above, as callables (reach sits below membership):
the linked peers' ids, a wait for membership changes, and from the relay work
this node's circuit addresses and the relays it holds (``Relays.circuit_addrs``,
``Relays.held``) and the relay it offers (``RelayService.record_entry``). The
relay work reads ``is_public()`` back. The IPs peers see us at come from
dial-back answers and from identify (py-libp2p records every ``observed_addr``
in the host's observed-address manager; ``addrs(min_observers=1)`` lists them).
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import trio
from trio_typing import TaskStatus  # libp2p installs trio-typing, whose stubs shadow trio's

from bootstrap.addrs import dialable_addrs, without_p2p
from node.net.access import AccessPolicy

from .addresses import dial_back_candidates, lan_addrs, own_ips, wide_addrs, with_peer_id
from .config import Reach, ReachConfig
from .dialback import DIALBACK_PROTOCOL, DialBackLimits, DialBackServer, DialBackUnavailable, ask
from .reachability import (
    Addresses,
    Answered,
    Asked,
    NoAnswer,
    ReachState,
    Verdict,
    apply,
    next_asks,
)

log = logging.getLogger(__name__)

ADDRS_EVERY_S = 10.0  # how often our own addresses are read again (psutil)
TICK_S = 5.0  # the longest the planner sleeps without a change
DEFAULT_CONFIG = ReachConfig()
DEFAULT_LIMITS = DialBackLimits()


def _nothing() -> tuple[str, ...]:
    return ()


def _none() -> Mapping[str, Any] | None:
    return None


class ReachMonitor:
    def __init__(
        self,
        host: Any,
        config: ReachConfig = DEFAULT_CONFIG,
        *,
        peers: Callable[[], Sequence[str]],
        wait_changed: Callable[[], Awaitable[None]],
        circuit_addrs: Callable[[], Sequence[str]] = _nothing,
        relays_held: Callable[[], Sequence[str]] = _nothing,
        relay_entry: Callable[[], Mapping[str, Any] | None] = _none,
        on_change: Callable[[], None] | None = None,
        psk: str | None = None,
        access: AccessPolicy | None = None,
        limits: DialBackLimits = DEFAULT_LIMITS,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        """``on_change`` is told when the wide addresses change (the DHT re-announces)."""
        self._host = host
        self.config = config
        self.peer_id: str = host.get_id().to_base58()
        self._peers = peers
        self._wait_changed = wait_changed
        self.circuit_addrs = circuit_addrs
        self.relays_held = relays_held
        self.relay_entry = relay_entry
        self.on_change = on_change
        self._clock = clock
        self.server = DialBackServer(psk=psk, access=access, limits=limits)
        self._listening = self._read_listening()
        self._read_at = clock()
        self.state = ReachState(config)
        self.state = apply(self.state, self._addresses(clock()))
        self._wake = trio.Event()
        self._wide: tuple[str, ...] = self.wide()

    # -- what others read -----------------------------------------------------------

    @property
    def verdict(self) -> Verdict:
        return self.state.verdict

    def is_public(self) -> bool | None:
        """True or False once known; None while unknown (the relay manager waits)."""
        reach = self.state.verdict.reach
        return None if reach is Reach.UNKNOWN else reach is Reach.PUBLIC

    def listening(self) -> tuple[str, ...]:
        """Our direct addresses, 0.0.0.0 expanded, without /p2p (as last read)."""
        return self._listening

    def wide(self) -> tuple[str, ...]:
        """What records and the DHT announce, with /p2p/<our id>."""
        v = self.state.verdict
        addrs = wide_addrs(
            self._listening,
            mode=self.config.mode,
            reach=v.reach,
            confirmed=v.confirmed,
            refuted=v.refuted,
            public_addrs=self.config.public_addrs,
            circuits=tuple(self.circuit_addrs()),
        )
        return with_peer_id(addrs, self.peer_id)

    def lan(self) -> tuple[str, ...]:
        """What mDNS announces, with /p2p/<our id>."""
        return with_peer_id(lan_addrs(self._listening), self.peer_id)

    def observed_ips(self) -> list[str]:
        """IPs peers saw us at: dial-back answers first (newest first), then identify's."""
        answers = sorted(self.state.answers.values(), key=lambda a: -a.at)
        ips = [a.observed for a in answers if a.observed is not None]
        manager = getattr(self._host, "_observed_addr_manager", None)
        if manager is not None:
            with contextlib.suppress(Exception):  # private to py-libp2p: read, never trusted
                for addr in manager.addrs(min_observers=1):
                    for proto in ("ip4", "ip6"):
                        with contextlib.suppress(Exception):
                            ips.append(str(ipaddress.ip_address(addr.value_for_protocol(proto))))
        return list(dict.fromkeys(ips))

    def describe(self) -> dict[str, Any]:
        """For ``swarm status``: the verdict and why, what is announced, relays held."""
        v, s = self.state.verdict, self.state
        return {
            "reach": str(v.reach),
            "why": v.why,
            "mode": str(self.config.mode),
            "announced": list(self.wide()),
            "confirmed": list(v.confirmed),
            "refuted": list(v.refuted),
            "observed": self.observed_ips(),
            "relays_held": list(self.relays_held()),
            "relay_offered": self.relay_entry() is not None,
            "asked": {"answers": s.answers_in, "no_answer": s.failures},
            "dialbacks": self.server.describe(),
        }

    # -- running --------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._host.set_stream_handler(DIALBACK_PROTOCOL, self.server)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch_peers)
            task_status.started()
            while True:
                self._refresh()
                for peer in next_asks(self.state, self._peers()):
                    candidates = self.state.candidates
                    self._apply(Asked(peer, candidates, self._clock()))
                    nursery.start_soon(self._ask, peer, candidates)
                self._wake = trio.Event()
                with trio.move_on_after(TICK_S):
                    await self._wake.wait()

    async def _watch_peers(self) -> None:
        while True:
            await self._wait_changed()
            self._wake.set()
            await trio.sleep(0.2)  # membership changes on every heartbeat: look at most 5/s

    def _refresh(self) -> None:
        now = self._clock()
        if now - self._read_at >= ADDRS_EVERY_S:
            self._listening, self._read_at = self._read_listening(), now
        self._apply(self._addresses(now))

    def _read_listening(self) -> tuple[str, ...]:
        return without_p2p(self.peer_id, dialable_addrs(self._host))

    def _addresses(self, now: float) -> Addresses:
        candidates = dial_back_candidates(self._listening, self.observed_ips())
        linked = len(set(self._peers()))
        return Addresses(own_ips(self._listening), candidates, linked, now)

    async def _ask(self, peer: str, candidates: tuple[str, ...]) -> None:
        try:
            answer = await ask(self._host, peer, candidates, timeout_s=self.config.ask_timeout_s)
        except DialBackUnavailable as exc:
            log.debug("no dial-back from %s: %s", peer, exc)
            self._apply(NoAnswer(peer, str(exc), self._clock()))
            return
        if answer.refused is not None:
            log.debug("%s refused to dial us back: %s", peer, answer.refused)
            self._apply(NoAnswer(peer, answer.refused, self._clock(), answer.retry_after_s))
            return
        # Only results for what we asked: a peer must not slip an address of its
        # choosing into what we announce.
        asked = set(candidates)
        results = tuple(r for r in answer.results if r.addr in asked)
        self._apply(Answered(peer, answer.observed, results, self._clock()))

    def _apply(self, event: Any) -> None:
        before = self.state.verdict
        self.state = apply(self.state, event)
        after = self.state.verdict
        if after.reach is not before.reach:
            log.info("reachability: %s (%s)", after.reach, after.why)
        wide = self.wide()
        if wide != self._wide:
            self._wide = wide
            if self.on_change is not None:
                self.on_change()
        if isinstance(event, Answered | NoAnswer):
            self._wake.set()
