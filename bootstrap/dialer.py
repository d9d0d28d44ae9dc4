"""Keeps the bootstrap peers dialled: the way into a swarm across networks.

Each bootstrap peer (``/ip4/.../tcp/.../p2p/<id>``; several addresses of one
peer are dialled together) is dialled at start, and again whenever its
connection is lost, with exponential backoff and jitter between failed dials
(and between redials of a peer that keeps dropping us soon after connecting).
Every time a bootstrap peer becomes connected, ``Discovered(..., BOOTSTRAP)``
goes out on the events channel; while none is connected and the dials fail,
``DiscoveryProblem(BOOTSTRAP, "bootstrap unreachable: ...")`` does, and a
``DiscoveryProblem(BOOTSTRAP, None)`` clears it once one connects.

Loss is noticed at once through a libp2p network notifee (py-libp2p 0.8.1
removes the connection from ``network.connections`` before it notifies
``disconnected``), with a periodic check behind it in case a notification is
missed. The dialer only dials: what a peer serves is learnt elsewhere.

py-libp2p 0.8.1 around a dial: each ``host.connect`` already retries an
address 3 times within about 0.7 s, and after a failed dial the swarm refuses
to dial that peer again for 60 s, which would hide a bootstrap peer's return;
the dialer lifts that block (``unblock_peer``) before each of its dials.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import trio
from libp2p.peer.peerinfo import PeerInfo
from trio_typing import TaskStatus  # libp2p installs trio-typing, whose stubs shadow trio's

from protocols.errors import ConfigError

from ._notifee import ConnectionNotifee
from .addrs import peer_info, without_p2p
from .events import Discovered, DiscoveryProblem, Source

log = logging.getLogger(__name__)

Event = Discovered | DiscoveryProblem

DIAL_TIMEOUT_S = 10.0
CHECK_INTERVAL_S = 5.0
STABLE_AFTER_S = 10.0  # a connection lost sooner counts towards the backoff
MAX_ERROR_CHARS = 200
TCP_LOGGER = "libp2p.transport.tcp.tcp"  # an ERROR for every refused TCP connect


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential backoff: ``initial_s * factor**(n-1)``, +-``jitter``, at most ``max_s``."""

    initial_s: float = 0.5
    max_s: float = 30.0
    factor: float = 2.0
    jitter: float = 0.25  # a fraction of the delay, either way

    def __post_init__(self) -> None:
        if not 0 < self.initial_s <= self.max_s:
            raise ConfigError(f"backoff needs 0 < initial_s <= max_s, not {self}")
        if self.factor < 1 or not 0 <= self.jitter < 1:
            raise ConfigError(f"backoff needs factor >= 1 and 0 <= jitter < 1, not {self}")

    def delay(self, failures: int, rand: float) -> float:
        """Seconds to wait after the ``failures``-th failure in a row; ``rand`` in [0, 1)."""
        base = self.initial_s
        for _ in range(max(failures, 1) - 1 if self.factor > 1 else 0):
            base *= self.factor
            if base >= self.max_s:
                break
        spread = 1 + self.jitter * (2 * rand - 1)
        return min(self.max_s, base * spread)


@dataclass(slots=True)
class BootstrapLink:
    """One bootstrap peer, as the dialer sees it (read it for ``swarm status``)."""

    peer_id: str
    addrs: tuple[str, ...]  # as configured, with /p2p
    connected: bool = False
    failures: int = 0  # failed dials since the last success
    last_error: str | None = None
    retry_at: float | None = None  # trio time of the next dial while backing off
    _info: Any = None
    _wake: trio.Event = field(default_factory=trio.Event)
    _flaps: int = 0  # connections in a row lost before STABLE_AFTER_S


