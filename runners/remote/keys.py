"""A pool of API keys for one backend, picked per call.

Several keys behind labels ``key#1``, ``key#2``...; ``KeyPool`` picks one per call
(round-robin, least-loaded or priority), counts uses and calls in flight, and
benches a key for a while after the backend refused it (429, 401/403). A key's
text never leaves the pool except through ``KeyLease.secret``. Pure: the time
comes from an injected clock.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from protocols.errors import ConfigError
from protocols.resilience import Clock

STRATEGIES = ("round-robin", "least-loaded", "priority")


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
            raise ConfigError(f"key strategy must be one of {list(STRATEGIES)}")
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
