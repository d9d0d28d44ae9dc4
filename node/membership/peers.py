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

A node links at most ``links.max_links`` peers (``--max-links``). Which ones is
the pure planner's call (``link_policy.plan_links``): relays, providers of the
models this node forwards to (by recent demand), Kademlia buckets, a few at
random. Every other peer it hears of (a discovery hint, a peer sample, a DHT
provider record, a link it let go) is *known*: its addresses and models are
kept, but no connection and no heartbeat. The planner runs when something
changes and once a second; links it no longer wants get an ``unlink``
heartbeat (the other side lets go too) and their connection is closed. A peer
that asks for a link (its record or heartbeat arrives unlinked) is taken when
the planner, counting it as wanting the link, keeps it; else it is answered
``unlink``. A job for a model no linked peer serves looks up the DHT's
provider records (the answer stays known), links a provider and waits for its
record: the first job pays the lookup, later ones find the link.

All state changes go through the pure reducer in ``bootstrap.table``; this
module only does the I/O around it.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
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
    Unlinked,
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
from .link_policy import LinkInputs, LinkPlan, PeerFacts, plan_links

log = logging.getLogger(__name__)

DiscoveryEvent = Discovered | DiscoveryProblem
Connect = Callable[[str, tuple[str, ...]], Awaitable[None]]
# A direct dial, then circuits through the peer's relays, one after another.
LINK_TIMEOUT_S = 20.0
UNLINKED_ROUTES = 4  # known providers offered to the router when none is linked
PROVIDER_WAIT_S = 2.0  # a job with no linked provider waits this long for a link
DHT_LOOKUP_S = 5.0
DHT_TRIES, DHT_RETRY_S = 2, 1.0  # lookups when the first finds no provider, and the pause
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
# The planner runs at least this often (links age out, demand expires).
PLAN_EVERY_S = 1.0
# A peer that let our link go, or refused it, is not dialled again for this long
# unless a job needs it (its budget is full: asking again at once costs both).
REFUSED_BACKOFF_S = 30.0
# A dropped link's connection stays open if a job used it this recently: the
# job's streams may still be on it.
BUSY_S = 10.0
# Peers an "unlink" answer names: a refused newcomer links elsewhere.
SAMPLE_ON_UNLINK = 8
VIEW_KNOWN = 200  # known peers listed in the view clients get


