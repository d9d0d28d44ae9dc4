"""The pure pieces of the remote transport, driven by a hand-moved clock."""

from __future__ import annotations

import email.utils
import random

import pytest

from protocols import ConfigError
from protocols.resilience import Backoff, BreakerState, CircuitBreaker, parse_retry_after
from runners.remote.keys import KeyPool


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_breaker_opens_after_n_consecutive_failures_and_successes_reset_the_count() -> None:
    clock = Clock()
    breaker = CircuitBreaker(failures=3, cooldown_s=10, clock=clock)
    for _ in range(2):
        assert breaker.admit() is None
        breaker.failure()
    assert breaker.admit() is None
    breaker.success()  # the run of failures is broken
    assert breaker.failures == 0
    for _ in range(3):
        assert breaker.admit() is None
        breaker.failure()
    assert breaker.state is BreakerState.OPEN
    assert breaker.admit() == pytest.approx(10.0)
    clock.now += 4
    assert breaker.admit() == pytest.approx(6.0)


def test_breaker_half_opens_after_cooldown_for_one_probe() -> None:
    clock = Clock()
    breaker = CircuitBreaker(failures=1, cooldown_s=5, clock=clock)
    breaker.admit()
    breaker.failure()
    clock.now += 5
    assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.admit() is None  # the probe
    assert breaker.admit() is not None  # everyone else waits for its verdict
    breaker.failure()  # the probe failed: open again, for a whole cooldown
    assert breaker.state is BreakerState.OPEN
    assert breaker.admit() == pytest.approx(5.0)
    clock.now += 5
    assert breaker.admit() is None
    breaker.success()
    assert breaker.state is BreakerState.CLOSED
    assert breaker.admit() is None and breaker.admit() is None


def test_an_abandoned_probe_frees_the_slot() -> None:
    clock = Clock()
    breaker = CircuitBreaker(failures=1, cooldown_s=1, clock=clock)
    breaker.failure()
    clock.now += 1
    assert breaker.admit() is None
    breaker.abandon()  # cancelled: no verdict
    assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.admit() is None


def test_backoff_is_full_jitter_under_a_growing_capped_ceiling() -> None:
    backoff = Backoff(base_s=0.1, max_s=1.0)
    assert [backoff.ceiling(n) for n in range(6)] == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0])
    assert backoff.ceiling(10_000) == 1.0
    rng = random.Random(7)
    delays = [backoff.delay(3, rng) for _ in range(500)]
    assert all(0.0 <= d <= 0.8 for d in delays)
    assert min(delays) < 0.1 and max(delays) > 0.7  # spread over the whole range


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, None),
        ("", None),
        ("3", 3.0),
        (" 120 ", 60.0),  # capped
        ("-1", None),
        ("soon", None),
        ("1.5", None),  # RFC 9110: delay-seconds is an integer
    ],
)
def test_retry_after_seconds(header: str | None, expected: float | None) -> None:
    assert parse_retry_after(header, now=0.0, cap_s=60.0) == expected


def test_retry_after_http_date() -> None:
    now = 1_800_000_000.0
    in_ten = email.utils.formatdate(now + 10, usegmt=True)
    assert parse_retry_after(in_ten, now=now, cap_s=60) == pytest.approx(10.0)
    past = email.utils.formatdate(now - 100, usegmt=True)
    assert parse_retry_after(past, now=now, cap_s=60) == 0.0
    far = email.utils.formatdate(now + 86_400, usegmt=True)
    assert parse_retry_after(far, now=now, cap_s=60) == 60.0


def test_round_robin_takes_keys_in_turn_and_counts_uses() -> None:
    pool = KeyPool(["a1", "b2", "c3"], "round-robin", Clock())
    leases = [pool.acquire() for _ in range(7)]
    assert [lease.label for lease in leases if lease] == [
        "key#1", "key#2", "key#3", "key#1", "key#2", "key#3", "key#1",
    ]  # fmt: skip
    status = pool.status()
    assert [k["uses"] for k in status] == [3, 2, 2]
    assert [k["in_flight"] for k in status] == [3, 2, 2]
    for lease in leases:
        pool.release(lease)
    assert [k["in_flight"] for k in pool.status()] == [0, 0, 0]


def test_least_loaded_picks_the_key_with_fewest_calls_in_flight() -> None:
    pool = KeyPool(["a1", "b2", "c3"], "least-loaded", Clock())
    first, second, third = pool.acquire(), pool.acquire(), pool.acquire()
    assert {first.label, second.label, third.label} == {"key#1", "key#2", "key#3"}  # type: ignore[union-attr]
    pool.release(second)
    again = pool.acquire()
    assert again is not None and again.label == second.label  # type: ignore[union-attr]


def test_priority_uses_the_first_key_until_it_is_benched() -> None:
    clock = Clock()
    pool = KeyPool(["a1", "b2"], "priority", clock)
    leases = [pool.acquire() for _ in range(3)]
    assert {lease.label for lease in leases if lease} == {"key#1"}
    pool.bench(leases[0], 30)  # e.g. a 429 for that key
    fallback = pool.acquire()
    assert fallback is not None and fallback.label == "key#2"
    clock.now += 30
    back = pool.acquire()
    assert back is not None and back.label == "key#1"


def test_benched_keys_are_skipped_and_the_soonest_freed_is_used_when_all_are() -> None:
    clock = Clock()
    pool = KeyPool(["a1", "b2", "c3"], "round-robin", clock)
    one, two, three = pool.acquire(), pool.acquire(), pool.acquire()
    pool.bench(one, 5)
    assert [pool.acquire().label for _ in range(2)] == ["key#2", "key#3"]  # type: ignore[union-attr]
    pool.bench(two, 3)
    pool.bench(three, 9)
    assert not pool.any_free()
    assert pool.acquire().label == "key#2"  # type: ignore[union-attr]
    assert pool.status()[0]["failures"] == 1


def test_key_texts_never_show_in_reprs_or_status() -> None:
    pool = KeyPool(["sk-secret-one", "sk-secret-two"], "round-robin", Clock())
    lease = pool.acquire()
    shown = repr(pool) + repr(lease) + str(pool.status()) + str(lease)
    assert "secret" not in shown
    assert lease is not None and lease.secret == "sk-secret-one"


def test_an_empty_pool_gives_no_key() -> None:
    pool = KeyPool([], "priority", Clock())
    assert pool.acquire() is None
    pool.release(None)
    assert pool.status() == []


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ConfigError):
        CircuitBreaker(failures=0, cooldown_s=1, clock=Clock())
    with pytest.raises(ConfigError):
        KeyPool(["a"], "random", Clock())
    with pytest.raises(ConfigError):
        Backoff(base_s=-1, max_s=1)
