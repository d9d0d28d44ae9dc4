"""The waiting room of one model's gate: fair between peers within each priority.

Priorities stay strict (every HIGH waiter before any NORMAL one, NORMAL before
LOW). Within a priority the waiters are shared out by start-time fair queueing
(SFQ) over *holders*, the peers accountable for the work, each with a weight;
within a holder, the same again over its *origins* (the clients a forwarder
vouches for), with equal weights. So an origin only ever divides its holder's
share: a forwarder that invents a thousand origins gets its one share, cut in
a thousand pieces.

SFQ in one paragraph: each flow (a holder, or an origin within one) has a
virtual start tag for its head and a finish tag for the work it was given. A
flow that becomes busy starts at ``max(V, its finish)``, where V is the start
tag of the work dispatched last; the busy flow with the least start tag goes
next, and its finish moves on by ``cost / weight``. A flow that sends more than
its share runs ahead in virtual time and waits; one that sends less is served
as soon as the slot in use frees up. Costs are the gate's estimate of a slot's
time when the work starts, corrected by what it really took when it ends, so a
peer of long jobs and a peer of short ones share time, not counts.

When the room is full, ``victim`` names who gives way to a newcomer: a waiter
of a lower priority first (as before fairness), else the newest waiter of the
heaviest holder at the newcomer's priority (waiting work per weight), unless
the newcomer's own holder would be the heaviest; then the newcomer is refused.
A light peer is never the one refused while a heavier one waits.

State is kept only for flows with work waiting or running: at most the room's
size plus the gate's concurrency. A holder forgotten when idle loses at most
the one cost it was ahead by. Pure: no trio, no clock (virtual time only).
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from protocols import Priority

T = TypeVar("T")

ANYONE = "*"  # the one holder of a gate without fair share: first come, first served


@dataclass(frozen=True, slots=True)
class Who:
    """Whom a job is accounted to: ``holder``'s share, subdivided by ``origin``."""

    holder: str
    origin: str


EVERYONE = Who(ANYONE, ANYONE)


@dataclass(eq=False)
class _Flow(Generic[T]):
    start: float = 0.0  # virtual start of the head; meaningful while it has work waiting
    finish: float = 0.0  # virtual finish of the work it was given
    running: int = 0
    seq: int = 0  # when it became busy: ties go to the older
    items: deque[T] = field(default_factory=deque)


@dataclass(eq=False)
class _Holder(Generic[T]):
    weight: float
    start: float = 0.0
    finish: float = 0.0
    running: int = 0
    seq: int = 0
    queued: int = 0
    vtime: float = 0.0  # the origins' virtual time
    origins: dict[str, _Flow[T]] = field(default_factory=dict)


class _Level(Generic[T]):
    """One priority's holders."""

    def __init__(self, weight_of: Callable[[str], float], order: itertools.count[int]) -> None:
        self._weight_of = weight_of
        self._order = order
        self.holders: dict[str, _Holder[T]] = {}
        self.vtime = 0.0
        self.queued = 0

    def _holder(self, who: Who) -> tuple[_Holder[T], _Flow[T]]:
        h = self.holders.get(who.holder)
        if h is None:
            h = self.holders[who.holder] = _Holder(max(self._weight_of(who.holder), 1e-6))
        o = h.origins.get(who.origin)
        if o is None:
            o = h.origins[who.origin] = _Flow()
        return h, o

    def _busy(self, h: _Holder[T], o: _Flow[T]) -> None:
        """Tags for flows that had nothing waiting and now have."""
        if h.queued == 0:
            h.start, h.seq = max(self.vtime, h.finish), next(self._order)
        if not o.items:
            o.start, o.seq = max(h.vtime, o.finish), next(self._order)

    def push(self, who: Who, item: T) -> None:
        h, o = self._holder(who)
        self._busy(h, o)
        o.items.append(item)
        h.queued += 1
        self.queued += 1

    def begin(self, who: Who, cost: float) -> None:
        """Work of ``who`` starts without waiting (the room was empty)."""
        h, o = self._holder(who)
        self._busy(h, o)
        self._charge(h, o, cost)

    def _charge(self, h: _Holder[T], o: _Flow[T], cost: float) -> None:
        o.finish = o.start + cost
        h.vtime = o.start
        o.running += 1
        if o.items:
            o.start = o.finish
        h.finish = h.start + cost / h.weight
        self.vtime = h.start
        h.running += 1
        if h.queued:
            h.start = h.finish

    def pop(self, cost: float) -> tuple[Who, T]:
        name, h = min(
            ((n, h) for n, h in self.holders.items() if h.queued),
            key=lambda e: (e[1].start, e[1].seq),
        )
        origin, o = min(
            ((n, o) for n, o in h.origins.items() if o.items), key=lambda e: (e[1].start, e[1].seq)
        )
        item = o.items.popleft()
        h.queued -= 1
        self.queued -= 1
        self._charge(h, o, cost)
        return Who(name, origin), item

    def end(self, who: Who, charged: float, took: float) -> None:
        """Work of ``who`` charged at ``charged`` ended after ``took``: the tags follow."""
        h = self.holders.get(who.holder)
        o = h.origins.get(who.origin) if h is not None else None
        if h is None or o is None:
            return
        delta = took - charged
        h.finish += delta / h.weight
        if h.queued:
            h.start += delta / h.weight
        o.finish += delta
        if o.items:
            o.start += delta
        o.running -= 1
        h.running -= 1
        self._tidy(who.holder, h, who.origin, o)

    def remove(self, who: Who, item: T) -> bool:
        h = self.holders.get(who.holder)
        o = h.origins.get(who.origin) if h is not None else None
        if h is None or o is None or item not in o.items:
            return False
        o.items.remove(item)
        h.queued -= 1
        self.queued -= 1
        self._tidy(who.holder, h, who.origin, o)
        return True

    def newest_of_heaviest(self) -> tuple[Who, T, float] | None:
        """The newest waiter of the holder with the most waiting work per weight (of
        its origin with the most waiting), and that holder's load."""
        busy = [(n, h) for n, h in self.holders.items() if h.queued]
        if not busy:
            return None
        name, h = max(busy, key=lambda e: (e[1].queued / e[1].weight, e[1].start))
        origin, o = max(
            ((n, o) for n, o in h.origins.items() if o.items),
            key=lambda e: (len(e[1].items), e[1].start),
        )
        return Who(name, origin), o.items[-1], h.queued / h.weight

    def load_of(self, holder: str) -> float:
        h = self.holders.get(holder)
        return 0.0 if h is None else h.queued / h.weight

    def _tidy(self, name: str, h: _Holder[T], origin: str, o: _Flow[T]) -> None:
        if not o.items and not o.running:
            del h.origins[origin]
        if not h.queued and not h.running:
            del self.holders[name]


