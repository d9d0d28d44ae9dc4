"""/swarm/dialback/1.0.0 between real libp2p hosts on loopback: a fresh connection
proves an address, and the dialler's bounds hold (other IPs refused, rates capped).

The codec is checked first without I/O: any bytes give a message or a
RemoteProtocolError, in any chunking.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
from libp2p.peer.peerinfo import PeerInfo

from node.net.access import AccessPolicy, new_swarm_key_text
from node.net.host import running_host
from node.reach.dialback import (
    DIALBACK_PROTOCOL,
    MAX_DIALS,
    MAX_FRAME,
    Decoder,
    DialAnswer,
    DialBackLimits,
    DialBackServer,
    DialBackUnavailable,
    DialRequest,
    TokenBuckets,
    ask,
    encode,
)
from node.reach.reachability import DialResult, Outcome
from protocols.errors import RemoteProtocolError

LOOPBACK = "/ip4/127.0.0.1/tcp/0"


def addr_of(host: Any) -> str:
    return str(host.get_transport_addrs()[0])


@asynccontextmanager
async def pair(
    server: DialBackServer | None = None, *, psk: str | None = None
) -> AsyncIterator[tuple[Any, Any, DialBackServer]]:
    """Host x linked to host p; p serves dial-backs."""
    server = server or DialBackServer(psk=psk)
    async with (
        running_host(None, [LOOPBACK], psk=psk) as x,
        running_host(None, [LOOPBACK], psk=psk) as p,
    ):
        p.set_stream_handler(DIALBACK_PROTOCOL, server)
        await x.connect(PeerInfo(p.get_id(), p.get_transport_addrs()))
        yield x, p, server


def outcomes(answer: DialAnswer) -> dict[str, Outcome]:
    return {r.addr: r.outcome for r in answer.results}


# -- the codec ----------------------------------------------------------------------------


def test_messages_round_trip_and_decode_byte_by_byte() -> None:
    messages: list[DialRequest | DialAnswer] = [
        DialRequest(("/ip4/1.2.3.4/tcp/7420", "/ip6/::1/tcp/1")),
        DialAnswer("1.2.3.4", (DialResult("/ip4/1.2.3.4/tcp/7420", Outcome.OK),)),
        DialAnswer("1.2.3.4", (), "rate limited", 12.5),
        DialAnswer(None, (DialResult("/x", Outcome.REFUSED, "why" * 200),)),
    ]
    wire = b"".join(encode(m) for m in messages)
    decoder, got = Decoder(), []
    for i in range(len(wire)):
        decoder.feed(wire[i : i + 1])
        while (message := decoder.next_message()) is not None:
            got.append(message)
    assert got[:3] == messages[:3]
    assert isinstance(got[3], DialAnswer) and len(got[3].results[0].why) == 160  # cut, bounded


def test_any_bytes_give_a_message_or_a_remote_protocol_error() -> None:
    rng = random.Random(12)
    samples = [encode(DialRequest(("/ip4/1.2.3.4/tcp/1",)))]
    for _ in range(2000):
        base = bytearray(rng.choice(samples))
        for _ in range(rng.randint(1, 4)):
            base[rng.randrange(len(base))] = rng.randrange(256)
        payload = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 40)))
        for data in (bytes(base), len(payload).to_bytes(4, "big") + payload):
            decoder = Decoder()
            try:
                decoder.feed(data)
                decoder.next_message()
            except RemoteProtocolError:
                pass


def test_oversized_and_overlong_messages_are_refused() -> None:
    with pytest.raises(RemoteProtocolError):
        Decoder().feed((MAX_FRAME + 1).to_bytes(4, "big"))
    too_many = DialRequest(tuple(f"/ip4/1.2.3.4/tcp/{i}" for i in range(1, 20)))
    decoder = Decoder()
    decoder.feed(encode(too_many))
    with pytest.raises(RemoteProtocolError, match="up to 8"):
        decoder.next_message()


def test_token_buckets_allow_a_burst_then_a_steady_rate_and_stay_bounded() -> None:
    buckets = TokenBuckets(burst=3, every_s=20.0, max_keys=2)
    assert [buckets.take("a", 0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert buckets.take("a", 0.0) == pytest.approx(20.0)
    assert buckets.take("a", 10.0) == pytest.approx(10.0)  # half a token came back
    assert buckets.take("a", 20.0) == 0.0
    buckets.take("b", 20.0)
    buckets.take("c", 20.0)  # "a" is forgotten: at most two keys
    assert buckets.take("a", 20.0) == 0.0


# -- real hosts ---------------------------------------------------------------------------


async def test_a_fresh_connection_proves_the_listen_address_and_nothing_else() -> None:
    async with pair() as (x, p, server), running_host(None, [LOOPBACK]) as other:
        mine, theirs = addr_of(x), addr_of(other)
        with trio.socket.socket() as unused:  # a port nobody listens on
            await unused.bind(("127.0.0.1", 0))
            nobody = f"/ip4/127.0.0.1/tcp/{unused.getsockname()[1]}"
        answer = await ask(x, str(p.get_id()), [mine, nobody, theirs], timeout_s=10)
        await trio.sleep(0.3)  # x's swarm drops the half-made dial-back connection
        # The request's own connection is still x's only one to p, and no other stays.
        assert x.get_connected_peers() == [p.get_id()]
    assert answer.observed == "127.0.0.1" and answer.refused is None
    by_addr = {r.addr: r for r in answer.results}
    assert by_addr[mine].outcome is Outcome.OK
    assert by_addr[nobody].outcome is Outcome.FAILED and "connect" in by_addr[nobody].why
    # Another node's port answers, but its handshake does not prove x's id.
    assert by_addr[theirs].outcome is Outcome.FAILED
    assert "peer id" in by_addr[theirs].why
    assert server.describe() == {"requests": 1, "refused": 0, "dials_ok": 1, "dials_failed": 2}


async def test_only_the_ip_the_request_comes_from_is_dialled() -> None:
    async with pair() as (x, p, server):
        port = addr_of(x).rsplit("/", 1)[1]
        elsewhere = [f"/ip4/10.1.2.3/tcp/{port}", f"/ip4/192.168.7.7/tcp/{port}", "/ip6/::1/tcp/1"]
        others = [f"/dns4/example.com/tcp/{port}", f"{addr_of(x)}/p2p/{p.get_id()}"]
        answer = await ask(x, str(p.get_id()), [*elsewhere, *others], timeout_s=10)
    results = {r.addr: r for r in answer.results}
    assert all(r.outcome is Outcome.REFUSED for r in results.values()), results
    assert "not the IP you connect from (127.0.0.1)" in results[elsewhere[0]].why
    assert results[others[1]].why == "another peer's address"
    assert server.dials_ok == server.dials_failed == 0  # nothing was dialled at all


async def test_at_most_max_dials_addresses_are_dialled_per_request() -> None:
    async with pair() as (x, p, server):
        base = addr_of(x).rsplit("/", 1)[0]
        many = [f"{base}/{port}" for port in range(40001, 40001 + MAX_DIALS + 3)]
        answer = await ask(x, str(p.get_id()), many, timeout_s=10)
    counts = {o: list(outcomes(answer).values()).count(o) for o in Outcome}
    assert counts[Outcome.REFUSED] == 3 and server.dials_failed == MAX_DIALS


async def test_requests_per_peer_are_rate_limited() -> None:
    now = [0.0]
    server = DialBackServer(limits=DialBackLimits(per_peer_burst=2), clock=lambda: now[0])
    async with pair(server) as (x, p, _):
        peer, mine = str(p.get_id()), [addr_of(x)]
        first = [await ask(x, peer, mine, timeout_s=10) for _ in range(2)]
        limited = await ask(x, peer, mine, timeout_s=10)
        now[0] += 20.0  # one request's worth of time
        again = await ask(x, peer, mine, timeout_s=10)
    assert all(outcomes(a)[mine[0]] is Outcome.OK for a in first)
    assert limited.refused == "rate limited" and limited.results == ()
    assert limited.retry_after_s == pytest.approx(20.0)
    assert outcomes(again)[mine[0]] is Outcome.OK
    assert server.describe()["refused"] == 1 and server.dials_ok == 3


async def test_a_global_cap_holds_against_many_identities() -> None:
    server = DialBackServer(limits=DialBackLimits(global_per_minute=2), clock=lambda: 0.0)
    async with pair(server) as (x, p, _), running_host(None, [LOOPBACK]) as y:
        await y.connect(PeerInfo(p.get_id(), p.get_transport_addrs()))
        peer = str(p.get_id())
        answers = [await ask(h, peer, [addr_of(h)], timeout_s=10) for h in (x, y, x)]
    assert [a.refused for a in answers] == [None, None, "rate limited"]


async def test_strangers_and_peers_without_the_protocol_get_no_answer() -> None:
    server = DialBackServer(access=AccessPolicy(frozenset({"12D3KooWnobody"})))
    async with pair(server) as (x, p, _):
        with pytest.raises(DialBackUnavailable):
            await ask(x, str(p.get_id()), [addr_of(x)], timeout_s=5)
        # p asks x, which serves no dial-back protocol at all.
        with pytest.raises(DialBackUnavailable):
            await ask(p, str(x.get_id()), [addr_of(p)], timeout_s=5)


async def test_a_private_swarm_dials_back_with_its_key() -> None:
    key = new_swarm_key_text().split()[-1]
    async with pair(psk=key) as (x, p, _):
        mine = addr_of(x)
        answer = await ask(x, str(p.get_id()), [mine], timeout_s=10)
    assert outcomes(answer)[mine] is Outcome.OK
