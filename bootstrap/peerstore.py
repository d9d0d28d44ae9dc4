"""Peers met in earlier runs, kept in the data dir so a restarted node redials them first.

libp2p 0.8.1 ships a persistent peerstore (``create_sync_sqlite_peerstore``), but
it is not used here: it has to replace the host's peerstore when the host is
built, and it writes to SQLite synchronously, on the trio thread, on every
peerstore change (identify, every DHT reply that carries addresses). This store
is ours, tiny and off the hot path: one table ``peer_id -> addrs, last_seen``,
written rarely (a peer connected, a peer was dropped), and every disk access
runs in a worker thread, one at a time.

Errors: ``sqlite3.Error`` and ``OSError`` from a broken or unwritable file pass
through unchanged; a bad peer id or address is a ``ValueError``.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path

import trio

from .events import Discovered, Source

FILENAME = "peerstore.sqlite"
MAX_PEERS = 1000  # the least recently seen beyond this are dropped
MAX_ADDRS = 16  # per peer

_SCHEMA = """
CREATE TABLE IF NOT EXISTS peers (
    peer_id   TEXT PRIMARY KEY,
    addrs     TEXT NOT NULL,
    last_seen REAL NOT NULL
)
"""


class PeerStore:
    """Known peers in ``<data dir>/peerstore.sqlite``; every method does its I/O in a thread.

    ``PeerStore(path)`` does no I/O; the file and its directory are created on
    the first call.
    """

    def __init__(self, path: Path, *, max_peers: int = MAX_PEERS) -> None:
        self.path = path
        self._max_peers = max_peers
        self._limiter = trio.CapacityLimiter(1)  # one disk access at a time

    @classmethod
    def in_data_dir(cls, data_dir: Path, *, max_peers: int = MAX_PEERS) -> PeerStore:
        return cls(data_dir / FILENAME, max_peers=max_peers)

    async def remember(
        self, peer_id: str, addrs: Sequence[str], *, seen_at: float | None = None
    ) -> None:
        """Record (or refresh) a peer and its addresses (multiaddr strings, without /p2p).

        A peer remembered with no addresses keeps the ones it had.
        """
        peer_id, clean = _check(peer_id, addrs)
        when = time.time() if seen_at is None else seen_at
        await trio.to_thread.run_sync(self._remember, peer_id, clean, when, limiter=self._limiter)

    async def forget(self, peer_id: str) -> None:
        await trio.to_thread.run_sync(self._forget, peer_id, limiter=self._limiter)

    async def known_peers(self, *, limit: int | None = None) -> list[Discovered]:
        """Remembered peers, most recently seen first, as ``Source.PEERSTORE`` events."""
        rows = await trio.to_thread.run_sync(self._load, limit, limiter=self._limiter)
        return [Discovered(pid, addrs, Source.PEERSTORE) for pid, addrs in rows]

    # The blocking halves, run in a worker thread.

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, timeout=5.0)
        db.execute(_SCHEMA)
        return db

    def _remember(self, peer_id: str, addrs: tuple[str, ...], when: float) -> None:
        db = self._connect()
        try:
            with db:
                if addrs:
                    db.execute(
                        "INSERT INTO peers (peer_id, addrs, last_seen) VALUES (?, ?, ?) "
                        "ON CONFLICT(peer_id) DO UPDATE SET addrs = excluded.addrs, "
                        "last_seen = max(last_seen, excluded.last_seen)",
                        (peer_id, json.dumps(addrs), when),
                    )
                else:
                    db.execute(
                        "UPDATE peers SET last_seen = max(last_seen, ?) WHERE peer_id = ?",
                        (when, peer_id),
                    )
                db.execute(
                    "DELETE FROM peers WHERE peer_id NOT IN "
                    "(SELECT peer_id FROM peers ORDER BY last_seen DESC LIMIT ?)",
                    (self._max_peers,),
                )
        finally:
            db.close()

    def _forget(self, peer_id: str) -> None:
        db = self._connect()
        try:
            with db:
                db.execute("DELETE FROM peers WHERE peer_id = ?", (peer_id,))
        finally:
            db.close()

    def _load(self, limit: int | None) -> list[tuple[str, tuple[str, ...]]]:
        db = self._connect()
        try:
            rows = db.execute(
                "SELECT peer_id, addrs FROM peers ORDER BY last_seen DESC LIMIT ?",
                (-1 if limit is None else limit,),
            ).fetchall()
        finally:
            db.close()
        out = []
        for peer_id, text in rows:
            try:
                addrs = json.loads(text)
            except ValueError:
                continue  # a damaged row is skipped, not fatal
            if isinstance(addrs, list) and all(isinstance(a, str) for a in addrs):
                out.append((str(peer_id), tuple(addrs)))
        return out


def _check(peer_id: str, addrs: Sequence[str]) -> tuple[str, tuple[str, ...]]:
    if not peer_id or not peer_id.isalnum():
        raise ValueError(f"{peer_id!r} is not a peer id")
    clean: list[str] = []
    for addr in addrs:
        if not isinstance(addr, str) or not addr.startswith("/"):
            raise ValueError(f"{addr!r} is not a multiaddr")
        # Keep the transport part: the peer id is stored once, in its own column.
        suffix = f"/p2p/{peer_id}"
        addr = addr[: -len(suffix)] if addr.endswith(suffix) else addr
        if addr not in clean:
            clean.append(addr)
    return peer_id, tuple(clean[:MAX_ADDRS])
