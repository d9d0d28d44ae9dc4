"""mDNS discovery: libp2p's zeroconf-based mDNS as a trio service.

Why a wrapper rather than ``new_host(enable_mDNS=True)``:

- zeroconf runs its own threads (an asyncio loop, one ``ServiceBrowser``
  thread per browsed type), and libp2p reports a find by calling every handler
  in a process-wide singleton, ``libp2p.discovery.events.peerDiscovery``, from
  the browser thread. Two nodes in one process would each hear the other's
  finds. Each ``MdnsDiscovery`` registers its own handler and accepts only the
  calls made on its own browser threads; the handler is removed when it stops.
- libp2p's listener writes the addresses it finds into the peerstore it is
  given, from the zeroconf thread (and, through ``addr_update_channels``, calls
  ``send_nowait`` on trio channels from there). We give it a throwaway
  peerstore, never the host's: the node decides in the trio thread what to
  dial and remember.
- The zeroconf calls that block (starting, registering, closing) run in
  ``trio.to_thread.run_sync``; the trio thread never waits on the network.
- libp2p's ``MDNSDiscovery.start`` spawns a trio *system* task that clears the
  addresses of peers found more than two TTLs ago, alive or not. We do not
  call ``start`` (no task may outlive our nursery) and register the service
  with zeroconf ourselves (libp2p's ``register`` logs and swallows errors).

Hand-off and backpressure: the browser thread calls
``trio.from_thread.run_sync`` with our trio token on a short synchronous
function that only records the find in a pending map (one entry per peer id,
newest addresses win) and wakes the forwarding task. The zeroconf thread so
waits only until the trio loop runs that function, never for channel space.
The forwarding task sends the pending finds into the bounded channel with
``await``: a full channel holds them back, it does not lose them. Only when
``max_pending`` distinct peers already wait are new ones dropped,
counted in ``dropped`` and logged (zeroconf reports a service once, so a
dropped peer is seen again only when it re-announces).

Addresses: we announce the host's listen addresses with 0.0.0.0 expanded to
the interface addresses, and loopback ones only when there is nothing else (a
host listening on 127.0.0.1 only). Such loopback-only announcements reach
(and help) only nodes on the same machine; a remote peer that dials one
reaches its own machine, where the Noise handshake fails on the peer id and
it moves on. Received 0.0.0.0/:: addresses (stock py-libp2p announces them
when listening on 0.0.0.0) are dropped, loopback ones are put last.

On a machine whose only interface is ``lo``: zeroconf joins the multicast
group on 127.0.0.1, so nodes on that machine still find each other through
loopback; nothing leaves the machine. With no IPv4 address at all (``lo``
down), zeroconf cannot start: the service reports a ``DiscoveryProblem``
saying so and idles, the node runs on without mDNS. In every case where no
peer answers within ``no_answer_after_s`` it reports
``DiscoveryProblem(Source.MDNS, "no mDNS answers on any interface after N s")``
and clears it (``problem=None``) with the first find.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import multiaddr
import trio
from libp2p.discovery.events.peerDiscovery import peerDiscovery
from libp2p.discovery.mdns.mdns import SERVICE_TYPE, MDNSDiscovery
from libp2p.peer.id import ID
from libp2p.peer.peerstore import PeerStore
from trio_typing import TaskStatus  # libp2p installs trio-typing, whose stubs shadow trio's

from protocols.errors import ConfigError

from .addrs import dialable_addrs
from .events import Discovered, DiscoveryProblem, Source

__all__ = [
    "MAX_ADDRS_PER_PEER",
    "MAX_PENDING",
    "NO_ANSWER_AFTER_S",
    "SERVICE_TYPE",
    "Announcement",
    "Backend",
    "BackendFactory",
    "DiscoveryEvent",
    "MdnsDiscovery",
    "announce_addrs",
    "service_type_for",
    "start_zeroconf",
]

log = logging.getLogger(__name__)

NO_ANSWER_AFTER_S = 10.0
MAX_PENDING = 256  # distinct peers waiting for channel space
MAX_ADDRS_PER_PEER = 16  # a LAN peer's TXT records are not trusted to be small
READY_WAIT_S = 10.0  # a browser thread waits this long for our backend to exist

DiscoveryEvent = Discovered | DiscoveryProblem


@dataclass(frozen=True, slots=True)
class Announcement:
    """What we announce: our peer id, full multiaddrs (with /p2p), the SRV port."""

    peer_id: str
    addrs: tuple[str, ...]
    port: int
    service_type: str = SERVICE_TYPE


class Backend(Protocol):
    """A started mDNS responder and browser. ``announce`` and ``close`` block."""

    @property
    def threads(self) -> frozenset[threading.Thread]:
        """The threads on which this backend emits finds through ``peerDiscovery``."""
        ...

    def announce(self) -> None: ...

    def close(self) -> None: ...


# Called in a worker thread; creates the backend and starts browsing (not announcing).
BackendFactory = Callable[[Announcement], Backend]


class _SwarmShim:
    """The two things ``MDNSDiscovery`` uses of a swarm, with a throwaway peerstore."""

    def __init__(self, peer_id: Any) -> None:
        self._peer_id = peer_id
        self.peerstore = PeerStore()

    def get_peer_id(self) -> Any:
        return self._peer_id


class _ZeroconfBackend:
    def __init__(self, announcement: Announcement) -> None:
        self._mdns = MDNSDiscovery(
            _SwarmShim(ID.from_base58(announcement.peer_id)),  # type: ignore[arg-type]
            port=announcement.port,
            listen_addrs=list(announcement.addrs),
            service_type=announcement.service_type,
        )
        listener = self._mdns.listener
        self._threads = frozenset({listener.browser, listener.meta_browser})

    @property
    def threads(self) -> frozenset[threading.Thread]:
        return self._threads

    def announce(self) -> None:
        # Not broadcaster.register(): it logs and swallows every error.
        info = self._mdns.broadcaster.service_info
        assert info is not None  # built in PeerBroadcaster.__init__
        self._mdns.zeroconf.register_service(info)

    def close(self) -> None:
        # Goodbye packets, browsers cancelled and joined, zeroconf's loop thread joined.
        self._mdns.stop()


def start_zeroconf(announcement: Announcement) -> Backend:
    """The real backend: libp2p's MDNSDiscovery on all IPv4 interfaces (blocks)."""
    return _ZeroconfBackend(announcement)