class BootstrapDialer:
    """A trio service: ``await nursery.start(dialer.run)``.

    ``addresses`` are full multiaddrs with ``/p2p/<peer id>``; a bad one is a
    ConfigError here, not later. ``events`` is not closed by the dialer (give
    it a clone when the channel is shared). A closed channel is ignored: the
    links are still kept.
    """

    def __init__(
        self,
        host: Any,
        addresses: Sequence[str],
        events: trio.MemorySendChannel[Event],
        *,
        backoff: Backoff = Backoff(),
        dial_timeout_s: float = DIAL_TIMEOUT_S,
        check_interval_s: float = CHECK_INTERVAL_S,
        rng: random.Random | None = None,
    ) -> None:
        self._host = host
        self._events = events
        self._backoff = backoff
        self._dial_timeout_s = dial_timeout_s
        self._check_interval_s = check_interval_s
        self._rng = rng or random.Random()
        self._links: dict[str, BootstrapLink] = {}
        own = host.get_id().to_base58()
        for address in addresses:
            info = peer_info(address)  # ConfigError on a bad address
            pid = info.peer_id.to_base58()
            if pid == own:
                log.info("skipping bootstrap address %s: it is this node", address)
                continue
            link = self._links.get(pid)
            if link is None:
                link = self._links[pid] = BootstrapLink(pid, (), _info=PeerInfo(info.peer_id, []))
            if address not in link.addrs:
                link.addrs += (address,)
                link._info.addrs.extend(info.addrs)
        self._problem: str | None = None

    @property
    def links(self) -> Mapping[str, BootstrapLink]:
        """Bootstrap peers by peer id."""
        return self._links

    @property
    def problem(self) -> str | None:
        """The last DiscoveryProblem text sent (None: some bootstrap peer is connected)."""
        return self._problem

    def any_connected(self) -> bool:
        return any(link.connected for link in self._links.values())

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        network = self._host.get_network()
        watcher = _LinkWatcher(self._links)
        network.register_notifee(watcher)
        quiet = _QuietDials(self._links.values())
        tcp_log = logging.getLogger(TCP_LOGGER)
        tcp_log.addFilter(quiet)
        try:
            async with trio.open_nursery() as nursery:
                for link in self._links.values():
                    nursery.start_soon(self._keep, link)
                task_status.started()
        finally:
            network.remove_notifee(watcher)
            tcp_log.removeFilter(quiet)

    def _is_connected(self, link: BootstrapLink) -> bool:
        return bool(self._host.get_network().get_connections(link._info.peer_id))

    async def _keep(self, link: BootstrapLink) -> None:
        while True:
            if self._is_connected(link):
                await self._on_connected(link)
                since = trio.current_time()
                await self._wait(link, until_lost=True)
                link.connected = False
                lasted = trio.current_time() - since
                log.info("lost the bootstrap peer %s after %.1f s", link.peer_id, lasted)
                # Redial at once after a loss, unless the peer keeps dropping us
                # soon after connecting: then the backoff paces the redials too.
                link._flaps = 0 if lasted >= STABLE_AFTER_S else link._flaps + 1
                if link._flaps:
                    await self._pause(link, self._backoff.delay(link._flaps, self._rng.random()))
                continue
            link.retry_at = None
            error = await self._dial(link)
            if error is None and self._is_connected(link):
                continue
            link.failures += 1
            link.last_error = error or "the connection closed right after it opened"
            level = logging.WARNING if link.failures == 1 else logging.DEBUG
            log.log(level, "bootstrap peer %s unreachable: %s", link.addrs[0], link.last_error)
            await self._update_problem()
            await self._pause(link, self._backoff.delay(link.failures, self._rng.random()))

    async def _pause(self, link: BootstrapLink, delay: float) -> None:
        """Wait ``delay`` before the next dial; an inbound connection ends the wait."""
        link.retry_at = trio.current_time() + delay
        with trio.move_on_after(delay):
            await self._wait(link, until_lost=False)

    async def _dial(self, link: BootstrapLink) -> str | None:
        # libp2p refuses, for 60 s, to dial a peer whose addresses all failed
        # (a "negative cache"): this dial is ours to pace, so lift that first.
        self._host.get_network().unblock_peer(link._info.peer_id)
        try:
            with trio.fail_after(self._dial_timeout_s):
                await self._host.connect(link._info)
        except trio.TooSlowError:
            return f"no connection within {self._dial_timeout_s:g} s"
        except Exception as exc:  # libp2p raises many types for a failed dial
            text = " ".join(f"{type(exc).__name__}: {exc}".split())
            return text[:MAX_ERROR_CHARS]
        return None

    async def _on_connected(self, link: BootstrapLink) -> None:
        link.connected, link.failures, link.last_error, link.retry_at = True, 0, None, None
        log.info("connected to the bootstrap peer %s", link.peer_id)
        await self._update_problem()
        addrs = without_p2p(link.peer_id, link.addrs)
        await self._emit(Discovered(link.peer_id, addrs, Source.BOOTSTRAP))

    async def _wait(self, link: BootstrapLink, *, until_lost: bool) -> None:
        """Until the link is lost (``until_lost``) or found connected (otherwise)."""
        while self._is_connected(link) == until_lost:
            link._wake = trio.Event()
            with trio.move_on_after(self._check_interval_s):
                await link._wake.wait()

    def _current_problem(self) -> str | None:
        links = list(self._links.values())
        if any(link.connected for link in links):
            return None
        failed = [link for link in links if link.failures]
        if not failed:
            return None  # the first dials are still under way
        worst = failed[0]
        return (
            f"bootstrap unreachable: {len(failed)} of {len(links)} bootstrap peers failed "
            f"to connect; {worst.addrs[0]}: {worst.last_error}"
        )

    async def _update_problem(self) -> None:
        problem = self._current_problem()
        if problem != self._problem:
            self._problem = problem
            await self._emit(DiscoveryProblem(Source.BOOTSTRAP, problem))

    async def _emit(self, event: Event) -> None:
        try:
            await self._events.send(event)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            log.debug("nobody reads discovery events; dropped %s", event)


class _QuietDials(logging.Filter):
    """Drops libp2p's per-connect errors for bootstrap addresses: the dialer reports those.

    They pass when this module's logger is at DEBUG.
    """

    def __init__(self, links: Iterable[BootstrapLink]) -> None:
        super().__init__()
        self._targets: list[str] = []
        for link in links:
            for addr in link._info.addrs:
                parts = str(addr).split("/")  # /ip4/1.2.3.4/tcp/4001/...
                if len(parts) > 4 and parts[1] in ("ip4", "ip6") and parts[3] == "tcp":
                    self._targets.append(f"{parts[2]}:{parts[4]}")

    def filter(self, record: logging.LogRecord) -> bool:
        if log.isEnabledFor(logging.DEBUG) or not self._targets:
            return True
        text = record.getMessage()
        return not (
            text.startswith("Failed to open TCP stream")
            and any(f"{target} " in text or text.endswith(target) for target in self._targets)
        )


class _LinkWatcher(ConnectionNotifee):
    """Wakes a link's task when its peer connects or disconnects (runs on the trio thread)."""

    def __init__(self, links: Mapping[str, BootstrapLink]) -> None:
        self._links = links

    def on_connected(self, conn: Any) -> None:
        try:
            pid = conn.muxed_conn.peer_id.to_base58()
        except AttributeError:
            return
        link = self._links.get(pid)
        if link is not None:
            link._wake.set()

    on_disconnected = on_connected
