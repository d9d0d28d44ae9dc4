"""What this node knows exactly about its own calls to peers, for the router.

A peer's heartbeat says how busy it was when it sent it, our calls of then
included; between heartbeats the only fresh facts are ours: how many calls we
have at each peer now, how many we had at any recent moment (so the router can
take our calls of then out of a report, leaving the others' work), and how
long each job took there (the ``run_ms`` the answer's meta carries: the time it
held the runner, queueing excluded).

Pure: no I/O and no clock; the dispatcher passes the time of each event. Memory
is bounded: at most ``max_peers`` peers (idle ones forgotten first), a history of
at most ``history`` changes per peer, service times for at most ``max_models``
models of ``max_peers`` peers each.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from protocols.errors import ConfigError


@dataclass(slots=True)
class _Peer:
    count: int = 0
    # (time, count before the change), oldest first: our count at a past moment is
    # the "before" of the first change after it.
    changes: deque[tuple[float, int]] = field(default_factory=deque)


class OwnCalls:
    """Our calls in flight per peer, their recent history and observed service times."""

    def __init__(
        self,
        *,
        alpha: float = 0.2,
        history: int = 512,
        max_peers: int = 1024,
        max_models: int = 256,
    ) -> None:
        if not (0 < alpha <= 1 and history >= 1 and max_peers >= 1 and max_models >= 1):
            raise ConfigError("OwnCalls needs 0 < alpha <= 1 and positive bounds")
        self.alpha = alpha
        self.history = history
        self.max_peers = max_peers
        self.max_models = max_models
        self.in_flight: dict[str, int] = {}  # peer -> our calls there now (none: absent)
        self._peers: dict[str, _Peer] = {}
        # model (casefolded) -> peer -> (EWMA ms, when the last answer came)
        self._service: dict[str, dict[str, tuple[float, float]]] = {}

    def started(self, peer: str, now: float) -> None:
        """A call to ``peer`` went out."""
        self._change(peer, now, +1)

    def ended(
        self, peer: str, now: float, model: str = "", meta: Mapping[str, Any] | None = None
    ) -> None:
        """A call to ``peer`` is over (answered, failed or cancelled); ``meta``: the
        answer's, whose ``run_ms`` is the job's time there (absent: none observed)."""
        self._change(peer, now, -1)
        run_ms = (meta or {}).get("run_ms")
        if isinstance(run_ms, bool) or not isinstance(run_ms, int | float):
            return
        if not (math.isfinite(run_ms) and run_ms >= 0) or not model:
            return
        key = model.casefold()
        times = self._service.pop(key, None)  # re-inserted last: the least used go first
        if times is None:
            times = {}
            if len(self._service) >= self.max_models:
                del self._service[next(iter(self._service))]
        self._service[key] = times
        old = times.pop(peer, None)
        if old is None and len(times) >= self.max_peers:
            del times[next(iter(times))]
        ms = float(run_ms) if old is None else old[0] + self.alpha * (run_ms - old[0])
        times[peer] = (ms, now)

    def at(self, peer: str, when: float) -> int:
        """Our calls at ``peer`` at time ``when`` (as far back as the history goes;
        before it, the oldest count known)."""
        entry = self._peers.get(peer)
        if entry is None:
            return 0
        changes = entry.changes
        i = bisect.bisect_right(changes, when, key=lambda c: c[0])
        return changes[i][1] if i < len(changes) else entry.count

    def as_of(self, moments: Mapping[str, float]) -> dict[str, int]:
        """``at`` for each peer named (peer -> time), for the peers with a history."""
        return {p: self.at(p, t) for p, t in moments.items() if p in self._peers}

    def tracked(self) -> list[str]:
        """The peers with a history of our calls."""
        return list(self._peers)

    def service_ms(self, model: str, since: float = -math.inf) -> dict[str, float]:
        """Each peer's time per job for ``model`` as our calls observed it (EWMA, ms),
        for the peers that answered one at ``since`` or later: an estimate no answer
        has refreshed since is left out, so that a peer we stopped sending to after a
        bad spell is not kept out by it for good."""
        times = self._service.get(model.casefold(), {})
        return {peer: ms for peer, (ms, at) in times.items() if at >= since}

    def _change(self, peer: str, now: float, step: int) -> None:
        entry = self._peers.get(peer)
        if entry is None:
            if len(self._peers) >= self.max_peers:
                self._forget_one()
            entry = self._peers[peer] = _Peer()
        if entry.changes and now < entry.changes[-1][0]:
            now = entry.changes[-1][0]  # one clock, never back: keep the history sorted
        entry.changes.append((now, entry.count))
        if len(entry.changes) > self.history:
            entry.changes.popleft()
        entry.count = max(0, entry.count + step)
        if entry.count:
            self.in_flight[peer] = entry.count
        else:
            self.in_flight.pop(peer, None)

    def _forget_one(self) -> None:
        """Drop the peer whose last change is oldest, idle ones first."""
        idle = [p for p, e in self._peers.items() if not e.count] or list(self._peers)
        victim = min(idle, key=lambda p: self._peers[p].changes[-1][0])
        del self._peers[victim]
        self.in_flight.pop(victim, None)