@dataclass(frozen=True, slots=True)
class Known:
    """A peer known but not linked: where it listens, what it serves, when last heard of."""

    addrs: tuple[str, ...]
    models: tuple[str, ...]
    seen: float


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
        self.policy = config.links
        self.known: dict[str, Known] = {}
        self._dialing: set[str] = set()  # link attempts in flight (count as links)
        self._demand: dict[str, float] = {}  # model -> when a job last needed a peer for it
        self._used: dict[str, float] = {}  # peer -> when a job last went to it
        self._linked_at: dict[str, float] = {}  # peer -> when its link began
        self._wants: dict[str, bool] = {}  # peer -> its heartbeats say it wants the link
        self._backoff: dict[str, float] = {}  # peer -> not dialled before then
        self._refusing: set[str] = set()  # peers answered "unlink" until linked again
        self._why: Mapping[str, str] = {}  # the last plan's reason for each link
        self._kick = trio.Event()
        self._seed = random.randrange(1 << 32)  # the planner's random picks, fixed per run
        # Relays this node holds a reservation on; peers holding one here (the wiring).
        self.relays_held: Callable[[], Iterable[str]] = tuple
        self.reserved_here: Callable[[], Iterable[str]] = tuple
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
                nursery.start_soon(self._plans)
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
                self._learn(event.peer_id, event.addrs)  # the planner links it, or not
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
            self._prune(trio.current_time())

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
        """Let the planner link ``peer_id`` now even if that was tried a moment ago
        (something changed that may make it reachable: a relay says the peer holds a
        reservation there); a linked peer is left alone."""
        known = self.table.peers.get(peer_id)
        if peer_id == self.self_id or (known is not None and known.status == Status.LINKED):
            return
        self._last_try.pop(peer_id, None)
        self._backoff.pop(peer_id, None)
        self._learn(peer_id, tuple(known.addrs) if known is not None else ())  # the planner links

    def link(self, peer_id: str, addrs: tuple[str, ...] = ()) -> None:
        """Dial ``peer_id`` and swap full records, unless that was just tried or the
        link budget is full (a linked peer is dialled again: its newer record)."""
        now = trio.current_time()
        if (
            self._nursery is None
            or peer_id in self._linking
            or now - self._last_try.get(peer_id, -1e9) < self.config.relink_after_s
        ):
            return
        linked = self.linked()
        if peer_id not in linked and len(linked) >= self.policy.max_links:
            return  # no room: every path to a new link keeps to the budget

        self._linking.add(peer_id)
        self._dialing.add(peer_id)
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
            self._dialing.discard(peer_id)
            self._kick.set()

    async def _connect_direct(self, peer_id: str, addrs: tuple[str, ...]) -> None:
        if addrs:  # none: the exchange's own stream dials what the peerstore knows
            infos = [multiaddr.Multiaddr(a) for a in addrs]
            await self._host.connect(PeerInfo(ID.from_base58(peer_id), infos))

    async def _beat(self, peer_id: str, known_version: int) -> None:
        try:
            await self._swap(peer_id, self._heartbeat(known_version, peer_id))
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
            if peer_id not in self.linked():
                return  # let go while the answer was on its way: it must not link again
            if not self.accept(received):
                return
            ours = self._heartbeat(0, peer_id)  # "we hold none": send it

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
        if beat is not None and beat.get("unlink") is True:
            self._let_go(record.peer_id, now, tell=False)  # it will not hold the link
            self._backoff[record.peer_id] = now + REFUSED_BACKOFF_S
            self._link_sample(beat.get("sample"))  # where else to link
            return False
        if beat is None:
            left_s = (record.expires_ms - time.time_ns() // 1_000_000) / 1000
            before = self.table.peers.get(record.peer_id)
            was_linked = before is not None and before.status == Status.LINKED
            self._apply(RecordVerified(record.peer_id, record.seq, record.body, now, now + left_s))
            if not was_linked:
                self._joined[record.peer_id] = now
                self._linked_at[record.peer_id] = now
            self._refusing.discard(record.peer_id)
            self.known.pop(record.peer_id, None)  # the table holds it now
            self._link_sample(record.body.get("peers"))
            if self.on_verified is not None:
                self.on_verified(record.peer_id, tuple(self.table.peers[record.peer_id].addrs))
            return False
        load = beat.get("load")
        self._wants[record.peer_id] = beat.get("want") is True
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
        ours = len(live_peers(self.table))
        more = isinstance(linked, int) and linked > ours and ours < self.policy.max_links
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
        """Learn of the peers another member named (the planner may link some)."""
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
            self._learn(peer_id, tuple(a for a in addrs[:4] if isinstance(a, str)))

    async def on_inbound(self, received: Received) -> None:
        if received.is_client:
            return
        pid = received.record.peer_id
        beat = received.heartbeat
        if beat is not None and beat.get("unlink") is True:
            self.accept(received)  # it lets us go
            self._refusing.add(pid)
            return
        # A link is asked for with a full record; a heartbeat from a peer not linked is
        # from one whose link we let go (or dropped for silence): it is told so.
        if pid not in self.linked() and (beat is not None or not self._admit(pid)):
            # No room: answered "unlink"; what its full record says is kept.
            self._refusing.add(pid)
            body = received.record.body
            if beat is None and self._access.member(pid):
                addrs = body.get("addrs")
                addrs = (
                    tuple(a for a in addrs[:4] if isinstance(a, str))
                    if isinstance(addrs, list)
                    else ()
                )
                self._learn(pid, addrs, _models_of(body))
            return
        self._refusing.discard(pid)
        if self.accept(received):
            self._last_try.pop(pid, None)
            self.link(pid)  # pull its newer full record

    def answer(self, received: Received) -> CapabilityRecord:
        """Our reply on an inbound caps stream."""
        if received.is_client:
            return self._signer.view(self.view())
        if received.record.peer_id in self._refusing:
            return self._heartbeat(0, received.record.peer_id, unlink=True)
        beat = received.heartbeat
        known = beat.get("known", 0) if beat is not None else 0  # a full record: assume none
        full = self._signer.full()
        if not isinstance(known, int) or known < self._signer.version:
            return full
        theirs = self.table.peers.get(received.record.peer_id)
        pid = received.record.peer_id
        return self._heartbeat(_version(theirs.body if theirs else None), pid)

    def _heartbeat(
        self, known_version: int, peer_id: str = "", *, unlink: bool = False
    ) -> CapabilityRecord:
        linked = len(live_peers(self.table))
        # Any reason of ours but "idle" is a reason for the other side to keep the link.
        want = self._why.get(peer_id, "idle") != "idle"
        sample = self.peer_sample()[:SAMPLE_ON_UNLINK] if unlink else None
        return self._signer.heartbeat(
            known_version, self._load(), peers=linked, want=want, unlink=unlink, sample=sample
        )

    def view(self) -> dict[str, Any]:
        linked = self.linked()
        known: list[dict[str, Any]] = [
            {
                "peer_id": pid,
                "status": "known",
                "reason": None,
                "addrs": list(k.addrs),
                "hardware": "",
                "models": list(k.models),
                "load": None,
                "last_seen": k.seen,
                "seen_ago_s": max(0.0, trio.current_time() - k.seen),
                "found_by": [],
            }
            for pid, k in sorted(self.known.items())
            if pid not in self.table.peers
        ]
        # The record that carries this view has a size limit: the freshest ones.
        known = sorted(known, key=lambda r: float(r["seen_ago_s"]))[:VIEW_KNOWN]
        table_rows = rows(self.table)
        for row in table_rows:
            row["link"] = self._why.get(row["peer_id"])
        return {
            "peers": table_rows + known,
            "links": {
                "linked": len(linked),
                "max": self.policy.max_links,
                "known": sum(1 for pid in self.known if pid not in self.table.peers),
            },
            "discovery": {str(s): p.text for s, p in self.table.problems.items()},
            "dropped_for_silence": self.table.drops,
            "records_refused": self.table.refusals,
        }

    # -- forwarding ---------------------------------------------------------------

    def serves(self, model: str) -> bool:
        """Whether forwarding could work: a linked peer serves it or passes it on to one
        it links (``node.reach.records``), a known peer serves it, or the DHT may know one."""
        return (
            bool(serving(self.table, model))
            or bool(intermediaries(self.table, model))
            or bool(self._known_serving(model))
            or self.finder is not None
        )

    async def providers(self, model: str) -> list[Peer]:
        """Linked peers serving ``model``. With none: the known providers, else the
        DHT's provider records (kept as known peers), and the planner links one."""
        now = trio.current_time()
        self._demand[model] = now
        found = serving(self.table, model)
        if found:
            return found
        for attempt in range(DHT_TRIES if self.finder is not None else 0):
            if self._known_serving(model):
                break
            if attempt:  # a provider that started a moment ago may not have told the DHT
                await trio.sleep(DHT_RETRY_S)
            assert self.finder is not None
            for hint in await self.finder(model, DHT_LOOKUP_S):
                if hint.peer_id != self.self_id and self._access.member(hint.peer_id):
                    self._learn(hint.peer_id, tuple(hint.addrs), (model,))
        candidates = self._known_serving(model)
        for pid in candidates:  # a job needs it: an earlier refusal does not hold it back
            self._backoff.pop(pid, None)
        self._replan()
        # A link made in a moment is the best route (its load comes with it); past
        # that the job may go to a known provider unlinked (unlinked_providers).
        with trio.move_on_after(PROVIDER_WAIT_S if candidates else 0):
            while not (found := serving(self.table, model)):
                await self.wait_changed()
        return found

    def unlinked_providers(self, model: str) -> list[Peer]:
        """Known providers of ``model`` with no link to us, as rows a job can be routed
        to with its load unknown (no heartbeat tells it), when no linked peer serves
        ``model``: a provider at its link budget refuses our link, not our job. Their
        addresses go to the host's peerstore (as ``host.connect`` puts them, for two
        minutes) so that the job's own stream can dial them."""
        if serving(self.table, model):
            return []
        rows = []
        for pid in self._known_serving(model)[:UNLINKED_ROUTES]:
            known = self.known[pid]
            if not known.addrs:
                continue  # announces no address (behind a NAT): reached through others
            try:
                addrs = [multiaddr.Multiaddr(a) for a in known.addrs]
                self._host.get_peerstore().add_addrs(ID.from_base58(pid), addrs, 120)
            except Exception as exc:  # a hint's bad address or id: not routable
                log.debug("known provider %s not routable: %s", pid, exc)
                continue
            entries = [{"name": m} for m in known.models]
            body = {"models": entries}
            rows.append(
                Peer(
                    pid,
                    known.addrs,
                    frozenset(),
                    known.seen,
                    Status.LINKED,
                    body=body,
                    models=known.models,
                )
            )
        return rows

    def note_use(self, model: str, peer_id: str) -> None:
        """A job for ``model`` went to ``peer_id``: the model is in use, the link busy."""
        now = trio.current_time()
        self._demand[model] = now
        self._used[peer_id] = now

    def note_caller(self, peer_id: str) -> None:
        """A job came from ``peer_id``: its link is busy (kept before idle ones)."""
        self._used[peer_id] = trio.current_time()

    # -- the link budget ------------------------------------------------------------

    def linked(self) -> set[str]:
        """Peers linked (a verified record held), and those being linked now."""
        held = {p.peer_id for p in self.table.peers.values() if p.body is not None}
        return held | self._dialing

    def _learn(self, peer_id: str, addrs: tuple[str, ...], models: tuple[str, ...] = ()) -> None:
        """Keep ``peer_id`` as known (not linked), merging what was known; the planner decides."""
        if peer_id == self.self_id:
            return
        now = trio.current_time()
        old = self.known.get(peer_id)
        if old is not None:
            addrs = tuple(dict.fromkeys((*old.addrs, *addrs)))[:8]
            models = tuple(dict.fromkeys((*old.models, *models)))
        self.known[peer_id] = Known(addrs[:8], models, now)
        if len(self.known) > self.config.known_max:
            stalest = min(self.known, key=lambda pid: (self.known[pid].seen, pid))
            del self.known[stalest]
        self._kick.set()

    def _known_serving(self, model: str) -> list[str]:
        want = model.casefold()
        return sorted(
            pid
            for pid, k in self.known.items()
            if pid not in self.table.peers or self.table.peers[pid].body is None
            if any(m.casefold() == want for m in k.models)
        )

    def _facts(self, now: float) -> list[PeerFacts]:
        linked = self.linked()
        facts: dict[str, PeerFacts] = {}
        for pid, k in self.known.items():
            facts[pid] = PeerFacts(pid, models=k.models, linkable=self._linkable(pid, now))
        for pid in self.table.peers:
            if pid not in linked:
                models = facts[pid].models if pid in facts else ()
                facts[pid] = PeerFacts(pid, models=models, linkable=self._linkable(pid, now))
        for pid in linked:
            held = self.table.peers.get(pid)
            known = self.known.get(pid)
            facts[pid] = PeerFacts(
                pid,
                linked=True,
                models=held.models if held is not None else known.models if known else (),
                last_used=self._used.get(pid),
                linked_at=self._linked_at.get(pid, now),
                wants=self._wants.get(pid, False),
            )
        return list(facts.values())

    def _linkable(self, peer_id: str, now: float) -> bool:
        return (
            self._nursery is not None
            and self._access.member(peer_id)
            and now >= self._backoff.get(peer_id, -1e9)
            and now - self._last_try.get(peer_id, -1e9) >= self.config.relink_after_s
        )

    def plan(self, extra: PeerFacts | None = None) -> LinkPlan:
        """The planner's answer now (``extra``: a peer counted in as if linked)."""
        now = trio.current_time()
        facts = self._facts(now)
        if extra is not None:
            facts = [f for f in facts if f.peer_id != extra.peer_id] + [extra]
        demand = {m: at for m, at in self._demand.items() if now - at <= self.policy.demand_s}
        inputs = LinkInputs(
            self.self_id,
            now,
            facts,
            demand,
            relays=frozenset(self.relays_held()),
            reserved=frozenset(self.reserved_here()),
            seed=self._seed,
        )
        return plan_links(inputs, self.policy)

    def _replan(self) -> LinkPlan:
        """Plan, then dial what the plan links and let go of what it drops."""
        plan = self.plan()
        self._why = plan.why
        now = trio.current_time()
        for pid in plan.drop:
            if pid not in self._dialing:  # counted as linked; judged once it is
                self._let_go(pid, now, tell=True)
        for pid in plan.link:
            # Dials the plan let go of are still in flight (and counted): wait for them.
            if len(self.linked()) >= self.policy.max_links:
                break
            known = self.known.get(pid)
            peer = self.table.peers.get(pid)
            addrs = known.addrs if known else tuple(peer.addrs) if peer else ()
            self.link(pid, addrs)
        return plan

    def _admit(self, peer_id: str) -> bool:
        """Whether to take the link an unlinked peer asks for: the planner, counting
        it as a linked peer that wants the link, keeps it (and lets go of whom it drops)."""
        if self._nursery is None or not self._access.member(peer_id):
            return False
        now = trio.current_time()
        asking = PeerFacts(peer_id, linked=True, linked_at=now, wants=True)
        plan = self.plan(asking)
        if peer_id not in plan.keep:
            return False
        self._why = {**plan.why}
        for pid in plan.drop:
            if pid not in self._dialing:
                self._let_go(pid, now, tell=True)
        # Dials in flight count too, even those the plan would let go of.
        return len(self.linked()) < self.policy.max_links

    def _let_go(self, peer_id: str, now: float, *, tell: bool) -> None:
        """Unlink ``peer_id``: known from now on; ``tell``: say so, then hang up."""
        peer = self.table.peers.get(peer_id)
        if peer is None and peer_id not in self._dialing:
            return
        if peer is not None:
            old = self.known.get(peer_id)
            models = peer.models or (old.models if old else ())
            self.known[peer_id] = Known(tuple(peer.addrs[:8]), models, now)
        self._apply(Unlinked(peer_id, now))
        self._linked_at.pop(peer_id, None)
        self._wants.pop(peer_id, None)
        self._joined.pop(peer_id, None)
        self._refusing.add(peer_id)
        if self._nursery is not None:
            self._nursery.start_soon(self._hang_up, peer_id, tell)

    async def _hang_up(self, peer_id: str, tell: bool) -> None:
        if tell:
            with trio.move_on_after(5.0):
                try:
                    await self._streams.exchange(
                        ID.from_base58(peer_id), self._heartbeat(0, peer_id, unlink=True)
                    )
                except Exception as exc:  # gone already: nothing to tell
                    log.debug("could not tell %s of the unlink: %s", peer_id, _reason(exc))
        await self._streams.forget(peer_id)
        if not tell:
            # It let us go: the connection is its to close (it may be our DHT's way in).
            return
        keep = set(self.relays_held()) | set(self.reserved_here())
        recent = trio.current_time() - self._used.get(peer_id, -1e9) < BUSY_S
        if peer_id in keep or recent or peer_id in self.linked():
            return
        with trio.move_on_after(5.0):
            try:
                await self._host.disconnect(ID.from_base58(peer_id))
            except Exception as exc:  # libp2p raises many types for a closing connection
                log.debug("could not close the connection to %s: %s", peer_id, _reason(exc))

    async def _plans(self) -> None:
        while True:
            with trio.move_on_after(PLAN_EVERY_S):
                await self._kick.wait()
            self._kick = trio.Event()
            self._replan()
            await trio.sleep(0.05)  # a burst of hints makes one plan, not one each

    def _prune(self, now: float) -> None:
        """Forget the bookkeeping of peers neither linked nor known."""
        linked = self.linked()
        keep = linked | set(self.known)
        for book in (self._used, self._wants, self._linked_at, self._backoff):
            for pid in [p for p in book if p not in keep]:
                del book[pid]
        self._refusing &= set(self.known) | set(self.table.peers)
        for model in [m for m, at in self._demand.items() if now - at > self.policy.demand_s]:
            del self._demand[model]

    def mark_unreachable(self, peer_id: str, reason: str) -> None:
        """A dial or stream to ``peer_id`` failed (silence will drop it if it lasts)."""
        self._apply(Unreachable(peer_id, reason, trio.current_time()))


def _models_of(body: Mapping[str, Any]) -> tuple[str, ...]:
    models = body.get("models")
    if not isinstance(models, list | tuple):
        return ()
    names = (m.get("name") for m in models if isinstance(m, Mapping))
    return tuple(n for n in names if isinstance(n, str) and n)


def _version(body: Mapping[str, Any] | None) -> int:
    """The content version of a peer's full record we hold (0: none)."""
    version = (body or {}).get("version")
    return version if isinstance(version, int) else 0


def _reason(exc: BaseException) -> str:
    if isinstance(exc, SwarmError | ProtocolError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"
