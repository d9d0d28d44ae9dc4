"""node.jobs.reputation: the hold-back rule on a hand-driven clock, and the file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from node.jobs.reputation import (
    FILENAME,
    Outcome,
    Reputation,
    ReputationFile,
    ReputationPolicy,
    Standing,
)
from protocols.config import Table
from protocols.errors import ConfigError


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def test_one_strike_does_not_hold_two_do_and_holds_double() -> None:
    clock = Clock()
    rep = Reputation(ReputationPolicy(min_strikes=2, hold_s=10, max_hold_s=35), clock)
    for _ in range(3):
        rep.record("p", Outcome.AGREED)
    assert not rep.record("p", Outcome.STRUCK)
    assert rep.held_back() == frozenset()
    assert rep.record("p", Outcome.STRUCK)  # 2 strikes in 5 checks
    assert rep.held_back() == {"p"}
    assert rep.describe()["p"] | {"held_for_s": 0} == {
        "checked": 5,
        "agreed": 3,
        "strikes": 2,
        "disputed": 0,
        "unsure": 0,
        "held_back": True,
        "held_for_s": 0,
        "holds": 1,
    }
    clock.now += 10.01
    assert rep.held_back() == frozenset()
    assert rep.record("p", Outcome.STRUCK)  # still past the threshold: held again, twice as long
    clock.now += 19.9
    assert rep.held_back() == {"p"}
    clock.now += 0.2
    assert rep.held_back() == frozenset()
    assert rep.record("p", Outcome.STRUCK)
    clock.now += 34.9  # capped at max_hold_s (40 would be next)
    assert rep.held_back() == {"p"}
    clock.now += 0.2
    assert rep.held_back() == frozenset()


def test_disputes_and_unsure_never_hold_and_a_low_strike_rate_is_forgiven() -> None:
    clock = Clock()
    rep = Reputation(ReputationPolicy(min_strikes=2, strike_rate=0.05), clock)
    for _ in range(50):
        rep.record("p", Outcome.DISPUTED)
        rep.record("p", Outcome.UNSURE)
    assert rep.held_back() == frozenset()
    for _ in range(100):
        rep.record("q", Outcome.AGREED)
    assert not rep.record("q", Outcome.STRUCK)
    assert not rep.record("q", Outcome.STRUCK)  # 2 in 102 checks: under 5%, a fluke
    assert rep.held_back() == frozenset()


def test_agreements_in_a_row_reset_the_doubling() -> None:
    clock = Clock()
    rep = Reputation(
        ReputationPolicy(min_strikes=1, strike_rate=0, hold_s=10, forgive_after=3), clock
    )
    assert rep.record("p", Outcome.STRUCK)
    clock.now += 11
    assert rep.record("p", Outcome.STRUCK)
    standing = rep.standing("p")
    assert standing is not None and standing.holds == 2
    clock.now += 21
    for _ in range(3):
        rep.record("p", Outcome.AGREED)
    assert standing.holds == 0
    assert rep.record("p", Outcome.STRUCK)
    clock.now += 10.5  # back to the first hold's length
    assert rep.held_back() == frozenset()


def test_rows_are_bounded_and_held_peers_are_kept_longest() -> None:
    clock = Clock()
    rep = Reputation(ReputationPolicy(min_strikes=1, strike_rate=0, max_peers=3), clock)
    rep.record("liar", Outcome.STRUCK)
    for peer in ("a", "b", "c", "d"):
        clock.now += 1
        rep.record(peer, Outcome.AGREED)
    assert len(rep) == 3
    assert set(rep.describe()) == {"liar", "c", "d"}


def test_the_file_round_trips_and_a_hold_survives_a_restart(tmp_path: Path) -> None:
    clock = Clock()
    policy = ReputationPolicy(min_strikes=1, strike_rate=0, hold_s=60)
    rep = Reputation(policy, clock)
    rep.record("liar", Outcome.STRUCK)
    rep.record("honest", Outcome.AGREED)
    store = ReputationFile.in_data_dir(tmp_path)
    store.save(rep.rows())
    assert (tmp_path / FILENAME).exists() and not list(tmp_path.glob("*.tmp"))
    clock.now += 30
    again = Reputation(policy, clock, store.load())
    assert again.held_back() == {"liar"}
    assert again.describe()["honest"]["agreed"] == 1
    assert again.describe()["liar"]["held_for_s"] == pytest.approx(30.0)


def test_a_damaged_file_or_row_is_skipped(tmp_path: Path) -> None:
    store = ReputationFile(tmp_path / FILENAME)
    assert store.load() == {}
    (tmp_path / FILENAME).write_text("{not json")
    assert store.load() == {}
    (tmp_path / FILENAME).write_text(json.dumps({"format": 99, "peers": {}}))
    assert store.load() == {}
    good = {"checked": 2, "agreed": 2}
    rows = {
        "good": good,
        "bad/id": good,
        "neg": {"checked": -1},
        "nan": {"held_until": float("nan")},
        "kind": {"strikes": "3"},
        "flag": {"agreed": True},
        "list": [1],
    }
    (tmp_path / FILENAME).write_text(json.dumps({"format": 1, "peers": rows}))
    loaded = store.load()
    assert list(loaded) == ["good"]
    assert loaded["good"] == Standing(checked=2, agreed=2)


def test_policy_from_a_table_and_bad_values() -> None:
    table = Table({"min_strikes": 3, "hold_s": 5.0}, "verify")
    policy = ReputationPolicy.read(table)
    assert (policy.min_strikes, policy.hold_s, policy.max_hold_s) == (3, 5.0, 86400.0)
    with pytest.raises(ConfigError):
        ReputationPolicy(hold_s=10, max_hold_s=5)
    with pytest.raises(ConfigError):
        ReputationPolicy(strike_rate=1.5)
    with pytest.raises(ConfigError):
        ReputationPolicy(min_strikes=0)


# -- the router leaves held-back peers out -------------------------------------------------


def test_held_back_peers_leave_plans_like_open_breakers_and_turns_go_on() -> None:
    import random

    from bootstrap.table import PeerTable, RecordVerified, apply
    from node.jobs.router import LocalNode, Router, RouterConfig, RouteRequest, Strategy
    from runners.base import ModelInfo, TextSpec

    entry = {"name": "m", "task": "embeddings", "device": "CPU", "precision": "fp32"}
    table = PeerTable()
    for pid in ("a", "b", "c"):
        table = apply(table, RecordVerified(pid, 1, {"models": [entry]}, at=1.0))
    config = RouterConfig(strategy=Strategy.ROUND_ROBIN, max_attempts=5)
    router = Router("me", config, rng=random.Random(1), clock=lambda: 1.0)
    local = LocalNode(
        [ModelInfo("m", "embeddings", "fake", "CPU", "fp32", 1, (TextSpec("t", 1, 9),))]
    )
    held = frozenset({"b", "me"})  # the local node is never held back, even if named
    firsts = []
    for _ in range(6):
        plan = router.plan(table, local, RouteRequest("m", held_back=held), {})
        assert {c.peer_id for c in plan} == {"a", "c", "me"}
        firsts.append(plan[0].peer_id)
    assert firsts == ["a", "c", "me", "a", "c", "me"]  # round-robin still takes its turns
    with pytest.raises(ValueError):
        RouteRequest("m", held_back={"b"})  # type: ignore[arg-type]
