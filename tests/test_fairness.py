"""Fair share, pure: the fair queue's order and evictions, the ledger's limits (token
bucket, in flight, the HIGH budget, weights), forgetting idle peers, and origins
that only divide a forwarder's share. Time is a number moved by hand; costs are
given. Then the gate on trio's autojump clock: a light peer waits for one job,
not for a flood."""

from __future__ import annotations

import random
import re
from collections import Counter

import pytest
import trio
import trio.testing

from node.errors import OverBudget, Overloaded
from node.jobs.admission import PriorityGate
from node.jobs.fair_queue import EVERYONE, FairQueue, Who
from node.jobs.fairness import GATEWAY, OTHER, FairnessConfig, Ledger, who_for
from protocols import Priority, Request
from protocols.config import Table
from protocols.errors import ConfigError

N = Priority.NORMAL
PEER = "12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN"


def own(holder: str) -> Who:
    return Who(holder, holder)


def drain(queue: FairQueue[str], pops: int, cost_of: dict[str, float] | None = None) -> list[str]:
    """Pop ``pops`` items one at a time (one slot), each ending before the next; an
    item's holder's jobs take ``cost_of[holder]`` (the estimate is always 1)."""
    out = []
    for _ in range(pops):
        popped = queue.pop(1.0)
        assert popped is not None
        who, priority, _ = popped
        queue.end(who, priority, 1.0, (cost_of or {}).get(who.holder, 1.0))
        out.append(who.holder)
    return out


def test_backlogged_peers_share_by_weight(seed: int) -> None:
    rng = random.Random(seed)
    weights = {"a": 3.0, "b": 1.0, "c": 2.0}
    queue: FairQueue[str] = FairQueue(weights.__getitem__)
    arrivals = [h for h in weights for _ in range(60)]
    rng.shuffle(arrivals)  # the order they came in does not matter once all are waiting
    for i, holder in enumerate(arrivals):
        queue.push(own(holder), N, f"{holder}{i}")
    got = Counter(drain(queue, 60))
    assert abs(got["a"] - 30) <= 1 and abs(got["c"] - 20) <= 1 and abs(got["b"] - 10) <= 1


def test_a_light_peer_goes_next_however_long_the_floods_queue() -> None:
    queue: FairQueue[str] = FairQueue()
    for i in range(50):
        queue.push(own("g"), N, f"g{i}")
    assert drain(queue, 10) == ["g"] * 10
    queue.push(own("p"), N, "p0")
    assert drain(queue, 2) == ["p", "g"]
    assert len(queue) == 39 and queue.queued_by() == {"g": 39}


def test_shares_are_of_time_not_of_counts() -> None:
    """a's jobs take three times what was charged when they started: it gets a
    quarter of the jobs, and so half of the time."""
    queue: FairQueue[str] = FairQueue()
    for i in range(40):
        queue.push(own("a"), N, f"a{i}")
        queue.push(own("b"), N, f"b{i}")
    got = Counter(drain(queue, 40, {"a": 3.0, "b": 1.0}))
    assert abs(got["a"] - 10) <= 1 and abs(got["b"] - 30) <= 1


def test_origins_divide_their_forwarders_share_and_never_add_to_it() -> None:
    queue: FairQueue[str] = FairQueue()
    for i in range(20):
        for origin in range(10):  # a forwarder vouching for ten clients (or inventing them)
            queue.push(Who("fwd", f"o{origin}"), N, f"f{origin}.{i}")
        queue.push(own("q"), N, f"q{i}")
    order: list[Who] = []
    for _ in range(40):
        popped = queue.pop(1.0)
        assert popped is not None
        queue.end(popped[0], N, 1.0, 1.0)
        order.append(popped[0])
    holders = Counter(w.holder for w in order)
    assert abs(holders["fwd"] - 20) <= 1 and abs(holders["q"] - 20) <= 1
    # Within the forwarder, its clients take turns.
    origins = Counter(w.origin for w in order if w.holder == "fwd")
    assert max(origins.values()) - min(origins.values()) <= 1 and len(origins) == 10


