"""Which peers serve a model, across networks: a Kademlia DHT adapter.

Each node announces itself as a provider of ``model_key(name)`` (the sha2-256
multihash of the lowercased model name) for every model it serves, and looks
up the providers of a model it does not. It runs py-libp2p 0.8.1's
``KadDHT`` on our host, with these measures around it:

- ``KadDHT`` is an anyio-service ``Service``: it runs inside
  ``background_trio_service`` and is stopped by leaving that block. Its
  constructor registers the ``/ipfs/kad/1.0.0`` handler on the host (server
  mode) and nothing removes it on stop, so we do.
- Its routing table fills only from DHT traffic and a refresh every 10 min, so
  the adapter offers it every connected peer (the bootstrap peers first) and
  refreshes it as soon as it stops being empty.
- ``KadDHT.find_providers`` answers from the local provider store alone when
  that holds any record for the key, so a node that was sent one provider's
  announcement never learns of the others. The lookup here asks the k closest
  peers every time and merges their answers with the local records.
- Providers expire (48 h in libp2p) and newcomers may become the closest peers
  to a key: announcements are repeated every ``reprovide_s``.
- Every call is under a timeout and its results are hints: a lookup that runs
  out of time returns what it has, possibly nothing, and logs one line.
- What we say of ourselves (provider records, the signed peer record in each
  DHT message) is ``announce()`` when given: the addresses any peer may dial,
  not every interface address the host listens on (a NATed node's private
  ones). ``KadDHT`` reads them from ``host.get_addrs()``, so it is given a view
  of the host whose ``get_addrs`` answers ``announce()``; the host itself is
  untouched (identify and hole punching read its listen addresses).
  ``reannounce()`` sends the provider records again at once, after they change.
- Its per-peer warnings (every failed stream) are dropped while the adapter
  runs, unless this module's logger is at DEBUG; errors still show.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import multiaddr
import multihash  # type: ignore[import-untyped]
import trio
from libp2p.kad_dht.common import ALPHA, PROTOCOL_ID
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.peer.id import ID
from libp2p.tools.anyio_service import background_trio_service
from trio_typing import TaskStatus  # libp2p installs trio-typing, whose stubs shadow trio's

from protocols.errors import ConfigError

from ._notifee import ConnectionNotifee
from .addrs import without_p2p
from .events import Discovered, DiscoveryProblem, Source

log = logging.getLogger(__name__)

Event = Discovered | DiscoveryProblem
EMPTY_TABLE = "DHT routing table empty"
KAD_LOGGERS = tuple(
    f"libp2p.kad_dht.{name}"
    for name in ("kad_dht", "peer_routing", "provider_store", "routing_table", "value_store")
)
HOST_LOGGER = "libp2p.host.basic_host"  # logs each failed KAD stream at ERROR, 8 lines


def canonical_model_name(name: str) -> str:
    canonical = name.strip().lower()
    if not canonical:
        raise ConfigError("a model name cannot be empty")
    return canonical


def model_key(name: str) -> bytes:
    """A model's DHT key: the sha2-256 multihash (0x12 0x20 + digest) of its lowercased name."""
    digest = multihash.digest(canonical_model_name(name).encode("utf-8"), "sha2-256")
    return bytes(digest.encode())


class Provider(NamedTuple):
    peer_id: str
    addrs: tuple[str, ...]  # multiaddr strings, without /p2p


