"""Peers this node was told to dial, what each serves, and forwarding to them.

A first, small membership: the ``--peer`` addresses are dialled at start and
redialled with backoff, each peer's record is refreshed periodically, and a
request for a model this node does not serve is forwarded to a peer whose
record lists it (least in flight first). Discovery (mDNS, DHT) and capability-
aware routing with failover replace the choice made here in later work.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field, replace
from typing import Any

import trio
from trio_typing import TaskStatus  # libp2p installs trio-typing, whose stubs shadow trio's

from protocols import CapabilityRecord, Request, Result

from .caller import Caller
from .caps import fetch_record
from .host import peer_info
from .service import Emit

log = logging.getLogger(__name__)

REFRESH_S = 10.0
MAX_BACKOFF_S = 30.0


@dataclass
class PeerEntry:
    peer_id: str
    address: str
    peer: Any = None  # libp2p's ID object, for dialling
    record: CapabilityRecord | None = None
    last_seen: float = 0.0
    error: str | None = None
    in_flight: int = 0

    @property
    def models(self) -> list[str]:
        if self.record is None:
            return []
        return [str(m.get("name", "")).lower() for m in self.record.body.get("models", [])]


@dataclass
class PeerDirectory:
    entries: dict[str, PeerEntry] = field(default_factory=dict)

    def serving(self, model: str) -> list[PeerEntry]:
        return [e for e in self.entries.values() if e.error is None and model in e.models]


class PeerLinks:
    """Keeps the configured peers dialled and their records fresh; forwards to them."""

    def __init__(self, host: Any, caller: Caller, addresses: list[str]) -> None:
        self._host = host
        self._caller = caller
        self.directory = PeerDirectory()
        self._infos = [peer_info(a) for a in addresses]  # ConfigError on a bad address
        self._all_linked = trio.Event()
        for address, info in zip(addresses, self._infos, strict=True):
            pid = str(info.peer_id)
            self.directory.entries[pid] = PeerEntry(
                pid, address, info.peer_id, error="not dialled yet"
            )

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            for info in self._infos:
                nursery.start_soon(self._keep, info)
            task_status.started()

    async def wait_linked(self, timeout_s: float) -> None:
        """Wait until every configured peer has answered once (or the timeout)."""
        with trio.move_on_after(timeout_s):
            await self._all_linked.wait()

    async def _keep(self, info: Any) -> None:
        entry = self.directory.entries[str(info.peer_id)]
        backoff = 0.5
        while True:
            try:
                with trio.fail_after(10):
                    await self._host.connect(info)
                entry.record = await fetch_record(self._host, info.peer_id)
                entry.last_seen, entry.error, backoff = trio.current_time(), None, 0.5
                if all(e.record is not None for e in self.directory.entries.values()):
                    self._all_linked.set()
                await trio.sleep(REFRESH_S)
            except Exception as exc:  # libp2p raises many types for a failed dial
                if entry.error is None:
                    log.warning("peer %s unreachable: %s", entry.address, exc)
                entry.error = f"{type(exc).__name__}: {exc}"
                await trio.sleep(backoff * (0.5 + random.random()))
                backoff = min(backoff * 2, MAX_BACKOFF_S)

    def serves(self, model: str) -> bool:
        return bool(self.directory.serving(model))

    async def forward(self, request: Request, emit: Emit) -> Result:
        candidates = self.directory.serving(request.model.lower())
        least = min(e.in_flight for e in candidates)
        entry = random.choice([e for e in candidates if e.in_flight == least])  # spread ties
        # Carry the time left, so the next node gives up when our caller would.
        left = trio.current_effective_deadline() - trio.current_time()
        deadline_ms = None if left == float("inf") else max(1, int(left * 1000))
        forwarded = replace(request, hops=request.hops + 1, deadline_ms=deadline_ms)

        async def relay(chunk: Any) -> None:
            await emit(chunk.outputs)

        entry.in_flight += 1
        try:
            result = await self._caller.call(entry.peer, forwarded, relay)
        finally:
            entry.in_flight -= 1
        via = self._host.get_id().to_base58()
        return replace(result, id=request.id, meta={**result.meta, "forwarded_by": via})
