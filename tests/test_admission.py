"""The priority gate: order, bounds, eviction, and cancellation without slot leaks."""

from __future__ import annotations

import pytest
import trio
import trio.lowlevel
import trio.testing

from node.errors import Overloaded
from node.jobs.admission import PriorityGate
from protocols import Priority


async def _hold(
    gate: PriorityGate, prio: Priority, name: str, log: list[str], release: trio.Event
) -> None:
    async with gate.slot(prio):
        log.append(name)
        await release.wait()


async def test_free_slot_is_taken_at_once() -> None:
    gate = PriorityGate(concurrency=2, max_waiting=0)
    async with gate.slot(Priority.LOW), gate.slot(Priority.LOW):
        assert gate.running == 2
    assert gate.running == 0


async def test_waiters_run_by_priority_then_arrival(autojump_clock: trio.abc.Clock) -> None:
    gate = PriorityGate(concurrency=1, max_waiting=10)
    order: list[str] = []
    release = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_hold, gate, Priority.NORMAL, "first", order, release)
        await trio.testing.wait_all_tasks_blocked()
        for name, prio in [
            ("low1", Priority.LOW),
            ("normal1", Priority.NORMAL),
            ("high1", Priority.HIGH),
            ("low2", Priority.LOW),
            ("high2", Priority.HIGH),
        ]:
            nursery.start_soon(_hold, gate, prio, name, order, release)
            await trio.testing.wait_all_tasks_blocked()
        assert gate.depth() == {"high": 2, "normal": 1, "low": 2}
        release.set()
    assert order == ["first", "high1", "high2", "normal1", "low1", "low2"]
    assert gate.running == 0 and gate.waiting == 0


async def test_full_queue_refuses_at_once_with_retry_after() -> None:
    gate = PriorityGate(concurrency=1, max_waiting=1)
    release = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_hold, gate, Priority.NORMAL, "a", [], release)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(_hold, gate, Priority.NORMAL, "b", [], release)
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(Overloaded) as info, trio.fail_after(0.5):
            async with gate.slot(Priority.NORMAL):
                pass
        assert info.value.retry_after_ms > 0
        release.set()


async def test_higher_priority_evicts_newest_lowest_waiter() -> None:
    gate = PriorityGate(concurrency=1, max_waiting=2)
    release = trio.Event()
    outcomes: dict[str, str] = {}

    async def job(name: str, prio: Priority) -> None:
        try:
            async with gate.slot(prio):
                outcomes[name] = "ran"
                await release.wait()
        except Overloaded:
            outcomes[name] = "overloaded"

    async with trio.open_nursery() as nursery:
        for name, prio in [
            ("run", Priority.NORMAL),
            ("low-old", Priority.LOW),
            ("low-new", Priority.LOW),
        ]:
            nursery.start_soon(job, name, prio)
            await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(job, "high", Priority.HIGH)
        await trio.testing.wait_all_tasks_blocked()
        assert outcomes == {"run": "ran", "low-new": "overloaded"}
        # A low newcomer cannot evict anyone: refused.
        nursery.start_soon(job, "low-late", Priority.LOW)
        await trio.testing.wait_all_tasks_blocked()
        assert outcomes["low-late"] == "overloaded"
        release.set()
    assert outcomes == {
        "run": "ran",
        "low-new": "overloaded",
        "high": "ran",
        "low-old": "ran",
        "low-late": "overloaded",
    }


async def test_cancelled_waiter_leaves_and_no_slot_leaks() -> None:
    gate = PriorityGate(concurrency=1, max_waiting=4)
    release = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_hold, gate, Priority.NORMAL, "a", [], release)
        await trio.testing.wait_all_tasks_blocked()
        with trio.CancelScope() as scope:
            nursery.start_soon(_cancel_soon, scope)
            async with gate.slot(Priority.HIGH):
                pytest.fail("a cancelled waiter must not get the slot")
        assert gate.waiting == 0
        release.set()
    assert gate.running == 0


async def test_cancel_right_after_grant_leaks_no_slot() -> None:
    gate = PriorityGate(concurrency=1, max_waiting=4)
    got: list[str] = []
    racer = trio.CancelScope()
    holder_done = trio.Event()

    async def holder() -> None:
        async with gate.slot(Priority.NORMAL):
            await holder_done.wait()
        racer.cancel()  # the slot was just handed to "racer", which has not resumed yet

    async def waiter(scope: trio.CancelScope, name: str) -> None:
        with scope:
            async with gate.slot(Priority.NORMAL):
                got.append(name)
                await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(holder)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(waiter, racer, "racer")
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(waiter, trio.CancelScope(), "next")
        await trio.testing.wait_all_tasks_blocked()
        holder_done.set()
    assert "next" in got
    assert gate.running == 0 and gate.waiting == 0


async def _cancel_soon(scope: trio.CancelScope) -> None:
    await trio.testing.wait_all_tasks_blocked()
    scope.cancel()
