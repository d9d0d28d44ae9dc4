"""Our own calls per peer (node.jobs.calls): counts now and at past moments, the
service times the answers report, and the bounds on all of it. Pure: times by hand."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node.jobs.calls import OwnCalls
from protocols.errors import ConfigError


def test_counts_now_and_at_past_moments() -> None:
    calls = OwnCalls()
    assert calls.in_flight == {} and calls.at("a", 5.0) == 0 and calls.tracked() == []
    calls.started("a", 1.0)
    calls.started("a", 2.0)
    calls.started("b", 2.0)
    calls.ended("a", 3.0)
    assert calls.in_flight == {"a": 1, "b": 1}
    assert [calls.at("a", t) for t in (0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 9.0)] == [0, 1, 1, 2, 2, 1, 1]
    calls.ended("a", 4.0)
    assert calls.in_flight == {"b": 1}  # none left: absent, not 0
    assert calls.as_of({"a": 2.5, "b": 1.0, "stranger": 2.0}) == {"a": 2, "b": 0}
    assert sorted(calls.tracked()) == ["a", "b"]


def test_a_clock_that_steps_back_keeps_the_history_in_order() -> None:
    calls = OwnCalls()
    calls.started("a", 5.0)
    calls.started("a", 4.0)  # taken as 5.0
    assert calls.at("a", 4.5) == 0 and calls.at("a", 5.0) == 2


def test_service_times_are_an_ewma_of_the_answers_run_ms_per_model() -> None:
    calls = OwnCalls(alpha=0.5)
    for ms in (20.0, 40.0):
        calls.started("a", 1.0)
        calls.ended("a", 2.0, "M", {"run_ms": ms, "queue_ms": 99.0})
    assert calls.service_ms("m") == {"a": 30.0}  # model names in any case
    assert calls.service_ms("other") == {}
    for meta in ({}, {"run_ms": "x"}, {"run_ms": True}, {"run_ms": float("nan")}, None):
        calls.started("a", 3.0)
        calls.ended("a", 4.0, "m", meta)  # failed calls and junk observe nothing
    calls.started("a", 5.0)
    calls.ended("a", 6.0, "", {"run_ms": 1.0})
    assert calls.service_ms("m") == {"a": 30.0}


def test_memory_is_bounded() -> None:
    calls = OwnCalls(history=4, max_peers=3, max_models=2)
    for i in range(10):
        calls.started(f"p{i}", float(i))
    assert len(calls.tracked()) == 3 and "p9" in calls.tracked()
    calls.ended("p9", 20.0)
    calls.started("busy", 21.0)  # the idle one goes before those with calls out
    assert "p9" not in calls.tracked() and len(calls.in_flight) == 3
    for t in range(20):
        calls.started("q", 30.0 + t)
    assert calls.at("q", 0.0) == 16  # older than the history: the oldest count kept
    for name in ("m1", "m2", "m3"):
        calls.ended("q", 60.0, name, {"run_ms": 1.0})
    assert calls.service_ms("m1") == {} and calls.service_ms("m3") == {"q": 1.0}
    with pytest.raises(ConfigError):
        OwnCalls(alpha=0.0)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["a", "b"]), st.booleans()), max_size=60))
def test_at_replays_the_counts(steps: list[tuple[str, bool]]) -> None:
    """``at(t)`` is the count right after the step at time t, for every step."""
    calls = OwnCalls()
    counts = {"a": 0, "b": 0}
    seen: list[tuple[str, float, int]] = []
    for t, (peer, start) in enumerate(steps):
        if start:
            calls.started(peer, float(t))
            counts[peer] += 1
        elif counts[peer]:
            calls.ended(peer, float(t))
            counts[peer] -= 1
        seen.append((peer, float(t), counts[peer]))
        assert calls.in_flight.get(peer, 0) == counts[peer]
    for peer, when, n in seen:
        assert calls.at(peer, when) == n


def test_service_times_no_answer_refreshed_since_are_left_out() -> None:
    calls = OwnCalls()
    for peer, at in (("a", 1.0), ("b", 5.0)):
        calls.started(peer, at - 0.5)
        calls.ended(peer, at, "m", {"run_ms": 100.0})
    assert calls.service_ms("m") == {"a": 100.0, "b": 100.0}
    assert calls.service_ms("m", since=3.0) == {"b": 100.0}
    calls.started("a", 8.0)
    calls.ended("a", 9.0, "m", {"run_ms": 20.0})  # a fresh answer brings it back
    assert calls.service_ms("m", since=6.0) == {"a": pytest.approx(84.0)}