def test_priorities_stay_strict_and_each_is_fair_within() -> None:
    queue: FairQueue[str] = FairQueue()
    for i in range(3):
        queue.push(own("g"), Priority.LOW, f"gl{i}")
        queue.push(own("g"), Priority.HIGH, f"gh{i}")
        queue.push(own("p"), N, f"pn{i}")
    items = []
    while (popped := queue.pop(1.0)) is not None:
        queue.end(popped[0], popped[1], 1.0, 1.0)
        items.append(popped[2])
    assert items == ["gh0", "gh1", "gh2", "pn0", "pn1", "pn2", "gl0", "gl1", "gl2"]


def test_when_full_the_heaviest_gives_way_never_the_light() -> None:
    queue: FairQueue[str] = FairQueue()
    for i in range(6):
        queue.push(own("g"), N, f"g{i}")
    queue.push(own("h"), N, "h0")
    queue.push(own("h"), N, "h1")
    # A light newcomer takes the place of the heaviest peer's newest waiter.
    assert queue.victim(own("p"), N) == (own("g"), N, "g5")
    # The heaviest's own newcomer is refused; so is one that would be as heavy.
    assert queue.victim(own("g"), N) is None
    # A lower priority gives way first, whoever waits there.
    queue.push(own("p"), Priority.LOW, "pl")
    assert queue.victim(own("g"), N) == (own("p"), Priority.LOW, "pl")
    # Nobody gives way to a LOW newcomer but a heavier LOW peer.
    assert queue.victim(own("x"), Priority.LOW) is None
    # A weight counts: w=4 with 4 waiting is lighter than g with 5 at w=1.
    weighted: FairQueue[str] = FairQueue(lambda h: 4.0 if h == "big" else 1.0)
    for i in range(3):
        weighted.push(own("big"), N, f"b{i}")
    weighted.push(own("g"), N, "g0")
    weighted.push(own("g"), N, "g1")
    assert weighted.victim(own("big"), N) == (own("g"), N, "g1")


def test_state_is_kept_only_for_peers_with_work() -> None:
    queue: FairQueue[str] = FairQueue()
    for i in range(100):  # a hundred peers (or origins) pass through, one job each
        queue.begin(Who(f"p{i}", f"o{i}"), N, 1.0)
        queue.end(Who(f"p{i}", f"o{i}"), N, 1.0, 0.5)
        queue.push(Who("f", f"o{i}"), N, f"x{i}")
        assert queue.remove(Who("f", f"o{i}"), N, f"x{i}")
    level = queue._levels[N]
    assert level.holders == {} and len(queue) == 0


# -- the ledger -------------------------------------------------------------------------


def test_who_a_job_is_held_against() -> None:
    mine = Request("1", "m", {}, origin="somebody-else")
    forwarded = Request("2", "m", {}, hops=1, origin="client")
    old_forwarder = Request("3", "m", {}, hops=1)
    assert who_for("peer", mine) == Who("peer", "peer")  # a client speaks for itself only
    assert who_for("fwd", forwarded) == Who("fwd", "client")
    assert who_for("fwd", old_forwarder) == Who("fwd", "fwd")


def test_token_bucket_refuses_with_when_to_come_back() -> None:
    ledger = Ledger(FairnessConfig(rate=2.0, burst=2))
    now = 100.0
    tickets = [ledger.arrive(own("a"), N, now, 10) for _ in range(2)]
    with pytest.raises(OverBudget) as over:
        ledger.arrive(own("a"), N, now, 10)
    assert over.value.reason == "rate" and over.value.retry_after_ms == 500
    ledger.arrive(own("b"), N, now, 10)  # another peer has a bucket of its own
    now += 0.5
    tickets.append(ledger.arrive(own("a"), N, now, 10))
    for t in tickets:
        ledger.depart(t, "ok", now)
    book = ledger.books["a"]
    assert (book.served, book.refused, book.over) == (3, 1, {"rate": 1})
    # The node's own clients weigh more, and their bucket with them.
    for _ in range(8):
        ledger.arrive(own(GATEWAY), N, now, 10)
    with pytest.raises(OverBudget):
        ledger.arrive(own(GATEWAY), N, now, 10)


