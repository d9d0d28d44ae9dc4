"""Relay v2 as node/reach wires it, on loopback with real libp2p hosts in one process.

A relay R (hop served, "public"), destinations that reserve on it (``Relays``)
and dialers that reach them through it (``Circuits``): a circuit carries
streams end to end, its kind is "relayed", the relay's byte limit closes a
circuit past it while the relay keeps serving another, two circuits to one
destination end independently (py-libp2p's own pump couples them), a relay
that restarts is reserved on again, and the bucket that enforces bandwidth
keeps to its rate. The NAT cases, with daemons in namespaces, are in
test_nat_netns.py.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from typing import Any

import pytest
import trio
from libp2p import generate_new_ed25519_identity
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from support import eventually

from node.errors import PeerUnavailable
from node.net.host import running_host
from node.reach.circuits import Circuits, best_kind, relay_of
from node.reach.relay_service import RelayService, RelayServiceConfig, Throttle
from node.reach.relays import Relays, RelaysConfig

ECHO = TProtocol("/swarm-test/echo/1.0.0")
LOOPBACK = "/ip4/127.0.0.1/tcp/0"


@dataclass
class Peer:
    host: Any
    relay: RelayService
    circuits: Circuits
    relays: Relays | None = None

    @property
    def id(self) -> str:
        return str(self.host.get_id().to_base58())

    @property
    def addr(self) -> str:
        return f"{self.host.get_addrs()[0]}"


async def _echo(stream: Any) -> None:
    try:
        while data := await stream.read(65536):
            await stream.write(data)
    except Exception:
        pass
    finally:
        with suppress(Exception):
            await stream.close()


@asynccontextmanager
async def peer(
    *,
    public: bool,
    config: RelayServiceConfig = RelayServiceConfig(),
    relays_from: Callable[[], list[tuple[str, list[str]]]] | None = None,
    key_pair: Any = None,
    listen: str = LOOPBACK,
    dcutr: bool = False,
) -> AsyncIterator[Peer]:
    """A host with our relay protocol and circuits; DCUtR off unless asked for (on
    loopback its first, plain dial would upgrade every circuit within seconds)."""
    async with running_host(key_pair, [listen]) as host, trio.open_nursery() as nursery:
        host.set_stream_handler(ECHO, _echo)
        relay = RelayService(host, config, is_public=lambda: public)
        circuits = Circuits(host, relay.protocol, dcutr=dcutr)
        relay.protocol.on_relayed = circuits.on_relayed
        await nursery.start(relay.run)
        await nursery.start(circuits.run)
        relays = None
        if relays_from is not None:
            fast = RelaysConfig(ping_every_s=1.0, ping_timeout_s=0.5, backoff_max_s=1.0)
            relays = Relays(host, fast, is_public=lambda: public, candidates=relays_from)
            await nursery.start(relays.run)
        try:
            yield Peer(host, relay, circuits, relays)
        finally:
            nursery.cancel_scope.cancel()


async def echo(host: Any, peer_id: str, payload: bytes) -> bytes:
    stream = await host.new_stream(ID.from_base58(peer_id), [ECHO])
    try:
        await stream.write(payload)
        got = b""
        while len(got) < len(payload):
            data = await stream.read(len(payload) - len(got))
            if not data:
                break
            got += data
        return got
    finally:
        await stream.close()


def _candidates(*relays: Peer) -> Callable[[], list[tuple[str, list[str]]]]:
    return lambda: [(r.id, [r.addr.split("/p2p/")[0]]) for r in relays]


async def test_a_circuit_carries_streams_and_is_relayed() -> None:
    async with (
        peer(public=True) as r,
        peer(public=False, relays_from=_candidates(r)) as b,
        peer(public=False) as a,
    ):
        assert b.relays is not None
        with trio.fail_after(10):
            while not b.relays.circuit_addrs():
                await b.relays.wait_changed()
        (circuit,) = b.relays.circuit_addrs()
        assert circuit == f"{r.addr}/p2p-circuit/p2p/{b.id}"
        assert relay_of(circuit) == r.id
        with trio.fail_after(10):
            await a.circuits.connect(b.id, [circuit])
        assert a.circuits.kind_of(b.id) == "relayed"
        await eventually(lambda: b.circuits.kind_of(a.id) == "relayed")
        payload = os.urandom(300_000)
        with trio.fail_after(10):
            assert await echo(a.host, b.id, payload) == payload
        described = r.relay.describe()
        assert described["offering"] and described["reservations"] == 1
        assert described["bytes_relayed"] >= 2 * len(payload)
        assert a.circuits.describe()["connections"][b.id] == "relayed"


async def test_a_node_not_public_serves_no_hop() -> None:
    async with (
        peer(public=False) as r,
        peer(public=False, relays_from=_candidates(r)) as b,
    ):
        assert b.relays is not None
        await eventually(lambda: bool(b.relays and b.relays.describe()["failing"]), 10)
        assert not b.relays.circuit_addrs()
        assert r.relay.protocol.refused >= 1
        assert "PERMISSION_DENIED" in str(b.relays.describe()["failing"][r.id]["reason"])


async def test_past_its_byte_limit_a_circuit_is_closed_and_the_relay_serves_others() -> None:
    limited = RelayServiceConfig(circuit_bytes=200_000)
    async with (
        peer(public=True, config=limited) as r,
        peer(public=False, relays_from=_candidates(r)) as b,
        peer(public=False) as a,
        peer(public=False) as c,
    ):
        assert b.relays is not None
        with trio.fail_after(10):
            while not b.relays.circuit_addrs():
                await b.relays.wait_changed()
        circuit = b.relays.circuit_addrs()[0]
        with trio.fail_after(10):
            await a.circuits.connect(b.id, [circuit])
        with pytest.raises(Exception), trio.fail_after(15):  # noqa: B017 (any break will do)
            got = await echo(a.host, b.id, os.urandom(400_000))
            raise AssertionError(f"echoed {len(got)} bytes past the limit")  # short read: closed
        await eventually(lambda: a.circuits.kind_of(b.id) is None, 10)
        assert r.relay.protocol.closed_for["bytes"] >= 1
        with trio.fail_after(10):
            await c.circuits.connect(b.id, [circuit])
            assert await echo(c.host, b.id, b"x" * 1000) == b"x" * 1000


async def test_two_circuits_to_one_destination_end_independently() -> None:
    async with (
        peer(public=True) as r,
        peer(public=False, relays_from=_candidates(r)) as b,
        peer(public=False) as a,
        peer(public=False) as c,
    ):
        assert b.relays is not None
        with trio.fail_after(10):
            while not b.relays.circuit_addrs():
                await b.relays.wait_changed()
        circuit = b.relays.circuit_addrs()[0]
        with trio.fail_after(10):
            await a.circuits.connect(b.id, [circuit])
            await c.circuits.connect(b.id, [circuit])
        assert r.relay.protocol.circuits_open == 2
        await a.host.disconnect(ID.from_base58(b.id))
        await eventually(lambda: r.relay.protocol.circuits_open == 1, 10)
        with trio.fail_after(10):
            assert await echo(c.host, b.id, b"still here") == b"still here"
        assert c.circuits.kind_of(b.id) == "relayed"


async def test_a_relay_that_restarts_is_reserved_on_again() -> None:
    key = generate_new_ed25519_identity()
    listen = f"/ip4/127.0.0.1/tcp/{_free_port()}"
    async with peer(public=True, key_pair=key, listen=listen) as r:
        relay_id, relay_addr = r.id, r.addr
        candidates = lambda: [(relay_id, [relay_addr.split("/p2p/")[0]])]  # noqa: E731
        async with peer(public=False, relays_from=candidates) as b:
            assert b.relays is not None
            with trio.fail_after(10):
                while not b.relays.circuit_addrs():
                    await b.relays.wait_changed()
            await _relay_gone(r)
            with trio.fail_after(10):
                while b.relays.circuit_addrs():
                    await b.relays.wait_changed()
            async with peer(public=True, key_pair=key, listen=listen) as again:
                start = trio.current_time()
                with trio.fail_after(15):
                    while not b.relays.circuit_addrs():
                        await b.relays.wait_changed()
                print(f"re-reserved {trio.current_time() - start:.2f} s after the restart")
                assert again.relay.describe()["reservations"] == 1
                async with peer(public=False) as a:
                    with trio.fail_after(10):
                        await a.circuits.connect(b.id, list(b.relays.circuit_addrs()))
                        assert await echo(a.host, b.id, b"back") == b"back"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def _relay_gone(r: Peer) -> None:
    with trio.CancelScope(shield=True), trio.move_on_after(5):
        await r.host.close()


async def test_connect_with_nothing_that_works_is_peer_unavailable() -> None:
    async with peer(public=False) as a:
        bogus = "12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN"
        relay = "12D3KooWEyoppNCUx8Yx66oV9fJnriXwCcXwDDUA2kj6vnc6iDEp"
        with pytest.raises(PeerUnavailable), trio.fail_after(20):
            await a.circuits.connect(bogus, [f"/ip4/127.0.0.1/tcp/9/p2p/{relay}/p2p-circuit"])


def test_best_kind_prefers_a_direct_connection() -> None:
    assert best_kind(["relayed", "hole-punched"]) == "hole-punched"
    assert best_kind(["relayed", "direct"]) == "direct"
    assert best_kind(["relayed"]) == "relayed"
    assert best_kind([]) is None


def test_the_bucket_keeps_to_its_rate() -> None:
    now = [0.0]
    bucket = Throttle(1000, clock=lambda: now[0])
    assert bucket.wait_for(1000) == 0  # the first second's worth passes at once
    assert bucket.wait_for(500) == pytest.approx(0.5)
    now[0] += 0.5  # slept as told
    assert bucket.wait_for(500) == pytest.approx(0.5)
    now[0] += 10.0  # idle: the bucket refills to one second's worth, no more
    assert bucket.wait_for(1000) == 0
    assert bucket.wait_for(5000) == pytest.approx(1.0)  # past the burst: waits for a full one
    assert Throttle(0).wait_for(10**9) == 0


async def test_bandwidth_is_enforced_on_a_circuit() -> None:
    rate = 256 * 1024
    async with (
        peer(public=True, config=RelayServiceConfig(circuit_bandwidth=rate)) as r,
        peer(public=False, relays_from=_candidates(r)) as b,
        peer(public=False) as a,
    ):
        assert b.relays is not None
        with trio.fail_after(10):
            while not b.relays.circuit_addrs():
                await b.relays.wait_changed()
        with trio.fail_after(10):
            await a.circuits.connect(b.id, list(b.relays.circuit_addrs()))
        payload = os.urandom(384 * 1024)  # 768 KiB through the relay, both ways
        start = time.monotonic()
        with trio.fail_after(20):
            assert await echo(a.host, b.id, payload) == payload
        took = time.monotonic() - start
        # One second's burst, then the rest at the rate: at least ~2 s for 3 s' worth.
        assert took >= (2 * len(payload) - rate) / rate * 0.9, took


async def test_dcutr_upgrades_a_circuit_and_the_relayed_connection_stays() -> None:
    """On loopback DCUtR's first step, a plain dial from the side the circuit came
    to, succeeds: the kind becomes "direct" (not "hole-punched": nothing was
    punched), and the relayed connection is kept as a fallback."""
    async with (
        peer(public=True) as r,
        peer(public=False, relays_from=_candidates(r), dcutr=True) as b,
        peer(public=False, dcutr=True) as a,
    ):
        assert b.relays is not None
        with trio.fail_after(10):
            while not b.relays.circuit_addrs():
                await b.relays.wait_changed()
            await a.circuits.connect(b.id, list(b.relays.circuit_addrs()))
        assert a.circuits.kind_of(b.id) == "relayed"
        await eventually(lambda: a.circuits.kind_of(b.id) == "direct", 15)
        await eventually(lambda: b.circuits.kind_of(a.id) == "direct", 5)
        conns = a.host.get_network().connections[ID.from_base58(b.id)]
        assert any(c.get_connection_type().name == "RELAYED" for c in conns if not c.is_closed)
        before = r.relay.protocol.bytes_relayed
        payload = os.urandom(200_000)
        with trio.fail_after(10):
            assert await echo(a.host, b.id, payload) == payload
        assert r.relay.protocol.bytes_relayed - before < 10_000  # new streams go direct
