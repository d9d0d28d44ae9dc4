"""Hedged requests: a second peer for a job whose first is slow to say anything.

The node routing a job sends it to its first candidate; when no first chunk
(a stream) or answer (a whole job) has come ``delay_s`` later, it sends the job
to a second candidate too. The first of the two to deliver something wins: the
other is cancelled at once (its peer is told ``Cancel`` and stops), and only the
winner's chunks ever reach the caller. A racer that fails before delivering
anything leaves the other to go on alone; when both fail, the last failure is
the attempt's. Only idempotent jobs are hedged: the loser may have run in part.

``race`` does the I/O; which jobs hedge, after how long and where the second
goes are the dispatcher's (``node.jobs.dispatch``). ``HedgeStats`` counts what
``/metrics`` shows: hedges sent, races the hedge won, racers cancelled.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import trio

from protocols import Result, SwarmError

C = TypeVar("C")  # a candidate (node.jobs.dispatch.Choice)
Emit = Callable[[Mapping[str, Any]], Awaitable[None]]
Run = Callable[[C, Emit], Awaitable[Result]]


@dataclass
class HedgeStats:
    sent: int = 0  # second requests sent
    won: int = 0  # races the second request won
    cancelled: int = 0  # racers cancelled because the other delivered first

    def describe(self) -> dict[str, int]:
        return {"sent": self.sent, "won": self.won, "cancelled": self.cancelled}


class Failed(Exception, Generic[C]):
    """A raced attempt failed: which candidate, and its error (the last to fail)."""

    def __init__(self, choice: C, error: SwarmError) -> None:
        super().__init__(str(error))
        self.choice = choice
        self.error = error


@dataclass(eq=False)
class _Racer(Generic[C]):
    choice: C
    scope: trio.CancelScope
    result: Result | None = None
    error: SwarmError | None = None


async def race(
    run: Run[C],
    first: C,
    second: Callable[[], C | None],
    emit: Emit,
    delay_s: float,
    stats: HedgeStats,
) -> tuple[C, Result]:
    """``run(first, emit)``, and ``run(second(), emit)`` too when ``first`` has not
    delivered within ``delay_s`` (``second`` may find none: None). The winner and its
    result; raises ``Failed`` with the winner's error, or the last one's when no
    racer delivered."""
    winner: _Racer[C] | None = None
    racers: list[_Racer[C]] = []
    failures: list[_Racer[C]] = []  # in the order they failed
    news = trio.Event()  # the first racer delivered or ended

    def win(me: _Racer[C]) -> bool:
        nonlocal winner
        if winner is None:
            winner = me
            for other in racers:
                if other is not me and other.result is None and other.error is None:
                    other.scope.cancel()
                    stats.cancelled += 1
            if me is not racers[0]:
                stats.won += 1
        news.set()
        return winner is me

    async def go(me: _Racer[C]) -> None:
        async def mine(outputs: Mapping[str, Any]) -> None:
            if win(me):
                await emit(outputs)

        with me.scope:
            try:
                result = await run(me.choice, mine)
            except SwarmError as exc:
                me.error = exc
                failures.append(me)
            else:
                if win(me):
                    me.result = result
        news.set()

    async with trio.open_nursery() as nursery:
        racers.append(_Racer(first, trio.CancelScope()))
        nursery.start_soon(go, racers[0])
        with trio.move_on_after(delay_s):
            await news.wait()
        if winner is None and racers[0].error is None:
            hedge = second()
            if hedge is not None:
                stats.sent += 1
                racers.append(_Racer(hedge, trio.CancelScope()))
                nursery.start_soon(go, racers[1])
    if winner is not None:
        if winner.result is not None:
            return winner.choice, winner.result
        if winner.error is not None:
            raise Failed(winner.choice, winner.error)
    # No winner: every racer failed (a cancel from outside does not get here).
    last = failures[-1]
    assert last.error is not None
    raise Failed(last.choice, last.error)