def test_in_flight_budget_scales_with_weight() -> None:
    config = FairnessConfig(in_flight=3, weights={PEER: 2.0})
    ledger = Ledger(config)
    held = [ledger.arrive(own("a"), N, 0.0, 25) for _ in range(3)]
    with pytest.raises(OverBudget) as over:
        ledger.arrive(own("a"), N, 0.0, 25)
    assert over.value.reason == "in_flight" and over.value.retry_after_ms == 25
    ledger.depart(held.pop(), "ok", 1.0)
    ledger.arrive(own("a"), N, 1.0, 25)  # one left: room for one
    for _ in range(6):
        ledger.arrive(own(PEER), N, 1.0, 25)
    with pytest.raises(OverBudget):
        ledger.arrive(own(PEER), N, 1.0, 25)
    assert ledger.queued_limit(PEER) == 2 * config.queued
    # Fair share off: no limit holds, but the counts are kept.
    off = Ledger(FairnessConfig(enabled=False, in_flight=1, rate=1.0, burst=1))
    for _ in range(10):
        off.arrive(own("a"), Priority.HIGH, 0.0, 25)
    assert off.books["a"].held == 10 and off.books["a"].high == 10


def test_marking_everything_high_buys_one_place() -> None:
    ledger = Ledger(FairnessConfig(high_share=0.25))
    everything_high = [ledger.arrive(own("a"), Priority.HIGH, 0.0, 1) for _ in range(8)]
    kept = [t.priority for t in everything_high]
    assert kept.count(Priority.HIGH) == 2 and kept[0] is Priority.HIGH  # 8 x 0.25
    assert ledger.books["a"].over == {"high": 6}
    # A peer that mostly sends NORMAL gets its odd HIGH as HIGH.
    for _ in range(3):
        ledger.arrive(own("b"), N, 0.0, 1)
    assert ledger.arrive(own("b"), Priority.HIGH, 0.0, 1).priority is Priority.HIGH
    assert ledger.arrive(own("b"), Priority.HIGH, 0.0, 1).priority is N
    # As HIGH jobs leave, the budget comes back.
    for t in everything_high:
        ledger.depart(t, "ok", 1.0)
    assert ledger.arrive(own("a"), Priority.HIGH, 1.0, 1).priority is Priority.HIGH


def test_idle_peers_are_forgotten_and_the_book_stays_bounded() -> None:
    ledger = Ledger(FairnessConfig(max_peers=3, forget_after_s=60.0))
    for i in range(3):
        ledger.depart(ledger.arrive(own(f"p{i}"), N, float(i), 1), "ok", float(i))
    # Full: a newcomer pushes out the peer idle longest.
    busy = ledger.arrive(own("p3"), N, 10.0, 1)
    assert set(ledger.books) == {"p1", "p2", "p3"} and ledger.forgotten == 1
    # Full of busy peers: newcomers share one account, inside which they take turns.
    held = [ledger.arrive(own(p), N, 11.0, 1) for p in ("p1", "p2")]
    crowd = [ledger.arrive(own(f"n{i}"), N, 12.0, 1) for i in range(5)]
    assert {t.who for t in crowd} == {Who(OTHER, f"n{i}") for i in range(5)}
    assert len(ledger.books) == 4  # the three, and OTHER
    for t in (busy, *held, *crowd):
        ledger.depart(t, "ok", 13.0)
    # Later, with nothing held, everyone is forgotten on the next sweep.
    ledger.sweep(13.0 + 61.0)
    assert ledger.books == {}
    view = ledger.describe(80.0, {}, {})
    assert view["tracked"] == 0 and view["totals"]["served"] == 11


