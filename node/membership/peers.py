"""Swarm membership: the peer table, fed by discovery, records and heartbeats.

Discovery adapters (mDNS, the bootstrap list, the DHT, the peerstore, ``--peer``)
send ``Discovered`` hints into one bounded channel. A hinted peer is *linked*:
dialled, sent our full record and asked for its own, which must verify (its
signature, its peer id, its time, a seq newer than any seen). From then on the
two keep each other fresh with heartbeats (small signed records with load and
the version of the sender's full record); a heartbeat that announces a newer
full record makes the receiver pull it, and one naming the version held renews
that record's expiry. Of each pair, the side with the lower peer id heartbeats
once per interval and the other only when that has gone quiet for longer
(``LAGGARD_FACTOR`` intervals), so in steady state one exchange per pair per
interval, on one long-lived caps stream, proves both alive. A peer silent for
``dead_after_s`` leaves the table; it comes back when it is heard from or
discovered again.

All state changes go through the pure reducer in ``bootstrap.table``; this
module only does the I/O around it.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import multiaddr
import trio
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from trio_typing import TaskStatus  # libp2p installs trio-typing, whose stubs shadow trio's

from bootstrap.events import Discovered, DiscoveryProblem, Source
from bootstrap.table import (
    Heard,
    Peer,
    PeerTable,
    RecordRefused,
    RecordVerified,
    Reported,
    Status,
    TableConfig,
    Tick,
    Unreachable,
    apply,
    live_peers,
    rows,
    serving,
)
from capabilities.signing import RecordBook, RecordRejected, RecordReplayed
from node.net.access import AccessPolicy
from node.reach.records import intermediaries
from protocols import CapabilityRecord, ProtocolError, SwarmError

from .caps import CapsStreams, Received, RecordSigner
from .config import LAGGARD_FACTOR, MembershipConfig

log = logging.getLogger(__name__)

DiscoveryEvent = Discovered | DiscoveryProblem
Connect = Callable[[str, tuple[str, ...]], Awaitable[None]]
# A direct dial, then circuits through the peer's relays, one after another.
LINK_TIMEOUT_S = 20.0
DHT_LOOKUP_S = 5.0
HINTS_ONLY = frozenset({Source.DHT, Source.PEERSTORE})
# How many linked peers a full record names, so that a newcomer that learnt of a
# few members (one DHT lookup returns about 20) links to the rest through them.
PEER_SAMPLE = 64
# A peer whose heartbeats say it links more peers than we do has its full record
# (and sample) pulled, at most this often: one we cannot reach must not cost a
# full record per beat.
SAMPLE_EVERY_S = 30.0
# For a few seconds after a peer is linked, beat it every second: nodes that join
# together learn each other's link counts (and pull samples) at once, not after
# a whole interval.
JOIN_WINDOW_S = 4.0
JOIN_BEAT_S = 1.0


class Membership:
    def __init__(
        self,
        host: Any,
        signer: RecordSigner,
        load: Callable[[], Mapping[str, Any]],
        config: MembershipConfig = MembershipConfig(),
        access: AccessPolicy | None = None,
        connect: Connect | None = None,
    ) -> None:
        self._host = host
        # How a peer is dialled: node.reach.circuits (direct, else through its relays).
        self._connect = connect or self._connect_direct
        self._signer = signer
        self._streams = CapsStreams(host)
        self._load = load
        self.config = config
        self._access = access or AccessPolicy()
        self.self_id = host.get_id().to_base58()
        self.table = PeerTable(TableConfig(dead_after_s=config.dead_after_s))
        self._book = RecordBook()
        self.events, self._events_in = trio.open_memory_channel[DiscoveryEvent](
            config.events_buffer
        )
        self._linking: set[str] = set()
        self._last_try: dict[str, float] = {}
        self._sampled: dict[str, float] = {}  # peer -> when we last pulled its sample
        self._joined: dict[str, float] = {}  # peer -> when it was last linked
        self._limiter = trio.CapacityLimiter(config.max_linking)
        self._changed = trio.Event()
        self._nursery: trio.Nursery | None = None
        self.on_verified: Callable[[str, tuple[str, ...]], None] | None = None
        # Asks the DHT who provides a model (hints), when this node runs one.
        self.finder: Callable[[str, float], Awaitable[list[Any]]] | None = None

    # -- running ---------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._consume)
                nursery.start_soon(self._heartbeats)
                nursery.start_soon(self._ticks)
                task_status.started()
        finally:
            # Inbound caps streams can still arrive while the host closes: link nothing then.
            self._nursery = None
            await self._streams.close()

    def _apply(self, event: Any) -> None:
        self.table = apply(self.table, event)
        self._changed.set()
        self._changed = trio.Event()

    async def wait_changed(self) -> None:
        """Until the table next changes (for tests and watchers)."""
        await self._changed.wait()

    async def _consume(self) -> None:
        async for event in self._events_in:
            if isinstance(event, Discovered):
                if event.peer_id == self.self_id or not self._access.member(event.peer_id):
                    continue  # outside an allow-list: never dialled, never listed
                known = self.table.peers.get(event.peer_id)
                if known is None or known.status != Status.LINKED:
                    self.link(event.peer_id, event.addrs)  # linked peers stay fresh by beats
                if event.source in HINTS_ONLY:
                    # A DHT provider record or a peerstore row outlives its peer: not
                    # evidence that it is alive. It enters the table once it answers.
                    continue
            self._apply(Reported(event, trio.current_time()))

    async def _ticks(self) -> None:
        while True:
            await trio.sleep(1.0)
            before = set(self.table.peers)
            self._apply(Tick(trio.current_time()))
            self._book = self._book.prune(time.time_ns() // 1_000_000)
            for gone in before - set(self.table.peers):
                await self._streams.forget(gone)

    async def _heartbeats(self) -> None:
        interval = self.config.heartbeat_s
        while True:
            pause = interval * random.uniform(0.4, 0.6)  # twice per interval
            if self._joined:
                pause = min(pause, JOIN_BEAT_S / 2)
            await trio.sleep(pause)
            now = trio.current_time()
            assert self._nursery is not None
            for pid, since in list(self._joined.items()):
                if now - since > JOIN_WINDOW_S:
                    del self._joined[pid]
            for peer in live_peers(self.table):
                due = interval if self.self_id < peer.peer_id else interval * LAGGARD_FACTOR
                if peer.peer_id in self._joined:
                    due = min(due, JOIN_BEAT_S)
                if now - peer.last_seen >= due and peer.peer_id not in self._linking:
                    self._linking.add(peer.peer_id)
                    self._nursery.start_soon(self._beat, peer.peer_id, _version(peer.body))

    # -- linking and heartbeats -------------------------------------------------

    def tried(self) -> set[str]:
        """The peers this node has tried to link since it started."""
        return set(self._last_try)

    def relink(self, peer_id: str) -> None:
        """Link ``peer_id`` now even if that was tried a moment ago (something changed
        that may make it reachable: a relay says the peer holds a reservation
        there); a linked peer is left alone."""
        known = self.table.peers.get(peer_id)
        if peer_id == self.self_id or (known is not None and known.status == Status.LINKED):
            return
        self._last_try.pop(peer_id, None)
        self.link(peer_id, tuple(known.addrs) if known is not None else ())

    def link(self, peer_id: str, addrs: tuple[str, ...] = ()) -> None:
        """Dial ``peer_id`` and swap full records, unless that was just tried."""
        now = trio.current_time()
        if (
            self._nursery is None
            or peer_id in self._linking
            or now - self._last_try.get(peer_id, -1e9) < self.config.relink_after_s
        ):
            return
        self._linking.add(peer_id)
        self._last_try[peer_id] = now
        self._nursery.start_soon(self._link, peer_id, addrs)

    async def _link(self, peer_id: str, addrs: tuple[str, ...]) -> None:
        try:
            async with self._limiter:
                with trio.fail_after(LINK_TIMEOUT_S):
                    await self._connect(peer_id, addrs)
                await self._swap(peer_id, self._signer.full())
        except trio.TooSlowError:
            self._apply(Unreachable(peer_id, "no connection in time", trio.current_time()))
        except Exception as exc:  # any dial failure: libp2p raises many types
            log.info("cannot link %s: %s", peer_id, _reason(exc))
            self._apply(Unreachable(peer_id, _reason(exc), trio.current_time()))
        finally:
            self._linking.discard(peer_id)

    async def _connect_direct(self, peer_id: str, addrs: tuple[str, ...]) -> None:
        if addrs:  # none: the exchange's own stream dials what the peerstore knows
            infos = [multiaddr.Multiaddr(a) for a in addrs]
            await self._host.connect(PeerInfo(ID.from_base58(peer_id), infos))

    async def _beat(self, peer_id: str, known_version: int) -> None:
        try:
            await self._swap(peer_id, self._heartbeat(known_version))
        except Exception as exc:  # a failed beat only marks the peer; silence drops it
            self._apply(Unreachable(peer_id, _reason(exc), trio.current_time()))
        finally:
            self._linking.discard(peer_id)

    async def _swap(self, peer_id: str, ours: CapabilityRecord) -> None:
        """Send ``ours``, take the answer; ask again (we hold version 0) if that was stale."""
        for _ in range(2):
            try:
                received = await self._streams.exchange(ID.from_base58(peer_id), ours)
            except RecordRejected as exc:
                self._apply(RecordRefused(peer_id, f"{exc.reason}: {exc}", trio.current_time()))
                return
            if not self.accept(received):
                return
            ours = self._heartbeat(0)  # "we hold none": send it

    # -- records in -------------------------------------------------------------

    def accept(self, received: Received) -> bool:
        """Take a verified record the peer sent about itself, on its own connection.

        Returns whether we should pull its full record (a heartbeat announced a
        newer one than we hold, or more linked peers than we have).
        """
        record = received.record
        now = trio.current_time()
        if not self._access.member(record.peer_id):
            return False
        try:
            self._book = self._book.admit(record)
        except RecordReplayed:
            # Sent by the peer itself on its authenticated connection, so an older seq
            # only means two of its exchanges crossed: late, not hostile. Ignore it.
            log.debug("ignored a late record of %s (seq %d)", record.peer_id, record.seq)
            return False
        except RecordRejected as exc:
            self._apply(RecordRefused(record.peer_id, f"{exc.reason}: {exc}", now))
            return False
        beat = received.heartbeat
        if beat is None:
            left_s = (record.expires_ms - time.time_ns() // 1_000_000) / 1000
            before = self.table.peers.get(record.peer_id)
            was_linked = before is not None and before.status == Status.LINKED
            self._apply(RecordVerified(record.peer_id, record.seq, record.body, now, now + left_s))
            if not was_linked:
                self._joined[record.peer_id] = now
            self._link_sample(record.body.get("peers"))
            if self.on_verified is not None:
                self.on_verified(record.peer_id, tuple(self.table.peers[record.peer_id].addrs))
            return False
        load = beat.get("load")
        known = self.table.peers.get(record.peer_id)
        version = beat.get("version")
        held = _version(known.body) if known is not None else 0
        # A heartbeat naming the version we hold vouches that it is still current.
        renew = None
        if version == held and held:
            renew = now + (record.expires_ms - time.time_ns() // 1_000_000) / 1000
        self._apply(Heard(record.peer_id, now, load if isinstance(load, Mapping) else None, renew))
        if known is None or (isinstance(version, int) and version > held):
            return True
        # It links more peers than we do: its record's sample may name some we lack.
        linked = beat.get("peers")
        more = isinstance(linked, int) and linked > len(live_peers(self.table))
        if more and now - self._sampled.get(record.peer_id, -1e9) >= SAMPLE_EVERY_S:
            self._sampled[record.peer_id] = now
            return True
        return False

    def peer_sample(self) -> list[list[Any]]:
        """Linked peers and their addresses, for our full record (see PEER_SAMPLE)."""
        peers = live_peers(self.table)
        if len(peers) > PEER_SAMPLE:
            peers = random.sample(peers, PEER_SAMPLE)
        return [[p.peer_id, list(p.addrs[:4])] for p in peers]

    def _link_sample(self, sample: Any) -> None:
        """Link the peers another member named that we do not know: hints, no more."""
        if not isinstance(sample, list):
            return
        for entry in sample[:PEER_SAMPLE]:
            if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)):
                continue
            peer_id, addrs = entry
            if (
                peer_id == self.self_id
                or peer_id in self.table.peers
                or not self._access.member(peer_id)
                or not isinstance(addrs, list)
            ):
                continue
            self.link(peer_id, tuple(a for a in addrs[:4] if isinstance(a, str)))

    async def on_inbound(self, received: Received) -> None:
        if not received.is_client and self.accept(received):
            self._last_try.pop(received.record.peer_id, None)
            self.link(received.record.peer_id)  # pull its newer full record

    def answer(self, received: Received) -> CapabilityRecord:
        """Our reply on an inbound caps stream."""
        if received.is_client:
            return self._signer.view(self.view())
        beat = received.heartbeat
        known = beat.get("known", 0) if beat is not None else 0  # a full record: assume none
        full = self._signer.full()
        if not isinstance(known, int) or known < self._signer.version:
            return full
        theirs = self.table.peers.get(received.record.peer_id)
        return self._heartbeat(_version(theirs.body if theirs else None))

    def _heartbeat(self, known_version: int) -> CapabilityRecord:
        linked = len(live_peers(self.table))
        return self._signer.heartbeat(known_version, self._load(), peers=linked)

    def view(self) -> dict[str, Any]:
        return {
            "peers": rows(self.table),
            "discovery": {str(s): p.text for s, p in self.table.problems.items()},
            "dropped_for_silence": self.table.drops,
            "records_refused": self.table.refusals,
        }

    # -- forwarding ---------------------------------------------------------------

    def serves(self, model: str) -> bool:
        """Whether forwarding could work: a linked peer serves it or passes it on to one
        it links (``node.reach.records``), or the DHT may know one."""
        return (
            bool(serving(self.table, model))
            or bool(intermediaries(self.table, model))
            or self.finder is not None
        )

    async def providers(self, model: str) -> list[Peer]:
        """Linked peers serving ``model``; asks the DHT and links what it finds if none."""
        found = serving(self.table, model)
        if found or self.finder is None:
            return found
        hints = await self.finder(model, DHT_LOOKUP_S)
        for hint in hints:
            if hint.peer_id != self.self_id:
                self.link(hint.peer_id, tuple(hint.addrs))
        with trio.move_on_after(LINK_TIMEOUT_S if hints else 0):
            while not (found := serving(self.table, model)):
                await self.wait_changed()
        return found

    def mark_unreachable(self, peer_id: str, reason: str) -> None:
        """A dial or stream to ``peer_id`` failed (silence will drop it if it lasts)."""
        self._apply(Unreachable(peer_id, reason, trio.current_time()))


def _version(body: Mapping[str, Any] | None) -> int:
    """The content version of a peer's full record we hold (0: none)."""
    version = (body or {}).get("version")
    return version if isinstance(version, int) else 0


def _reason(exc: BaseException) -> str:
    if isinstance(exc, SwarmError | ProtocolError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"
