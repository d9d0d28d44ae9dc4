"""bootstrap.mdns in one process: the zeroconf-thread -> trio hand-off, backpressure,
the problem report, and libp2p's process-wide handler list.

Most tests use a fake backend whose "browser thread" calls libp2p's global
``peerDiscovery`` exactly as libp2p's listener does, so no multicast is needed.
Real zeroconf runs only inside network namespaces the tests make
(test_mdns_netns.py): zeroconf multicasts on every interface, and tests must
send nothing beyond loopback and their own namespaces.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import multiaddr
import pytest
import trio
import trio.testing
from libp2p import generate_new_ed25519_identity
from libp2p.discovery.events.peerDiscovery import peerDiscovery
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from support import eventually

from bootstrap.events import Discovered, DiscoveryProblem, Source
from bootstrap.mdns import (
    Announcement,
    MdnsDiscovery,
    announce_addrs,
    service_type_for,
)

Event = Discovered | DiscoveryProblem
WAIT_S = 5.0


def new_peer_id() -> str:
    key_pair = generate_new_ed25519_identity()
    return str(ID.from_pubkey(key_pair.public_key))


def peer_info(peer_id: str, *addrs: str) -> PeerInfo:
    return PeerInfo(ID.from_base58(peer_id), [multiaddr.Multiaddr(a) for a in addrs])


def handlers() -> list[Any]:
    return list(peerDiscovery._peer_discovered_handlers)


class FakeBackend:
    """A stand-in for zeroconf: one thread that emits through the global singleton."""

    def __init__(self, announcement: Announcement) -> None:
        self.announcement = announcement
        self.announced = False
        self.closed = False
        self._queue: queue.SimpleQueue[PeerInfo | None] = queue.SimpleQueue()
        self._busy = 0  # emits not yet returned
        self._idle = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="fake-browser", daemon=True)
        self._thread.start()

    @property
    def threads(self) -> frozenset[threading.Thread]:
        return frozenset({self._thread})

    def announce(self) -> None:
        self.announced = True

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        self.closed = True

    def emit(self, info: PeerInfo) -> None:
        with self._idle:
            self._busy += 1
        self._queue.put(info)

    async def drained(self) -> None:
        """Wait (off the trio thread) until every emit has returned."""

        def wait() -> bool:
            with self._idle:
                return self._idle.wait_for(lambda: self._busy == 0, WAIT_S)

        assert await trio.to_thread.run_sync(wait), "the browser thread is stuck in a hand-off"

    def _run(self) -> None:
        while (info := self._queue.get()) is not None:
            peerDiscovery.emit_peer_discovered(info)
            with self._idle:
                self._busy -= 1
                self._idle.notify_all()


class Factory:
    def __init__(self) -> None:
        self.backends: list[FakeBackend] = []

    def __call__(self, announcement: Announcement) -> FakeBackend:
        backend = FakeBackend(announcement)
        self.backends.append(backend)
        return backend


@asynccontextmanager
async def service(
    capacity: int = 16, **options: Any
) -> AsyncIterator[tuple[MdnsDiscovery, FakeBackend, trio.MemoryReceiveChannel[Event]]]:
    factory = Factory()
    send, receive = trio.open_memory_channel[Event](capacity)
    mdns = MdnsDiscovery(
        options.pop("peer_id", new_peer_id()),
        options.pop("addrs", ["/ip4/10.0.0.1/tcp/7420/p2p/x"]),
        send,
        backend_factory=factory,
        **options,
    )
    async with trio.open_nursery() as nursery:
        with trio.fail_after(WAIT_S):
            await nursery.start(mdns.run)
        try:
            yield mdns, factory.backends[0], receive
        finally:
            nursery.cancel_scope.cancel()
    assert factory.backends[0].closed


async def next_event(receive: trio.MemoryReceiveChannel[Event]) -> Event:
    with trio.fail_after(WAIT_S):
        return await receive.receive()


async def nothing_more(receive: trio.MemoryReceiveChannel[Event]) -> None:
    """Once every task waits, no event is ready (nor a sender blocked on one)."""
    await trio.testing.wait_all_tasks_blocked()
    with pytest.raises(trio.WouldBlock):
        receive.receive_nowait()


async def test_find_crosses_from_the_browser_thread_to_the_channel() -> None:
    before = handlers()
    own = new_peer_id()
    other = new_peer_id()
    async with service(peer_id=own) as (mdns, backend, receive):
        await eventually(lambda: backend.announced)
        assert len(handlers()) == len(before) + 1
        backend.emit(peer_info(own, "/ip4/10.0.0.1/tcp/7420"))  # ourselves: ignored
        backend.emit(
            peer_info(other, "/ip4/0.0.0.0/tcp/1", "/ip4/127.0.0.1/tcp/2", "/ip4/10.0.0.5/tcp/2")
        )
        event = await next_event(receive)
        assert event == Discovered(
            other, ("/ip4/10.0.0.5/tcp/2", "/ip4/127.0.0.1/tcp/2"), Source.MDNS
        )
        assert mdns.found == {other}
    assert handlers() == before


async def test_a_full_channel_never_blocks_the_zeroconf_thread() -> None:
    peers = [new_peer_id() for _ in range(6)]
    async with service(capacity=0, max_pending=3) as (mdns, backend, receive):
        for i, peer in enumerate(peers):
            backend.emit(peer_info(peer, f"/ip4/10.0.0.{i + 2}/tcp/1"))
        await backend.drained()  # returned while nobody reads: nothing blocked the thread
        assert mdns.dropped >= 1
        assert len(mdns.found) + mdns.dropped == len(peers)
        got: list[str] = []
        with trio.fail_after(WAIT_S):
            while len(got) < len(mdns.found):
                event = await receive.receive()
                assert isinstance(event, Discovered)
                got.append(event.peer_id)
        await nothing_more(receive)
        assert sorted(got) == sorted(mdns.found)  # every accepted find arrives, once


async def test_a_waiting_find_is_replaced_by_the_newer_one() -> None:
    first, second = new_peer_id(), new_peer_id()
    async with service(capacity=0) as (_, backend, receive):
        backend.emit(peer_info(first, "/ip4/10.0.0.2/tcp/1"))
        backend.emit(peer_info(second, "/ip4/10.0.0.3/tcp/1"))
        backend.emit(peer_info(second, "/ip4/10.0.0.4/tcp/1"))
        await backend.drained()
        got: list[Discovered] = []
        with trio.fail_after(WAIT_S):
            for _ in range(2):
                event = await receive.receive()
                assert isinstance(event, Discovered)
                got.append(event)
        await nothing_more(receive)  # the replaced find is not sent as well
        assert [e.peer_id for e in got] == [first, second]
        assert got[-1].addrs == ("/ip4/10.0.0.4/tcp/1",)


async def test_silence_is_reported_then_cleared_by_a_find() -> None:
    peer = new_peer_id()
    async with service(no_answer_after_s=0.2) as (_, backend, receive):
        assert await next_event(receive) == DiscoveryProblem(
            Source.MDNS, "no mDNS answers on any interface after 0.2 s"
        )
        backend.emit(peer_info(peer, "/ip4/10.0.0.2/tcp/1"))
        assert await next_event(receive) == DiscoveryProblem(Source.MDNS, None)
        assert await next_event(receive) == Discovered(peer, ("/ip4/10.0.0.2/tcp/1",), Source.MDNS)


async def test_two_services_in_one_process_hear_only_their_own_finds() -> None:
    before = handlers()
    peer = new_peer_id()
    async with service() as (a, backend_a, receive_a), service() as (b, _, receive_b):
        assert len(handlers()) == len(before) + 2
        backend_a.emit(peer_info(peer, "/ip4/10.0.0.2/tcp/1"))
        assert isinstance(await next_event(receive_a), Discovered)
        await backend_a.drained()  # b's handler has run too, on a's thread
        with pytest.raises(trio.WouldBlock):
            receive_b.receive_nowait()
        assert a.found == {peer} and b.found == frozenset()
    assert handlers() == before


def broken(announcement: Announcement) -> FakeBackend:
    raise RuntimeError("No interfaces to listen on")


async def test_a_backend_that_cannot_start_is_reported_and_the_service_idles() -> None:
    before = handlers()
    send, receive = trio.open_memory_channel[Event](4)
    mdns = MdnsDiscovery(new_peer_id(), [], send, backend_factory=broken)
    async with trio.open_nursery() as nursery:
        await nursery.start(mdns.run)
        assert await next_event(receive) == DiscoveryProblem(
            Source.MDNS, "mDNS cannot run: No interfaces to listen on"
        )
        # An idle broken service does not hold up another one's finds in this process.
        peer = new_peer_id()
        async with service() as (_, backend, receive_other):
            backend.emit(peer_info(peer, "/ip4/10.0.0.2/tcp/1"))
            with trio.fail_after(1):
                assert await receive_other.receive() == Discovered(
                    peer, ("/ip4/10.0.0.2/tcp/1",), Source.MDNS
                )
        nursery.cancel_scope.cancel()
    assert handlers() == before


def test_announced_addresses_leave_loopback_out_unless_it_is_all() -> None:
    lan = "/ip4/192.168.1.5/tcp/7420/p2p/x"
    lo = "/ip4/127.0.0.1/tcp/7420/p2p/x"
    assert announce_addrs([lan, lo]) == (lan,)
    assert announce_addrs([lo]) == (lo,)
    assert announce_addrs([]) == ()


def test_private_swarms_browse_their_own_service_type() -> None:
    a, b = "ab" * 32, "cd" * 32
    assert service_type_for(None) == "_p2p._udp.local."
    assert service_type_for(a) == service_type_for(a) != service_type_for(b)
    assert len(service_type_for(a).split(".")[0]) <= 15  # DNS-SD service name limit


# --- real zeroconf -----------------------------------------------------------------------
