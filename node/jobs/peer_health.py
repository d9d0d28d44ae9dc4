"""Per-peer circuit breakers with exponential backoff: stop sending work to a failing peer.

A peer that keeps failing calls (it cannot be reached, or it drops the stream) is
benched the way Petals bans failing servers: after ``failures`` consecutive
failures its breaker opens for ``cooldown_s``; then one probe call may go
through (half-open). A failed probe opens it again with the cooldown doubled
(capped at ``max_cooldown_s``); a success forgets everything about the peer.

Pure: no I/O, the time comes from an injected clock, so tests drive it by hand.
Callers ask ``admit(peer)`` right before a call and report exactly one of
``success``, ``failure`` or ``abandon`` (cancelled, no verdict) after an admitted
call. Memory stays bounded: only peers with failures are held (a success drops
the entry), entries untouched for ``forget_after_s`` are dropped, and past
``max_peers`` the stalest ones go first.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from protocols.errors import ConfigError
from protocols.resilience import BreakerState, CircuitBreaker

Clock = Callable[[], float]


@dataclass(slots=True)
class _Entry:
    breaker: CircuitBreaker
    touched: float
    probing: bool = False  # a half-open probe was admitted and has no verdict yet


class PeerBreakers:
    """One ``CircuitBreaker`` per peer id, its cooldown doubling on each failed probe."""

    def __init__(
        self,
        failures: int,
        cooldown_s: float,
        max_cooldown_s: float,
        clock: Clock,
        *,
        max_peers: int = 1024,
        forget_after_s: float = 3600.0,
    ) -> None:
        if failures < 1:
            raise ConfigError("failures must be at least 1")
        if not cooldown_s >= 0:
            raise ConfigError("cooldown_s must be non-negative")
        if not max_cooldown_s >= cooldown_s:
            raise ConfigError("max_cooldown_s must be at least cooldown_s")
        if max_peers < 1:
            raise ConfigError("max_peers must be at least 1")
        if not forget_after_s > 0:
            raise ConfigError("forget_after_s must be positive")
        self.failures = failures
        self.cooldown_s = cooldown_s
        self.max_cooldown_s = max_cooldown_s
        self.max_peers = max_peers
        self.forget_after_s = forget_after_s
        self._clock = clock
        self._entries: dict[str, _Entry] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def state(self, peer: str) -> BreakerState:
        """CLOSED for a peer we hold nothing against."""
        entry = self._entries.get(peer)
        return BreakerState.CLOSED if entry is None else entry.breaker.state

    def probing(self, peer: str) -> bool:
        """Whether a half-open probe to ``peer`` is out now (no second one is admitted)."""
        entry = self._entries.get(peer)
        return entry is not None and entry.probing

    def cooldown(self, peer: str) -> float:
        """The cooldown the peer's breaker uses now (the base one for a healthy peer)."""
        entry = self._entries.get(peer)
        return self.cooldown_s if entry is None else entry.breaker.cooldown_s

    def admit(self, peer: str) -> float | None:
        """None: call ``peer`` now; a number: refused, ask again after that many seconds."""
        entry = self._entries.get(peer)
        if entry is None:
            return None
        half_open = entry.breaker.state == BreakerState.HALF_OPEN
        wait = entry.breaker.admit()
        if wait is None and half_open:
            entry.probing = True
            entry.touched = self._clock()
        return wait

    def success(self, peer: str) -> None:
        self._entries.pop(peer, None)

    def failure(self, peer: str) -> None:
        now = self._clock()
        entry = self._entries.get(peer)
        if entry is None:
            self._prune(now)
            breaker = CircuitBreaker(self.failures, self.cooldown_s, self._clock)
            entry = self._entries[peer] = _Entry(breaker, now)
        if entry.probing:  # the probe failed: wait twice as long before the next one
            entry.breaker.cooldown_s = min(self.max_cooldown_s, entry.breaker.cooldown_s * 2)
        entry.probing = False
        entry.touched = now
        entry.breaker.failure()

    def abandon(self, peer: str) -> None:
        entry = self._entries.get(peer)
        if entry is not None:
            entry.probing = False
            entry.breaker.abandon()

    def describe(self) -> dict[str, dict[str, Any]]:
        """Plain data for ``swarm status``: each peer held against, by peer id."""
        out: dict[str, dict[str, Any]] = {}
        for peer in sorted(self._entries):
            entry = self._entries[peer]
            breaker = entry.breaker
            state = breaker.state
            # While open, admit() only answers the seconds left and changes nothing.
            retry = (breaker.admit() or 0.0) if state == BreakerState.OPEN else 0.0
            out[peer] = {
                "state": str(state),
                "failures": breaker.failures,
                "cooldown_s": breaker.cooldown_s,
                "retry_in_s": round(max(0.0, retry), 3),
                "probing": entry.probing,
            }
        return out

    def _prune(self, now: float) -> None:
        """Drop stale entries, then the stalest ones while full (never a probe in flight)."""
        limit = now - self.forget_after_s
        for peer in [p for p, e in self._entries.items() if e.touched < limit and not e.probing]:
            del self._entries[peer]
        while len(self._entries) >= self.max_peers:
            idle = [p for p, e in self._entries.items() if not e.probing] or list(self._entries)
            del self._entries[min(idle, key=lambda p: (self._entries[p].touched, p))]