class FairQueue(Generic[T]):
    """Waiters by priority, then fair between holders and their origins (see above).

    ``weight_of(holder)`` is a holder's weight (> 0), read when it first has work.
    """

    def __init__(self, weight_of: Callable[[str], float] = lambda _: 1.0) -> None:
        order = itertools.count()
        self._levels: dict[Priority, _Level[T]] = {p: _Level(weight_of, order) for p in Priority}
        self._weight_of = weight_of

    def __len__(self) -> int:
        return sum(level.queued for level in self._levels.values())

    def depth(self) -> dict[str, int]:
        return {p.name.lower(): level.queued for p, level in self._levels.items()}

    def queued_by(self) -> dict[str, int]:
        """Waiters per holder, over all priorities."""
        out: dict[str, int] = {}
        for level in self._levels.values():
            for name, h in level.holders.items():
                if h.queued:
                    out[name] = out.get(name, 0) + h.queued
        return out

    def origins(self, holder: str) -> dict[str, int]:
        """Waiters of ``holder`` per origin, over all priorities."""
        out: dict[str, int] = {}
        for level in self._levels.values():
            h = level.holders.get(holder)
            for name, o in (h.origins if h is not None else {}).items():
                if o.items:
                    out[name] = out.get(name, 0) + len(o.items)
        return out

    def push(self, who: Who, priority: Priority, item: T) -> None:
        self._levels[priority].push(who, item)

    def begin(self, who: Who, priority: Priority, cost: float) -> None:
        """Account work that starts at once, with nothing waiting anywhere."""
        self._levels[priority].begin(who, cost)

    def pop(self, cost: float) -> tuple[Who, Priority, T] | None:
        """The next waiter to run (charged ``cost`` for now), or None if none waits."""
        for priority, level in self._levels.items():  # Priority order: HIGH first
            if level.queued:
                who, item = level.pop(cost)
                return who, priority, item
        return None

    def end(self, who: Who, priority: Priority, charged: float, took: float) -> None:
        """Work begun or popped at ``charged`` is over; it took ``took``."""
        self._levels[priority].end(who, charged, took)

    def remove(self, who: Who, priority: Priority, item: T) -> bool:
        """Take a waiter out (it was cancelled); False if it was not waiting."""
        return self._levels[priority].remove(who, item)

    def victim(self, who: Who, priority: Priority) -> tuple[Who, Priority, T] | None:
        """The room is full and ``who`` arrives at ``priority``: the waiter that gives
        way, taken out of the room, or None when the newcomer is the one refused."""
        for lower in sorted(Priority, reverse=True):  # LOW first
            if lower < priority:
                break
            level = self._levels[lower]
            found = level.newest_of_heaviest()
            if found is None:
                continue
            victim, item, load = found
            if lower == priority:
                mine = level.load_of(who.holder) + 1 / max(self._weight_of(who.holder), 1e-6)
                if load <= mine:
                    return None  # the newcomer's holder would be the heaviest: it gives way
            level.remove(victim, item)
            return victim, lower, item
        return None
