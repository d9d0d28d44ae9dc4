"""Bootstrap list and Kademlia DHT: real libp2p hosts on loopback, in this process.

Ten nodes join through one bootstrap node and each finds exactly the providers
of a model it does not serve; an unreachable bootstrap peer is reported and
redialled with growing, bounded gaps, and reconnected when it comes back.
"""

from __future__ import annotations

import hashlib
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import multihash  # type: ignore[import-untyped]
import pytest
import trio
from libp2p import generate_new_ed25519_identity
from libp2p.peer.id import ID
from support import eventually
from trio_typing import TaskStatus

from bootstrap.addrs import dialable_addrs, peer_info
from bootstrap.dht import DhtConfig, ModelDHT, Provider, model_key
from bootstrap.dialer import Backoff, BootstrapDialer
from bootstrap.events import Discovered, DiscoveryProblem, Source
from node.net.host import running_host
from protocols.errors import ConfigError

LOOPBACK = "/ip4/127.0.0.1/tcp/0"
Event = Discovered | DiscoveryProblem
DEFAULT_DHT = DhtConfig()
FAST = Backoff(initial_s=0.1, max_s=0.8, factor=2.0, jitter=0.1)


@dataclass
class Peer:
    host: Any
    dht: ModelDHT
    dialer: BootstrapDialer | None
    events: list[Event] = field(default_factory=list)
    stopping: trio.Event = field(default_factory=trio.Event)

    def stop(self) -> None:
        self.stopping.set()

    @property
    def peer_id(self) -> str:
        return str(self.host.get_id().to_base58())

    def discovered(self, source: Source) -> set[str]:
        return {e.peer_id for e in self.events if isinstance(e, Discovered) and e.source == source}