def service_type_for(swarm_key: str | None) -> str:
    """The DNS-SD type to use: libp2p's, or a private one derived from the swarm key.

    Nodes of different private swarms then do not even see each other's
    announcements. The label is a short hash of the key, which reveals nothing
    usable about it.
    """
    if swarm_key is None:
        return SERVICE_TYPE
    digest = hashlib.sha256(b"swarm mdns service type\0" + swarm_key.encode()).hexdigest()
    return f"_p2p-{digest[:8]}._udp.local."


def _ip_of(addr: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    parts = addr.split("/")
    if len(parts) > 2 and parts[1] in ("ip4", "ip6"):
        try:
            return ipaddress.ip_address(parts[2])
        except ValueError:
            return None
    return None


def _is_loopback(addr: str) -> bool:
    ip = _ip_of(addr)
    return ip is not None and ip.is_loopback


def announce_addrs(dialable: Sequence[str]) -> tuple[str, ...]:
    """The addresses to announce: non-loopback ones, or loopback ones if nothing else."""
    wide = tuple(a for a in dialable if not _is_loopback(a))
    return wide or tuple(dialable)


def _tcp_port(addrs: Sequence[str]) -> int:
    for addr in addrs:
        try:
            return int(multiaddr.Multiaddr(addr).value_for_protocol("tcp"))
        except Exception:  # multiaddr raises several types for a missing protocol
            continue
    return 0


def _received(peer_info: Any) -> Discovered | None:
    """A libp2p PeerInfo as a Discovered event; None when it holds no usable address."""
    peer_id = peer_info.peer_id.to_base58()
    addrs: list[str] = []
    for ma in peer_info.addrs:
        text = str(ma).split("/p2p/", 1)[0]
        ip = _ip_of(text)
        if ip is not None and ip.is_unspecified:
            continue
        if text and text not in addrs:
            addrs.append(text)
    addrs.sort(key=_is_loopback)  # stable: loopback last
    if not addrs:
        return None
    return Discovered(peer_id, tuple(addrs[:MAX_ADDRS_PER_PEER]), Source.MDNS)


class MdnsDiscovery:
    """Find peers on the local network; announce ours. A trio service.

    ``send`` gets ``Discovered(peer_id, addrs, Source.MDNS)`` for every peer
    found and ``DiscoveryProblem(Source.MDNS, ...)`` when none answers (or mDNS
    cannot run). The service does not close ``send``: give it a clone if you
    want the channel closed when it stops. Stops with its nursery: the
    announcement is withdrawn, zeroconf closed and its threads joined.
    """

    def __init__(
        self,
        peer_id: str,
        addrs: Sequence[str],
        send: trio.MemorySendChannel[DiscoveryEvent],
        *,
        no_answer_after_s: float = NO_ANSWER_AFTER_S,
        service_type: str = SERVICE_TYPE,
        max_pending: int = MAX_PENDING,
        backend_factory: BackendFactory = start_zeroconf,
    ) -> None:
        if not no_answer_after_s > 0:
            raise ConfigError("no_answer_after_s must be > 0")
        if max_pending < 1:
            raise ConfigError("max_pending must be >= 1")
        addrs = announce_addrs(addrs)
        self.announcement = Announcement(peer_id, addrs, _tcp_port(addrs), service_type)
        self.dropped = 0  # finds lost because max_pending peers were already waiting
        self._found: set[str] = set()
        self._send = send
        self._no_answer_after_s = no_answer_after_s
        self._max_pending = max_pending
        self._factory = backend_factory
        self._pending: dict[str, Discovered] = {}
        self._wake = trio.Event()
        self._token: trio.lowlevel.TrioToken | None = None
        self._threads: frozenset[threading.Thread] = frozenset()
        self._ready = threading.Event()  # set once self._threads is known (or never will be)
        self._stopped = False

    @classmethod
    def for_host(
        cls,
        host: Any,
        send: trio.MemorySendChannel[DiscoveryEvent],
        *,
        no_answer_after_s: float = NO_ANSWER_AFTER_S,
        service_type: str = SERVICE_TYPE,
    ) -> MdnsDiscovery:
        """For a started (listening) libp2p host: its peer id and dialable addresses."""
        return cls(
            host.get_id().to_base58(),
            dialable_addrs(host),
            send,
            no_answer_after_s=no_answer_after_s,
            service_type=service_type,
        )

    @property
    def found(self) -> frozenset[str]:
        """Peer ids found so far (each was sent, or waits to be sent, as Discovered)."""
        return frozenset(self._found)

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Browse from ``started`` on; our announcement follows within ~2 s (probing)."""
        self._token = trio.lowlevel.current_trio_token()
        backend: Backend | None = None
        peerDiscovery.register_peer_discovered_handler(self._on_peer)
        try:
            failure: Exception | None = None
            try:
                backend = await trio.to_thread.run_sync(self._factory, self.announcement)
                self._threads = backend.threads
            except Exception as exc:  # zeroconf raises several types (no interface, bad name)
                failure = exc
            finally:
                self._ready.set()  # browser threads (ours or others') stop waiting for us
            task_status.started()
            if backend is None:
                log.warning("mDNS discovery cannot run: %s", failure)
                await self._send.send(DiscoveryProblem(Source.MDNS, f"mDNS cannot run: {failure}"))
                await trio.sleep_forever()
                return  # not reached: for mypy, backend is set below
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._announce, backend)
                await self._forward()
        finally:
            self._stopped = True
            peerDiscovery.unregister_peer_discovered_handler(self._on_peer)
            if backend is not None:
                await self._close(backend)

    async def _announce(self, backend: Backend) -> None:
        try:
            await trio.to_thread.run_sync(backend.announce)
        except Exception as exc:  # zeroconf: EventLoopBlocked, NonUniqueNameException, OSError
            log.warning("mDNS: cannot announce this node: %s", exc)
            await self._send.send(
                DiscoveryProblem(Source.MDNS, f"mDNS cannot announce this node: {exc}")
            )
            return
        log.info(
            "mDNS: announcing %s as %s",
            ", ".join(self.announcement.addrs) or "no address",
            self.announcement.service_type,
        )

    async def _close(self, backend: Backend) -> None:
        # Shielded and not abandoned: no zeroconf thread outlives the service. Every wait
        # inside is bounded by zeroconf's or libp2p's own timeouts: typically ~0.3 s, ~2 s
        # right after start (the announcement's probing finishes first), and up to ~20 s
        # when a browser thread is busy resolving an unresponsive service (libp2p: 3 tries
        # of up to 5 s each, 1 s and 2 s apart), which close() joins.
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(backend.close)

    async def _forward(self) -> None:
        problem = False
        deadline = trio.current_time() + self._no_answer_after_s
        while True:
            if self._pending:
                if problem:
                    await self._send.send(DiscoveryProblem(Source.MDNS, None))
                    problem = False
                peer_id = next(iter(self._pending))
                await self._send.send(self._pending.pop(peer_id))
                continue
            self._wake = trio.Event()
            if self._found or problem:
                await self._wake.wait()
                continue
            with trio.move_on_at(deadline):
                await self._wake.wait()
            if not self._wake.is_set():
                problem = True
                await self._send.send(
                    DiscoveryProblem(
                        Source.MDNS,
                        f"no mDNS answers on any interface after {self._no_answer_after_s:g} s",
                    )
                )

    # --- called on zeroconf's browser threads (any instance's: the handler list is global)

    def _on_peer(self, peer_info: Any) -> None:
        try:
            if not self._ready.wait(READY_WAIT_S):
                return
            if threading.current_thread() not in self._threads or self._stopped:
                return
            event = _received(peer_info)
            if event is None or event.peer_id == self.announcement.peer_id:
                return
            assert self._token is not None  # set before the handler is registered
            trio.from_thread.run_sync(self._on_find, event, trio_token=self._token)
        except trio.RunFinishedError:
            pass
        except Exception:  # never raise into zeroconf or into other handlers' loop
            log.exception("mDNS: cannot hand a find to trio")

    # --- trio thread

    def _on_find(self, event: Discovered) -> None:
        if self._stopped:
            return
        if event.peer_id not in self._pending and len(self._pending) >= self._max_pending:
            self.dropped += 1
            log.warning(
                "mDNS: %d peers already wait for the discovery channel; dropped %s (%d so far)",
                len(self._pending),
                event.peer_id,
                self.dropped,
            )
            return
        self._found.add(event.peer_id)
        self._pending[event.peer_id] = event
        self._wake.set()