def test_describe_shows_the_top_peers_and_the_rest_as_other() -> None:
    ledger = Ledger(FairnessConfig(top=2))
    for i, n in enumerate((9, 5, 2, 1)):
        for _ in range(n):
            ledger.depart(ledger.arrive(own(f"p{i}"), N, 0.0, 1), "ok", 0.0)
    ledger.depart(ledger.arrive(own("p0"), N, 0.0, 1), "refused", 0.0, "queued")
    view = ledger.describe(0.0, {"p0": 3}, {"p1": 1})
    assert [r["peer"] for r in view["peers"]] == ["p0", "p1"]
    p0 = view["peers"][0]
    assert (p0["served"], p0["refused"], p0["queued"]) == (9, 1, 3)
    assert p0["over_budget"] == {"queued": 1}
    assert p0["share"] == pytest.approx(9 / 17, abs=1e-3) and p0["fair"] == 0.25
    assert view["other"]["peers"] == 2 and view["other"]["served"] == 3


def test_config_table_is_checked() -> None:
    table = {"enabled": False, "rate": 5, "weights": {PEER: 4}, "high_share": 0.5}
    config = FairnessConfig.from_table(Table(table, "fairness"))
    assert (config.enabled, config.rate, config.weights, config.high_share) == (
        False,
        5.0,
        {PEER: 4.0},
        0.5,
    )
    for bad, named in [
        ({"weights": {"not-a-peer": 2}}, "not a peer id"),
        ({"weights": {PEER: 0}}, "weights"),
        ({"queud": 3}, "unknown field(s) queud"),
        ({"high_share": 2}, "high_share"),
        ({"in_flight": 0}, "in_flight"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(named)):
            FairnessConfig.from_table(Table(bad, "fairness"))


# -- the gate, on trio's clock ----------------------------------------------------------


async def test_gate_lets_a_light_peer_in_next_and_bounds_a_peer_queue(
    autojump_clock: trio.abc.Clock,
) -> None:
    gate = PriorityGate(concurrency=1, max_waiting=8, queued_limit=lambda h: 6)
    finished: list[tuple[str, float]] = []
    refused: Counter[str] = Counter()

    async def job(holder: str) -> None:
        try:
            async with gate.slot(N, own(holder)):
                await trio.sleep(0.02)
            finished.append((holder, trio.current_time()))
        except Overloaded as exc:
            refused[getattr(exc, "reason", "full")] += 1

    async with trio.open_nursery() as nursery:
        for _ in range(10):  # one running, six waiting, three over g's queue budget
            nursery.start_soon(job, "g")
        await trio.testing.wait_all_tasks_blocked()
        assert gate.queued_by() == {"g": 6} and gate.running_by == {"g": 1}
        await trio.sleep(0.03)
        start = trio.current_time()
        nursery.start_soon(job, "p")
    assert refused == {"queued": 3}
    p_done = next(t for h, t in finished if h == "p")
    assert p_done - start <= 0.02 * 2 + 1e-6  # the job running, then its own
    assert gate.running == 0 and gate.waiting == 0 and gate.running_by == {}


async def test_gate_without_fair_share_is_first_come_first_served(
    autojump_clock: trio.abc.Clock,
) -> None:
    gate = PriorityGate(concurrency=1, max_waiting=4, fair=False)
    order: list[str] = []

    async def job(holder: str) -> None:
        try:
            async with gate.slot(N, own(holder)):
                order.append(holder)
                await trio.sleep(0.02)
        except Overloaded:
            order.append(f"refused {holder}")

    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(job, "g")
            await trio.testing.wait_all_tasks_blocked()
        assert gate.queued_by() == {"g": 4}  # counted per peer all the same
        nursery.start_soon(job, "p")  # the room is full of g: the newcomer is refused
    assert order == ["g", "refused p", "g", "g", "g", "g"]
    assert EVERYONE.holder == "*"