async def run_peer(
    *,
    bootstrap: str | None = None,
    models: Sequence[str] = (),
    dht_config: DhtConfig = DEFAULT_DHT,
    announce: Callable[[Any], Sequence[str]] | None = None,
    task_status: TaskStatus[Peer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """A host with the DHT (and the dialer, given a bootstrap address) until ``stop()``.

    Stop peers that way, not by cancelling this task: py-libp2p 0.8.1 leaves
    connection sockets unclosed when the task around ``host.run`` is cancelled
    (each ``SwarmConn.close`` is interrupted, and the host's shielded close
    then skips connections already closing). Only our services are cancelled
    here; the host is closed on a normal exit.
    """
    send, receive = trio.open_memory_channel[Event](64)
    async with running_host(None, [LOOPBACK]) as host, trio.open_nursery() as nursery:
        dialer = None if bootstrap is None else BootstrapDialer(host, [bootstrap], send)
        said = None if announce is None else partial(announce, host)
        peer = Peer(host, ModelDHT(host, send, config=dht_config, announce=said), dialer)

        async def collect() -> None:
            async for event in receive:
                peer.events.append(event)

        nursery.start_soon(collect)
        if dialer is not None:
            await nursery.start(dialer.run)
        await nursery.start(peer.dht.run)
        for model in models:
            await peer.dht.provide(model)
        task_status.started(peer)
        await peer.stopping.wait()
        nursery.cancel_scope.cancel()


def test_model_key_is_the_sha2_256_multihash_of_the_lowercased_name() -> None:
    key = model_key("MiniLM-L6")
    assert key == b"\x12\x20" + hashlib.sha256(b"minilm-l6").digest()
    assert multihash.decode(key).name == "sha2-256"
    assert model_key("minilm-l6") == key == model_key(" MiniLM-L6 ")
    assert model_key("other") != key
    with pytest.raises(ConfigError):
        model_key("  ")


def test_backoff_grows_with_jitter_up_to_its_bound() -> None:
    backoff = Backoff(initial_s=1.0, max_s=10.0, factor=2.0, jitter=0.2)
    assert [backoff.delay(n, 0.5) for n in range(1, 7)] == [1, 2, 4, 8, 10, 10]
    assert backoff.delay(1, 0.0) == pytest.approx(0.8)
    assert backoff.delay(1, 0.999999) == pytest.approx(1.2)
    assert backoff.delay(10_000, 0.999999) == 10.0  # bounded, no overflow
    with pytest.raises(ConfigError):
        Backoff(initial_s=5.0, max_s=1.0)


async def test_a_bad_bootstrap_address_is_a_config_error() -> None:
    async with running_host(None, [LOOPBACK]) as host:
        send, _receive = trio.open_memory_channel[Event](1)
        with pytest.raises(ConfigError):
            BootstrapDialer(host, ["/ip4/127.0.0.1/tcp/4001"], send)  # no /p2p part


async def test_ten_nodes_find_exactly_the_providers_of_a_model() -> None:
    serves = {i: ("alpha",) if i < 4 else ("beta",) if i < 7 else () for i in range(10)}
    async with trio.open_nursery() as nursery:
        boot = await nursery.start(run_peer)
        address = dialable_addrs(boot.host)[0]
        peers: list[Peer] = []
        with trio.fail_after(10):
            for i in range(10):
                peers.append(
                    await nursery.start(partial(run_peer, bootstrap=address, models=serves[i]))
                )
        want = {
            model: {p.peer_id for i, p in enumerate(peers) if model in serves[i]}
            for model in ("alpha", "beta")
        }
        assert len(want["alpha"]) == 4 and len(want["beta"]) == 3
        found: dict[tuple[int, str], set[str]] = {}

        async def look(i: int, model: str) -> None:
            providers = await peers[i].dht.find_providers(model, timeout_s=5.0)
            assert all(isinstance(p, Provider) and p.addrs for p in providers)
            assert all("/p2p/" not in a for p in providers for a in p.addrs)
            found[i, model] = {p.peer_id for p in providers}

        wanted = [(i, m) for i in range(10) for m in ("alpha", "beta") if m not in serves[i]]
        with trio.fail_after(20):  # lookups are hints: allow the DHT a few rounds
            while any(found.get(q) != want[q[1]] for q in wanted):
                async with trio.open_nursery() as lookups:
                    for i, model in wanted:
                        if found.get((i, model)) != want[model]:
                            lookups.start_soon(look, i, model)
                if any(found.get(q) != want[q[1]] for q in wanted):
                    await trio.sleep(0.5)

        for i, peer in enumerate(peers):
            assert peer.dialer is not None and peer.dialer.any_connected()
            assert boot.peer_id in peer.discovered(Source.BOOTSTRAP)
            others = set().union(*(want[m] for m in ("alpha", "beta") if m not in serves[i]))
            await eventually(lambda: others <= peer.discovered(Source.DHT))  # noqa: B023
            assert peer.dht.routing_table_size() > 0
            assert not [e for e in peer.events if isinstance(e, DiscoveryProblem) and e.problem]
        for peer in [*peers, boot]:
            peer.stop()


async def test_provider_records_carry_the_announced_addresses_only() -> None:
    """A node whose listen addresses are private (here: loopback) announces in the
    DHT only what it is told to, and again at once when that changes."""
    said = ["/ip4/10.99.0.1/tcp/4242"]

    def announce(host: Any) -> list[str]:
        return [f"{a}/p2p/{host.get_id()}" for a in said]

    async with trio.open_nursery() as nursery:
        boot = await nursery.start(run_peer)
        address = dialable_addrs(boot.host)[0]
        provider = await nursery.start(
            partial(run_peer, bootstrap=address, models=("alpha",), announce=announce)
        )

        async def found() -> tuple[str, ...]:
            return tuple(
                a
                for p in await boot.dht.find_providers("alpha", timeout_s=5.0)
                if p.peer_id == provider.peer_id
                for a in p.addrs
            )

        with trio.fail_after(20):
            while await found() != ("/ip4/10.99.0.1/tcp/4242",):
                await provider.dht.provide("alpha")  # the first may beat the routing table
                await trio.sleep(0.2)
            said[:] = ["/ip4/10.99.0.2/tcp/4242"]
            provider.dht.reannounce()
            while await found() != ("/ip4/10.99.0.2/tcp/4242",):  # noqa: ASYNC110
                await trio.sleep(0.2)
        provider.stop()
        boot.stop()


async def test_an_empty_routing_table_is_reported_and_cleared() -> None:
    config = DhtConfig(empty_grace_s=0.0, seed_interval_s=0.1)
    async with trio.open_nursery() as nursery:
        lone = await nursery.start(partial(run_peer, dht_config=config))
        other = await nursery.start(partial(run_peer, dht_config=config))

        def problems() -> list[str | None]:
            return [e.problem for e in lone.events if isinstance(e, DiscoveryProblem)]

        await eventually(lambda: problems() == ["DHT routing table empty"])
        assert lone.dht.problem == "DHT routing table empty"
        with trio.fail_after(5):
            await lone.host.connect(peer_info(dialable_addrs(other.host)[0]))
        await eventually(lambda: problems() == ["DHT routing table empty", None])
        assert lone.dht.routing_table_size() == 1
        lone.stop()
        other.stop()


class CountingHost:
    """A real host whose dials are timed, to watch the backoff from outside."""

    def __init__(self, host: Any) -> None:
        self._host = host
        self.dials: list[tuple[float, float]] = []  # (start, end)

    async def connect(self, info: Any) -> None:
        start = trio.current_time()
        try:
            await self._host.connect(info)
        finally:
            self.dials.append((start, trio.current_time()))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._host, name)


async def test_unreachable_bootstrap_backs_off_and_reconnects_when_back() -> None:
    key_pair = generate_new_ed25519_identity()
    boot_id = ID.from_pubkey(key_pair.public_key).to_base58()
    boot_listen = "/ip4/127.0.0.1/tcp/{}"
    send, receive = trio.open_memory_channel[Event](64)
    events: list[Event] = []

    def bootstrap_events() -> list[Event]:
        return [e for e in events if e.source == Source.BOOTSTRAP]

    # Hold a port without listening on it: dials to it are refused.
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        port = holder.getsockname()[1]
        address = f"{boot_listen.format(port)}/p2p/{boot_id}"
        async with running_host(None, [LOOPBACK]) as raw, trio.open_nursery() as nursery:

            async def collect() -> None:
                async for event in receive:
                    events.append(event)

            nursery.start_soon(collect)
            host = CountingHost(raw)
            dialer = BootstrapDialer(host, [address], send, backoff=FAST, check_interval_s=0.5)
            await nursery.start(dialer.run)
            await eventually(lambda: len(host.dials) >= 5, timeout_s=15)
            holder.close()

            # The pause from one dial's end to the next one's start (each libp2p
            # dial retries on its own for ~0.7 s first).
            gaps = [b[0] - a[1] for a, b in zip(host.dials, host.dials[1:], strict=False)][:4]
            assert gaps[0] >= FAST.initial_s * (1 - FAST.jitter)
            assert gaps[1] > 1.4 * gaps[0] and gaps[2] > 1.4 * gaps[1], gaps
            assert max(gaps) < FAST.max_s + 0.3, gaps  # bounded (plus scheduling slack)
            problems = [e for e in bootstrap_events() if isinstance(e, DiscoveryProblem)]
            assert problems and problems[0].problem is not None
            assert problems[0].problem.startswith("bootstrap unreachable: ")
            assert dialer.problem is not None and not dialer.any_connected()
            assert dialer.links[boot_id].failures >= 4

            for _ in range(2):  # back on the same port with the same identity; then gone again
                async with running_host(key_pair, [boot_listen.format(port)]):
                    await eventually(dialer.any_connected, timeout_s=5)
                    await eventually(lambda: isinstance(bootstrap_events()[-1], Discovered))
                    assert bootstrap_events()[-2:] == [
                        DiscoveryProblem(Source.BOOTSTRAP, None),
                        Discovered(boot_id, (boot_listen.format(port),), Source.BOOTSTRAP),
                    ]
                    assert dialer.problem is None and dialer.links[boot_id].failures == 0
                # Gone: the loss is noticed and reported, and the dials go on.
                await eventually(lambda: not dialer.any_connected(), timeout_s=5)
                await eventually(lambda: dialer.problem is not None, timeout_s=5)
                dials = len(host.dials)
                await eventually(lambda: len(host.dials) > dials, timeout_s=5)  # noqa: B023
            nursery.cancel_scope.cancel()
