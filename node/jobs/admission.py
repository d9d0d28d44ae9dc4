"""Admission: a bounded wait for a run slot, in priority order, fair between peers.

A request either gets a slot at once, waits in a bounded room (high before
normal before low; within a priority, shared fairly between the peers that
sent the work: ``fair_queue``), or is refused at once with Overloaded. Waiting
longer is never the answer to a full room: the caller can try another peer
now. When the room is full, a newcomer that outranks a waiting request, or
whose peer waits for less than the heaviest one, takes the place of that
peer's newest request, and the evicted request is told Overloaded too, so
nothing admitted is dropped silently. Without fair share every request is held
against one holder (``EVERYONE``): first come, first served within a priority.

The waiters are the request tasks themselves; there is no worker pool, so a
cancelled or timed-out request simply leaves the room.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import trio

from node.errors import OverBudget, Overloaded
from protocols import Priority
from protocols.errors import ConfigError

from .fair_queue import EVERYONE, FairQueue, Who


@dataclass(eq=False)
class _Waiter:
    who: Who  # whose it is
    key: Who  # the share it waits in: ``who``, or EVERYONE without fair share
    priority: Priority
    event: trio.Event = field(default_factory=trio.Event)
    granted: bool = False
    evicted: bool = False
    charged: float = 0.0  # the cost its holder was charged when it was let in


def _no_limit(_: str) -> int:
    return 1 << 62


class PriorityGate:
    """At most ``concurrency`` holders of a slot, at most ``max_waiting`` waiting.

    ``weight_of`` and ``queued_limit`` give each holder's weight and how many of
    its requests may wait here (more are refused with OverBudget ``queued``).
    Without ``fair``, every request waits in one share (first come, first served
    within a priority); the counts per holder are kept all the same.
    """

    def __init__(
        self,
        *,
        concurrency: int,
        max_waiting: int,
        weight_of: Callable[[str], float] = lambda _: 1.0,
        queued_limit: Callable[[str], int] = _no_limit,
        fair: bool = True,
    ) -> None:
        if concurrency < 1 or max_waiting < 0:
            raise ConfigError("concurrency must be >= 1 and max_waiting >= 0")
        self.concurrency = concurrency
        self.max_waiting = max_waiting
        self.running = 0
        self.fair = fair
        self.running_by: dict[str, int] = {}  # holder -> slots it holds
        self._queued_by: dict[str, int] = {}  # holder -> requests it has waiting
        self._room: FairQueue[_Waiter] = FairQueue(weight_of)
        self._queued_limit = queued_limit
        # Seconds one slot is held, smoothed; drives the retry-after hint and the
        # cost a holder is charged when its request starts.
        self.ewma_s = 0.05

    @property
    def waiting(self) -> int:
        return len(self._room)

    def depth(self) -> dict[str, int]:
        return self._room.depth()

    def queued_by(self) -> dict[str, int]:
        """Requests waiting, per holder."""
        return dict(self._queued_by)

    def origins(self, holder: str) -> dict[str, int]:
        """Requests of ``holder`` waiting, per origin (with fair share)."""
        return self._room.origins(holder)

    def retry_after_ms(self) -> int:
        backlog = (self.waiting + self.running) / self.concurrency
        return max(1, int(1000 * self.ewma_s * max(backlog, 1.0)))

    @asynccontextmanager
    async def slot(self, priority: Priority, who: Who = EVERYONE) -> AsyncIterator[None]:
        """Hold a run slot for the body. Raises Overloaded at once when full."""
        key = who if self.fair else EVERYONE
        if self.running < self.concurrency and self.waiting == 0:
            self.running += 1
            charged = self.ewma_s
            self._room.begin(key, priority, charged)
        else:
            charged = (await self._wait(priority, who, key)).charged
        _count(self.running_by, who.holder, 1)
        started = trio.current_time()
        try:
            yield
        finally:
            held = trio.current_time() - started
            self.ewma_s += 0.2 * (held - self.ewma_s)
            self._room.end(key, priority, charged, held)
            _count(self.running_by, who.holder, -1)
            self._release()

    async def _wait(self, priority: Priority, who: Who, key: Who) -> _Waiter:
        limit = self._queued_limit(who.holder)
        if self._queued_by.get(who.holder, 0) >= limit:
            raise OverBudget(
                f"{limit} requests of this peer wait here already",
                "queued",
                self.retry_after_ms(),
            )
        if self.waiting >= self.max_waiting:
            self._evict_for(priority, key)
        waiter = _Waiter(who, key, priority)
        self._room.push(key, priority, waiter)
        _count(self._queued_by, who.holder, 1)
        try:
            await waiter.event.wait()
        except BaseException:
            if waiter.granted:
                # The slot was handed to us as we were cancelled: pass it on.
                self._room.end(key, priority, waiter.charged, 0.0)
                self._release()
            elif not waiter.evicted:
                self._room.remove(key, priority, waiter)
                _count(self._queued_by, who.holder, -1)
            raise
        if waiter.evicted:
            raise Overloaded(
                "evicted from the queue by higher-priority or lighter peers' work",
                retry_after_ms=self.retry_after_ms(),
            )
        return waiter

    def _evict_for(self, priority: Priority, who: Who) -> None:
        found = self._room.victim(who, priority)
        if found is None:
            raise Overloaded(
                f"queue full ({self.waiting} waiting, {self.running} running)",
                retry_after_ms=self.retry_after_ms(),
            )
        victim = found[2]
        victim.evicted = True
        _count(self._queued_by, victim.who.holder, -1)
        victim.event.set()

    def _release(self) -> None:
        popped = self._room.pop(self.ewma_s)
        if popped is None:
            self.running -= 1
            return
        waiter = popped[2]
        waiter.granted = True
        waiter.charged = self.ewma_s
        _count(self._queued_by, waiter.who.holder, -1)
        waiter.event.set()  # the slot passes straight to the waiter: running is unchanged


def _count(counts: dict[str, int], holder: str, by: int) -> None:
    """Add ``by`` to ``counts[holder]``; a count back at 0 leaves the map (bounded)."""
    n = counts.get(holder, 0) + by
    if n:
        counts[holder] = n
    else:
        counts.pop(holder, None)
