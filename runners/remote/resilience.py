"""Pure pieces of a resilient client: circuit breaker, backoff, Retry-After, key pool.

None of these does I/O or reads a clock by itself: each takes the time from an
injected ``clock`` (seconds, monotonic) or from its caller, so tests drive them
with a hand-moved clock and the endpoint composes them around real HTTP.

- ``CircuitBreaker``: closed -> open after ``failures`` consecutive failures;
  open -> half-open once ``cooldown_s`` has passed, when exactly one probe call
  is let through; the probe's success closes it, its failure opens it again.
- ``Backoff``: "full jitter" delays, uniform in [0, min(cap, base * 2**attempt)].
- ``parse_retry_after``: the Retry-After header as seconds (delta or HTTP-date).
- ``KeyPool``: several API keys behind labels ``key#1``, ``key#2``...; picks one per
  call (round-robin, least-loaded or priority), counts uses and calls in flight,
  and benches a key for a while after the backend refused it (429, 401/403).
  A key's text never leaves the pool except through ``KeyLease.secret``.
"""

from __future__ import annotations

import email.utils
import enum
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

Clock = Callable[[], float]

STRATEGIES = ("round-robin", "least-loaded", "priority")


class BreakerState(enum.StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half-open"


class CircuitBreaker:
    """Stops calling a backend that keeps failing; lets one probe through after a cooldown.

    Callers ask ``admit()`` before each call: ``None`` means go ahead, a number
    means refused, try again after that many seconds. After an admitted call
    they report exactly one of ``success()``, ``failure()`` or ``abandon()`` (no
    verdict: cancelled), which frees the half-open probe slot.
    """

    def __init__(self, failures: int, cooldown_s: float, clock: Clock) -> None:
        if failures < 1:
            raise ValueError("failures must be at least 1")
        if not cooldown_s >= 0:
            raise ValueError("cooldown_s must be non-negative")
        self.threshold = failures
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._failures = 0
        self._opened_at: float | None = None
        self._probing = False

    @property
    def failures(self) -> int:
        """Consecutive failures counted so far."""
        return self._failures

    @property
    def state(self) -> BreakerState:
        if self._opened_at is None:
            return BreakerState.CLOSED
        if self._clock() - self._opened_at >= self.cooldown_s:
            return BreakerState.HALF_OPEN
        return BreakerState.OPEN

    def admit(self) -> float | None:
        """None to go ahead; else the seconds to wait before the breaker may let a call in."""
        if self._opened_at is None:
            return None
        left = self._opened_at + self.cooldown_s - self._clock()
        if left > 0:
            return left
        if self._probing:  # one probe at a time; the others wait for its verdict
            return min(1.0, self.cooldown_s) if self.cooldown_s > 0 else 0.0
        self._probing = True
        return None

    def success(self) -> None:
        self._failures = 0
        self._opened_at = None
        self._probing = False

    def failure(self) -> None:
        self._failures += 1
        was_probe = self._probing
        self._probing = False
        if was_probe or self._failures >= self.threshold:
            self._opened_at = self._clock()

    def abandon(self) -> None:
        self._probing = False


@dataclass(frozen=True, slots=True)
class Backoff:
    """Full-jitter exponential backoff: attempt n waits U(0, min(max_s, base_s * 2**n))."""

    base_s: float
    max_s: float

    def __post_init__(self) -> None:
        if not (self.base_s >= 0 and self.max_s >= 0):
            raise ValueError("base_s and max_s must be non-negative")

    def ceiling(self, attempt: int) -> float:
        if attempt < 0:
            raise ValueError("attempt must be non-negative")
        exponent = min(attempt, 64)  # 2**64 * base is past any cap already
        return min(self.max_s, self.base_s * math.ldexp(1.0, exponent))

    def delay(self, attempt: int, rng: random.Random) -> float:
        return rng.uniform(0.0, self.ceiling(attempt))


def parse_retry_after(value: str | None, *, now: float, cap_s: float) -> float | None:
    """Seconds to wait from a Retry-After header (RFC 9110), or None when absent or unreadable.

    ``now`` is the wall-clock time (epoch seconds) an HTTP-date is compared with.
    The result is clamped to [0, cap_s]: a server must not park us for a day.
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    if text.isdigit():
        seconds = float(int(text))
    else:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:  # RFC 9110 dates are GMT; a naive one is taken as such
            return None
        seconds = when.timestamp() - now
    return min(max(seconds, 0.0), cap_s)


@dataclass(slots=True)
class _Key:
    secret: str
    label: str
    uses: int = 0
    in_flight: int = 0
    failures: int = 0
    benched_until: float = -math.inf


@dataclass(frozen=True, slots=True)
class KeyLease:
    """One key taken for one call; hand it back with ``KeyPool.release``."""

    index: int
    label: str
    secret: str

    def __repr__(self) -> str:  # the secret stays out of reprs, logs and tracebacks
        return f"KeyLease({self.label})"


class KeyPool:
    """Several API keys for one backend, chosen per call by ``strategy``.

    - ``round-robin``: each call takes the next key in turn.
    - ``least-loaded``: the key with the fewest calls in flight (then fewest uses).
    - ``priority``: the first key in the list; later ones only while earlier
      ones are benched.

    Benched keys (refused by the backend a moment ago) are skipped while any
    other key is free; when all are benched, the one freed soonest is used.
    """

    def __init__(self, secrets: Sequence[str], strategy: str, clock: Clock) -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"key strategy must be one of {list(STRATEGIES)}")
        self.strategy = strategy
        self._clock = clock
        self._keys = [_Key(s, f"key#{i + 1}") for i, s in enumerate(secrets)]
        self._next = 0

    def __len__(self) -> int:
        return len(self._keys)

    def __repr__(self) -> str:
        return f"KeyPool({len(self._keys)} keys, {self.strategy})"

    def secrets(self) -> tuple[str, ...]:
        """The key texts, for scrubbing them out of messages. Never log this."""
        return tuple(k.secret for k in self._keys)

    def label_of(self, index: int) -> str:
        return self._keys[index].label

    def acquire(self) -> KeyLease | None:
        """Take a key for one call (None when the pool has no keys)."""
        if not self._keys:
            return None
        now = self._clock()
        free = [i for i, k in enumerate(self._keys) if k.benched_until <= now]
        if not free:
            index = min(range(len(self._keys)), key=lambda i: self._keys[i].benched_until)
        elif self.strategy == "priority":
            index = free[0]
        elif self.strategy == "least-loaded":
            index = min(free, key=lambda i: (self._keys[i].in_flight, self._keys[i].uses, i))
        else:
            n = len(self._keys)
            free_set = set(free)
            index = next(i for i in ((self._next + j) % n for j in range(n)) if i in free_set)
            self._next = (index + 1) % n
        key = self._keys[index]
        key.uses += 1
        key.in_flight += 1
        return KeyLease(index, key.label, key.secret)

    def release(self, lease: KeyLease | None) -> None:
        if lease is not None:
            self._keys[lease.index].in_flight -= 1

    def bench(self, lease: KeyLease | None, seconds: float) -> None:
        """Skip this key for ``seconds`` (the backend refused it: rate limit or auth)."""
        if lease is None:
            return
        key = self._keys[lease.index]
        key.failures += 1
        key.benched_until = max(key.benched_until, self._clock() + max(seconds, 0.0))

    def any_free(self) -> bool:
        """Whether some key is not benched now."""
        now = self._clock()
        return any(k.benched_until <= now for k in self._keys)

    def status(self) -> list[dict[str, Any]]:
        now = self._clock()
        return [
            {
                "label": k.label,
                "uses": k.uses,
                "in_flight": k.in_flight,
                "failures": k.failures,
                "benched_s": round(max(0.0, k.benched_until - now), 3),
            }
            for k in self._keys
        ]
