"""Private swarms: a peer outside the allow-list or without the swarm key is refused,
and the node keeps serving its members."""

from __future__ import annotations

import pytest
import trio
from conftest import NodeFactory
from libp2p import generate_new_ed25519_identity

from bootstrap.addrs import peer_info
from node.client import SwarmClient
from node.errors import ConnectionLost, PeerUnavailable
from node.membership.caps import RecordSigner, exchange_records
from node.net.access import load_allow_list, load_swarm_key, new_swarm_key_text
from node.net.host import build_host, running_host
from protocols import ErrorCode, RemoteError, RemoteProtocolError
from protocols.errors import ConfigError


def _peer_id(key_pair: object) -> str:
    return str(build_host(key_pair).get_id().to_base58())


async def test_allow_list_refuses_strangers_and_serves_members(
    node_factory: NodeFactory,
) -> None:
    member, stranger = generate_new_ed25519_identity(), generate_new_ed25519_identity()
    allow = frozenset({_peer_id(member)})
    async with node_factory(models=("fake:echo",), allow=allow) as node:
        address = node.addrs[0]
        async with SwarmClient.connect(address, key_pair=stranger) as client:
            with pytest.raises(RemoteError) as refused:
                await client.infer("echo", {"text": "let me in"})
            assert refused.value.code is ErrorCode.UNAUTHORIZED
            with pytest.raises((ConnectionLost, RemoteProtocolError, PeerUnavailable)):
                await client.record()  # no capability record for strangers either
        async with SwarmClient.connect(address, key_pair=member) as client:
            result = await client.infer("echo", {"text": "member"})
            record = await client.record()
    assert result.meta["served_by"] == node.peer_id
    assert record.body["view"]["access"] == {
        "private_swarm": False,
        "allow_list": True,
        "refused": 2,
    }
    assert node.access.refused_by_peer == {_peer_id(stranger): 2}


async def test_swarm_key_keeps_outsiders_from_the_handshake(
    node_factory: NodeFactory, tmp_path: object
) -> None:
    key = new_swarm_key_text().split()[-1]
    wrong = new_swarm_key_text().split()[-1]
    async with node_factory(models=("fake:echo",), swarm_key=key) as node:
        address = node.addrs[0]
        for outsider_key in (None, wrong):
            with pytest.raises(PeerUnavailable):
                async with SwarmClient.connect(address, swarm_key=outsider_key, timeout_s=3):
                    pytest.fail("an outsider completed the handshake")
        # A raw host without the key cannot read the record either.
        outsider = generate_new_ed25519_identity()
        hello = RecordSigner(outsider, dict).heartbeat(0, {}, client=True)
        async with running_host(outsider, ()) as host:
            # The handshake either hangs (the PSK stream is noise to a keyless host) or
            # fails at once (the node drops the connection first): both keep it out.
            refused = False
            with trio.move_on_after(3) as scope:
                try:
                    await host.connect(peer_info(address))
                    await exchange_records(host, peer_info(address).peer_id, hello)
                except Exception:  # libp2p's dial errors (SwarmDialAllFailedError, ...)
                    refused = True
                else:
                    pytest.fail("an outsider read the capability record")
            assert scope.cancelled_caught or refused
        async with SwarmClient.connect(address, swarm_key=key) as client:
            result = await client.infer("echo", {"text": "member"})
            record = await client.record()
    assert result.meta["served_by"] == node.peer_id
    assert record.body["view"]["access"]["private_swarm"] is True


def test_swarm_key_files(tmp_path: object) -> None:
    from pathlib import Path

    base = Path(str(tmp_path))
    good = base / "swarm.key"
    good.write_text(new_swarm_key_text())
    assert len(load_swarm_key(good)) == 64
    bare = base / "bare.key"
    bare.write_text("AB" * 32 + "\n")
    assert load_swarm_key(bare) == "ab" * 32
    for text in ["", "/key/swarm/psk/1.0.0/\n/base16/\nxyz\n", "nope\n" + "ab" * 32]:
        bad = base / "bad.key"
        bad.write_text(text)
        with pytest.raises(ConfigError):
            load_swarm_key(bad)
    with pytest.raises(ConfigError):
        load_swarm_key(base / "missing.key")


def test_allow_lists(tmp_path: object) -> None:
    from pathlib import Path

    pid = _peer_id(generate_new_ed25519_identity())
    listed = Path(str(tmp_path)) / "allow.txt"
    listed.write_text(f"# members\n{pid}  # laptop\n\n")
    assert load_allow_list([], []) is None
    assert load_allow_list([], [listed]) == {pid}
    assert load_allow_list([pid], []) == {pid}
    with pytest.raises(ConfigError):
        load_allow_list(["not a peer id!"], [])


async def test_peers_outside_the_allow_list_never_appear_in_the_table(
    node_factory: NodeFactory,
) -> None:
    async with (
        node_factory("member", models=("fake:echo",)) as member,
        node_factory("stranger", models=("fake:other",)) as stranger,
    ):
        user = generate_new_ed25519_identity()
        allow = frozenset({member.peer_id, _peer_id(user)})
        async with node_factory(
            "a", models=(), peers=(member.addrs[0], stranger.addrs[0]), allow=allow
        ) as a:
            assert set(a.services.membership.table.peers) == {member.peer_id}
            async with SwarmClient.connect(a.addrs[0], key_pair=user) as client:
                with pytest.raises(RemoteError) as missing:
                    await client.infer("other", {"text": "x"})  # only the stranger serves it
                assert missing.value.code is ErrorCode.MODEL_NOT_FOUND
                assert (await client.infer("echo", {"text": "x"})).meta["served_by"] == (
                    member.peer_id
                )
