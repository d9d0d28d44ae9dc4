"""Admission: a bounded wait for a run slot, in priority order.

A request either gets a slot at once, waits in a bounded queue (high before
normal before low, first come first served within a priority), or is refused
at once with Overloaded. Waiting longer is never the answer to a full queue:
the caller can try another peer now. When the queue is full, a newcomer that
outranks the lowest waiting request takes its place, and the evicted request
is told Overloaded too, so nothing admitted is dropped silently.

The waiters are the request tasks themselves; there is no worker pool, so a
cancelled or timed-out request simply leaves the queue.
"""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import trio

from node.errors import Overloaded
from protocols import Priority
from protocols.errors import ConfigError


@dataclass(eq=False)
class _Waiter:
    priority: Priority
    event: trio.Event = field(default_factory=trio.Event)
    granted: bool = False
    evicted: bool = False


class PriorityGate:
    """At most ``concurrency`` holders of a slot, at most ``max_waiting`` waiting."""

    def __init__(self, *, concurrency: int, max_waiting: int) -> None:
        if concurrency < 1 or max_waiting < 0:
            raise ConfigError("concurrency must be >= 1 and max_waiting >= 0")
        self.concurrency = concurrency
        self.max_waiting = max_waiting
        self.running = 0
        self._queues: dict[Priority, deque[_Waiter]] = {p: deque() for p in Priority}
        # Seconds one slot is held, smoothed; drives the retry-after hint.
        self.ewma_s = 0.05

    @property
    def waiting(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def depth(self) -> dict[str, int]:
        return {p.name.lower(): len(q) for p, q in self._queues.items()}

    def retry_after_ms(self) -> int:
        backlog = (self.waiting + self.running) / self.concurrency
        return max(1, int(1000 * self.ewma_s * max(backlog, 1.0)))

    @asynccontextmanager
    async def slot(self, priority: Priority) -> AsyncIterator[None]:
        """Hold a run slot for the body. Raises Overloaded at once when full."""
        if self.running < self.concurrency and self.waiting == 0:
            self.running += 1
        else:
            await self._wait(priority)
        started = trio.current_time()
        try:
            yield
        finally:
            held = trio.current_time() - started
            self.ewma_s += 0.2 * (held - self.ewma_s)
            self._release()

    async def _wait(self, priority: Priority) -> None:
        if self.waiting >= self.max_waiting:
            self._evict_below(priority)
        waiter = _Waiter(priority)
        self._queues[priority].append(waiter)
        try:
            await waiter.event.wait()
        except BaseException:
            if waiter.granted:
                self._release()  # the slot was handed to us as we were cancelled: pass it on
            elif not waiter.evicted:
                self._queues[priority].remove(waiter)
            raise
        if waiter.evicted:
            raise Overloaded(
                "evicted from the queue by higher-priority work",
                retry_after_ms=self.retry_after_ms(),
            )

    def _evict_below(self, priority: Priority) -> None:
        for lower in sorted(Priority, reverse=True):
            if lower <= priority:
                break
            if self._queues[lower]:
                victim = self._queues[lower].pop()  # the newest of the lowest priority
                victim.evicted = True
                victim.event.set()
                return
        raise Overloaded(
            f"queue full ({self.waiting} waiting, {self.running} running)",
            retry_after_ms=self.retry_after_ms(),
        )

    def _release(self) -> None:
        for p in Priority:
            if self._queues[p]:
                waiter = self._queues[p].popleft()
                waiter.granted = True
                waiter.event.set()
                return  # the slot passes straight to the waiter: running is unchanged
        self.running -= 1
