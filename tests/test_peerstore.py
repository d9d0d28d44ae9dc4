"""The persistent peerstore: what a restarted node redials first."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from bootstrap.events import Discovered, Source
from bootstrap.peerstore import FILENAME, PeerStore

A = "12D3KooWAaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
B = "12D3KooWBbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb"
C = "12D3KooWCccccccccccccccccccccccccccccccccccccccccccc"


async def test_remembered_peers_survive_reopening_most_recent_first(tmp_path: Path) -> None:
    store = PeerStore.in_data_dir(tmp_path / "data")
    assert await store.known_peers() == []
    await store.remember(
        A, ["/ip4/10.0.0.1/tcp/4001", f"/ip4/10.0.0.2/tcp/4001/p2p/{A}"], seen_at=1
    )
    await store.remember(B, ["/ip4/10.0.0.3/tcp/4001"], seen_at=2)
    assert (tmp_path / "data" / FILENAME).is_file()

    reopened = PeerStore(tmp_path / "data" / FILENAME)
    assert await reopened.known_peers() == [
        Discovered(B, ("/ip4/10.0.0.3/tcp/4001",), Source.PEERSTORE),
        Discovered(A, ("/ip4/10.0.0.1/tcp/4001", "/ip4/10.0.0.2/tcp/4001"), Source.PEERSTORE),
    ]
    # Seen again: new addresses, now the most recent; no addresses keeps the old ones.
    await reopened.remember(A, ["/ip4/10.0.0.9/tcp/4001"], seen_at=3)
    await reopened.remember(B, [], seen_at=4)
    assert await PeerStore.in_data_dir(tmp_path / "data").known_peers() == [
        Discovered(B, ("/ip4/10.0.0.3/tcp/4001",), Source.PEERSTORE),
        Discovered(A, ("/ip4/10.0.0.9/tcp/4001",), Source.PEERSTORE),
    ]
    assert [d.peer_id for d in await reopened.known_peers(limit=1)] == [B]


async def test_forget_removes_a_peer_for_good(tmp_path: Path) -> None:
    store = PeerStore.in_data_dir(tmp_path)
    await store.remember(A, ["/ip4/10.0.0.1/tcp/4001"])
    await store.remember(B, ["/ip4/10.0.0.2/tcp/4001"])
    await store.forget(A)
    await store.forget(C)  # unknown: nothing happens
    assert [d.peer_id for d in await PeerStore.in_data_dir(tmp_path).known_peers()] == [B]


async def test_the_store_keeps_the_most_recently_seen(tmp_path: Path) -> None:
    store = PeerStore.in_data_dir(tmp_path, max_peers=2)
    for when, peer in enumerate((A, B, C)):
        await store.remember(peer, ["/ip4/10.0.0.1/tcp/4001"], seen_at=when)
    assert [d.peer_id for d in await store.known_peers()] == [C, B]


async def test_bad_input_is_refused_and_a_damaged_row_is_skipped(tmp_path: Path) -> None:
    store = PeerStore.in_data_dir(tmp_path)
    with pytest.raises(ValueError):
        await store.remember("not a peer id", ["/ip4/10.0.0.1/tcp/4001"])
    with pytest.raises(ValueError):
        await store.remember(A, ["10.0.0.1:4001"])
    await store.remember(A, ["/ip4/10.0.0.1/tcp/4001"])
    with sqlite3.connect(store.path) as db:
        db.execute("INSERT INTO peers VALUES (?, ?, ?)", (B, "{not json", 0.0))
    db.close()
    assert [d.peer_id for d in await store.known_peers()] == [A]