@dataclass(frozen=True, slots=True)
class DhtConfig:
    server: bool = True  # answer DHT queries; False for a node others cannot dial
    reprovide_s: float = 600.0
    refresh_s: float = 300.0  # routing table refresh (libp2p's own runs every 600 s)
    seed_interval_s: float = 2.0  # how often connected peers are offered to the table
    empty_grace_s: float = 5.0  # an empty table is a problem only after this long
    call_timeout_s: float = 10.0  # provide and refresh; find_providers takes its own
    query_timeout_s: float = 5.0  # one peer's GET_PROVIDERS answer
    # Inbound DHT streams handled at once; libp2p's 12 resets part of the burst
    # a bootstrap node gets when ten nodes join together.
    max_inbound_streams: int = 32

    def __post_init__(self) -> None:
        for name in ("reprovide_s", "refresh_s", "seed_interval_s", "call_timeout_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"DhtConfig.{name} must be positive")
        if self.query_timeout_s <= 0 or self.empty_grace_s < 0:
            raise ConfigError("DhtConfig timeouts must be positive")
        if self.max_inbound_streams < 1:
            raise ConfigError("DhtConfig.max_inbound_streams must be at least 1")


class ModelDHT:
    """A trio service: ``await nursery.start(dht.run)``; then provide and find models.

    ``events`` (optional, not closed here) receives ``Discovered(..., DHT)`` for
    found providers (dropped when the channel is full: they are hints) and
    ``DiscoveryProblem(DHT, ...)`` while the routing table is empty.
    """

    def __init__(
        self,
        host: Any,
        events: trio.MemorySendChannel[Event] | None = None,
        *,
        config: DhtConfig = DhtConfig(),
        announce: Callable[[], Sequence[str]] | None = None,
    ) -> None:
        self._host = host
        self._own_addrs = announce
        self._events = events
        self._config = config
        self._own_id = host.get_id().to_base58()
        self._dht: Any = None
        self._provided: dict[bytes, str] = {}  # key -> canonical model name
        self._kick = trio.Event()  # refresh and announce now
        self._problem: str | None = None

    @property
    def running(self) -> bool:
        return self._dht is not None

    @property
    def providing(self) -> frozenset[str]:
        return frozenset(self._provided.values())

    @property
    def problem(self) -> str | None:
        return self._problem

    def routing_table_size(self) -> int:
        return 0 if self._dht is None else int(self._dht.get_routing_table_size())

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        mode = DHTMode.SERVER if self._config.server else DHTMode.CLIENT
        own = self._own_addrs
        host: Any = self._host if own is None else _Announcing(self._host, own)
        dht = KadDHT(host, mode)  # registers the KAD handler in server mode
        dht._inbound_limiter = trio.CapacityLimiter(self._config.max_inbound_streams)
        quiet = _QuietKad()
        for name in (*KAD_LOGGERS, HOST_LOGGER):
            logging.getLogger(name).addFilter(quiet)
        try:
            async with background_trio_service(dht):
                self._dht = dht
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._seed_loop, dht)
                    nursery.start_soon(self._announce_loop, dht)
                    task_status.started()
        finally:
            self._dht = None
            if mode is DHTMode.SERVER:
                # The KAD handler must not outlive the DHT, but removing it races
                # libp2p's negotiation of an inbound stream (it looks the protocol up
                # twice, and a KeyError escapes into the host): replace it instead.
                self._host.set_stream_handler(PROTOCOL_ID, _refuse)
            for name in (*KAD_LOGGERS, HOST_LOGGER):
                logging.getLogger(name).removeFilter(quiet)

    async def provide(self, model_name: str, *, timeout_s: float | None = None) -> bool:
        """Announce this node as a provider of the model, now and every ``reprovide_s``.

        Returns whether at least one peer took the announcement in time; the
        model stays announced either way (and is announced on start if the DHT
        is not running yet).
        """
        return await self.provide_key(
            model_key(model_name), canonical_model_name(model_name), timeout_s=timeout_s
        )

    async def provide_key(self, key: bytes, label: str, *, timeout_s: float | None = None) -> bool:
        """``provide`` for any key: a content id (its multihash bytes) names itself."""
        self._provided[key] = label
        dht = self._dht
        if dht is None:
            return False
        return await self._announce(dht, key, timeout_s or self._config.call_timeout_s)

    def reannounce(self) -> None:
        """Send every provider record again now (our addresses changed)."""
        self._kick.set()

    def stop_providing(self, model_name: str) -> None:
        """No more announcements; records already on other peers expire on their own."""
        key = model_key(model_name)
        self._provided.pop(key, None)
        dht = self._dht
        if dht is not None:
            dht.provider_store.providing_keys.discard(key)
            dht.provider_store.providers.get(key, {}).pop(str(self._host.get_id()), None)

    async def find_providers(
        self, model_name: str, timeout_s: float, *, ask: int | None = None
    ) -> list[Provider]:
        """Other peers that announced the model: hints, found within ``timeout_s``.

        By default the k closest peers to the key are found on the network and
        all asked. With ``ask=N``, only the N closest in our own routing table are
        asked: a few requests instead of dozens, for repeated lookups where a
        partial answer will do.

        Never raises for a network problem: on an error it logs and returns
        what it found (possibly nothing); on a timeout it returns what the
        peers that answered in time said. Each found provider also goes out as
        ``Discovered(..., Source.DHT)``.
        """
        return await self.find_key_providers(model_key(model_name), model_name, timeout_s, ask=ask)

    async def find_key_providers(
        self, key: bytes, model_name: str, timeout_s: float, *, ask: int | None = None
    ) -> list[Provider]:
        """``find_providers`` for any key (``model_name``: what to call it in logs)."""
        dht = self._dht
        found: dict[str, set[str]] = {}
        if dht is None:
            log.info("cannot look up providers of %s: the DHT is not running", model_name)
            return []
        with trio.move_on_after(timeout_s) as scope:
            try:
                await self._lookup(dht, key, found, ask)
            except Exception as exc:  # libp2p raises many types on a broken peer
                log.warning("looking up providers of %s failed: %s", model_name, exc)
        if scope.cancelled_caught:
            log.info(
                "looking up providers of %s: timed out after %g s with %d found",
                model_name,
                timeout_s,
                len(found),
            )
        providers = [Provider(pid, self._addrs_of(dht, pid, addrs)) for pid, addrs in found.items()]
        for provider in providers:
            self._emit_nowait(Discovered(provider.peer_id, provider.addrs, Source.DHT))
        return providers

    async def _lookup(
        self, dht: Any, key: bytes, found: dict[str, set[str]], ask_only: int | None
    ) -> None:
        def add(infos: Iterable[Any]) -> None:
            for info in infos:
                pid = info.peer_id.to_base58()
                if pid != self._own_id:
                    found.setdefault(pid, set()).update(str(a) for a in info.addrs)

        add(dht.provider_store.get_providers(key))  # records sent to us, and our own
        if ask_only is None:
            closest = await dht.peer_routing.find_closest_peers_network(key)
        else:
            closest = dht.routing_table.find_local_closest_peers(key, ask_only)
        limiter = trio.CapacityLimiter(ALPHA)

        async def ask(peer: Any) -> None:
            async with limiter:
                with trio.move_on_after(self._config.query_timeout_s):
                    # Private in 0.8.1, but the public find_providers stops at the
                    # local store (see the module docstring). Errors are logged and
                    # answered with ([], []) inside.
                    store = dht.provider_store
                    providers, _ = await store._get_providers_from_peer_with_closers(peer, key)
                    add(providers)

        async with trio.open_nursery() as nursery:
            for peer in closest:
                if peer != dht.local_peer_id:
                    nursery.start_soon(ask, peer)

    def _addrs_of(self, dht: Any, pid: str, addrs: set[str]) -> tuple[str, ...]:
        clean = without_p2p(pid, sorted(addrs))
        if clean:
            return clean
        try:  # a record without addresses: what the peerstore knows, if anything
            return without_p2p(pid, dht.host.get_peerstore().addrs(ID.from_base58(pid)))
        except Exception:
            return ()

    async def _announce(self, dht: Any, key: bytes, timeout_s: float) -> bool:
        name = self._provided.get(key, key.hex())
        ok = False
        with trio.move_on_after(timeout_s) as scope:
            try:
                ok = bool(await dht.provider_store.provide(key))
            except Exception as exc:
                log.warning("announcing %s in the DHT failed: %s", name, exc)
        if scope.cancelled_caught:
            log.info("announcing %s in the DHT: no answer within %g s", name, timeout_s)
        else:
            log.debug("announced %s in the DHT (taken by a peer: %s)", name, ok)
        return ok

    async def _seed_loop(self, dht: Any) -> None:
        """Offer connected peers to the routing table; say when it is empty."""
        started = trio.current_time()
        was_empty = True
        watcher = _ConnectionWatcher()
        network = self._host.get_network()
        network.register_notifee(watcher)
        # A peer the table will not take (a client, a full bucket) is offered again
        # ever more rarely: each offer may cost an identify or a ping.
        retry: dict[Any, tuple[float, float]] = {}  # peer -> (next offer, pause)
        try:
            while True:
                now = trio.current_time()
                connected = list(self._host.get_connected_peers())
                for gone in set(retry) - set(connected):
                    del retry[gone]
                for peer in connected:
                    if dht.routing_table.peer_in_table(peer) or retry.get(peer, (0, 0))[0] > now:
                        continue
                    # Checks (via identify) that the peer runs a DHT server; may ping.
                    added = False
                    with trio.move_on_after(self._config.call_timeout_s):
                        try:
                            added = bool(await dht.add_peer(peer))
                        except Exception as exc:
                            log.debug("cannot add %s to the routing table: %s", peer, exc)
                    if added:
                        retry.pop(peer, None)
                    else:
                        pause = min(
                            2 * retry.get(peer, (0, self._config.seed_interval_s))[1], 300.0
                        )
                        retry[peer] = (trio.current_time() + pause, pause)
                empty = dht.get_routing_table_size() == 0
                if was_empty and not empty:
                    self._kick.set()
                was_empty = empty
                waited = trio.current_time() - started >= self._config.empty_grace_s
                await self._set_problem(EMPTY_TABLE if empty and waited else None)
                watcher.changed = trio.Event()
                with trio.move_on_after(self._config.seed_interval_s):
                    await watcher.changed.wait()
        finally:
            network.remove_notifee(watcher)

    async def _announce_loop(self, dht: Any) -> None:
        """Refresh the table and announce every provided model: on kick, then periodically."""
        config = self._config
        next_refresh = next_provide = trio.current_time() + min(
            config.refresh_s, config.reprovide_s
        )
        while True:
            with trio.move_on_at(min(next_refresh, next_provide)):
                await self._kick.wait()
            kicked = self._kick.is_set()
            self._kick = trio.Event()
            now = trio.current_time()
            if kicked or now >= next_refresh:
                with trio.move_on_after(config.call_timeout_s):
                    try:
                        await dht.refresh_routing_table()
                    except Exception as exc:
                        log.debug("refreshing the DHT routing table failed: %s", exc)
                next_refresh = trio.current_time() + config.refresh_s
            if kicked or now >= next_provide:
                async with trio.open_nursery() as nursery:
                    for key in list(self._provided):
                        nursery.start_soon(self._announce, dht, key, config.call_timeout_s)
                next_provide = trio.current_time() + config.reprovide_s

    async def _set_problem(self, problem: str | None) -> None:
        if problem != self._problem:
            self._problem = problem
            if problem:
                log.info("%s", problem)
            if self._events is not None:
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await self._events.send(DiscoveryProblem(Source.DHT, problem))

    def _emit_nowait(self, event: Event) -> None:
        if self._events is None:
            return
        try:
            self._events.send_nowait(event)
        except trio.WouldBlock:
            log.debug("discovery channel full; dropped %s", event)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass


class _Announcing:
    """The host as KadDHT sees it: ``get_addrs`` answers what we announce widely."""

    def __init__(self, host: Any, announce: Callable[[], Sequence[str]]) -> None:
        self._host = host
        self._announce = announce

    def get_addrs(self) -> list[multiaddr.Multiaddr]:
        out = []
        for addr in self._announce():
            with contextlib.suppress(Exception):  # multiaddr raises several types
                out.append(multiaddr.Multiaddr(addr))
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self._host, name)


class _QuietKad(logging.Filter):
    """Drops KadDHT records below ERROR, and the host's records about KAD streams.

    Both pass when this module's logger is at DEBUG.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if log.isEnabledFor(logging.DEBUG):
            return True
        if record.name == HOST_LOGGER:
            return record.levelno >= logging.CRITICAL or PROTOCOL_ID not in record.getMessage()
        return record.levelno >= logging.ERROR


class _ConnectionWatcher(ConnectionNotifee):
    """A network notifee that wakes the seeding loop when a peer connects."""

    def __init__(self) -> None:
        self.changed = trio.Event()

    def on_connected(self, conn: Any) -> None:
        self.changed.set()


async def _refuse(stream: Any) -> None:
    """Stands in for the KAD handler once the DHT has stopped."""
    with contextlib.suppress(Exception):  # the stream may already be gone
        await stream.reset()
