"""Pure resilience primitives every layer uses: circuit breaker, backoff, Retry-After.

The HTTP endpoints of remote runners, the router's per-peer health and the
discovery dialers all lean on these, so they live in the bottom layer. None of
them does I/O or reads a clock by itself: each takes the time from an injected
``clock`` (seconds, monotonic) or from its caller, so tests drive them with a
hand-moved clock.

- ``CircuitBreaker``: closed -> open after ``failures`` consecutive failures;
  open -> half-open once ``cooldown_s`` has passed, when exactly one probe call
  is let through; the probe's success closes it, its failure opens it again.
- ``Backoff``: "full jitter" delays, uniform in [0, min(cap, base * 2**attempt)].
- ``parse_retry_after``: the Retry-After header as seconds (delta or HTTP-date).
"""

from __future__ import annotations

import email.utils
import enum
import math
import random
from collections.abc import Callable
from dataclasses import dataclass

from .errors import ConfigError

Clock = Callable[[], float]


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
            raise ConfigError("failures must be at least 1")
        if not cooldown_s >= 0:
            raise ConfigError("cooldown_s must be non-negative")
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
            raise ConfigError("base_s and max_s must be non-negative")

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
