"""What this node measured of each peer's answers, and whom it holds back for it.

Reputation is local: it counts only what this node's own checks found (a spot
check or a ``verify: N`` job, judged by ``node.jobs.verify``). Peers never hear
of it and nothing a peer says changes it: no node acts on hearsay.

Per peer: jobs ``checked``, ``agreed``, ``strikes`` (a wrong answer, proven by
this node's own run or by a majority of others), ``disputed`` (two answers
differed and nobody could tell which was wrong) and ``unsure`` (a difference
that noise may explain). Only strikes count against a peer. A strike holds the
peer back from routing when it has at least ``min_strikes`` strikes and they
are at least ``strike_rate`` of its checks; each hold lasts twice the last
(``hold_s``, doubling up to ``max_hold_s``), and ``forgive_after`` agreements in
a row since its last strike reset the doubling. Held-back peers are left out of
plans like those whose breaker is open (``RouteRequest.held_back``).

Times are wall-clock seconds (``time.time``), so a hold survives a restart: the
table is kept in ``<data dir>/reputation.json`` (``ReputationFile``), written
whole and atomically, at most ``max_peers`` rows (the least recently checked
peer that is not held back goes first).

Pure but for the file: the clock is injected. ``ReputationFile`` raises
``OSError`` for an unwritable file; a damaged one reads as empty (logged).
"""

from __future__ import annotations

import enum
import json
import logging
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from protocols.config import Table
from protocols.errors import ConfigError

log = logging.getLogger(__name__)

FILENAME = "reputation.json"
FORMAT = 1
MAX_PEER_ID = 128


class Outcome(enum.StrEnum):
    AGREED = "agreed"
    STRUCK = "struck"
    DISPUTED = "disputed"
    UNSURE = "unsure"


@dataclass(frozen=True, slots=True)
class ReputationPolicy:
    min_strikes: int = 2
    strike_rate: float = 0.05  # strikes / checked at or above which a strike holds back
    hold_s: float = 300.0  # the first hold; each next one twice the last
    max_hold_s: float = 86400.0
    forgive_after: int = 200  # agreements in a row since the last strike reset the doubling
    max_peers: int = 1024

    def __post_init__(self) -> None:
        for name in ("min_strikes", "forgive_after", "max_peers"):
            value = getattr(self, name)
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
                raise ConfigError(f"verify {name} must be an integer >= 1")
        if not 0.0 <= self.strike_rate <= 1.0:
            raise ConfigError("verify strike_rate must be from 0 to 1")
        if not (math.isfinite(self.max_hold_s) and 0 < self.hold_s <= self.max_hold_s):
            raise ConfigError("verify needs 0 < hold_s <= max_hold_s, finite")

    @classmethod
    def read(cls, table: Table) -> ReputationPolicy:
        """The policy's keys of ``[verify]`` (the caller checks for unknown ones)."""
        base = cls()
        hold = table.number("hold_s", base.hold_s, low=0.001, high=86400.0 * 365)
        return cls(
            min_strikes=table.integer("min_strikes", base.min_strikes, low=1, high=1000),
            strike_rate=table.number("strike_rate", base.strike_rate, low=0.0, high=1.0),
            hold_s=hold,
            max_hold_s=table.number(
                "max_hold_s", max(base.max_hold_s, hold), low=hold, high=86400.0 * 365
            ),
            forgive_after=table.integer("forgive_after", base.forgive_after, low=1, high=1_000_000),
            max_peers=table.integer("max_peers", base.max_peers, low=1, high=1 << 20),
        )


@dataclass(slots=True)
class Standing:
    """One peer's record, as this node measured it."""

    checked: int = 0
    agreed: int = 0
    strikes: int = 0
    disputed: int = 0
    unsure: int = 0
    holds: int = 0  # holds since the doubling was last reset
    streak: int = 0  # agreements since the last strike
    held_until: float = 0.0  # wall clock; 0: never held
    last: float = 0.0  # wall clock of the last check

    @classmethod
    def from_row(cls, row: Any) -> Standing | None:
        """A row of the file, or None when any field is off."""
        if not isinstance(row, Mapping):
            return None
        out = cls()
        for f in fields(cls):
            value = row.get(f.name, getattr(out, f.name))
            if isinstance(value, bool) or not isinstance(value, int | float):
                return None
            if not (math.isfinite(value) and value >= 0):
                return None
            setattr(out, f.name, int(value) if f.type == "int" else float(value))
        return out


class Reputation:
    """Every peer's standing, and whom it holds back now (see the module docstring)."""

    def __init__(
        self,
        policy: ReputationPolicy,
        clock: Callable[[], float],
        standings: Mapping[str, Standing] | None = None,
    ) -> None:
        self.policy = policy
        self._clock = clock
        self._peers: dict[str, Standing] = dict(standings or {})
        self.changes = 0  # bumped on every change: the file writer saves when it moved
        self._trim()

    def __len__(self) -> int:
        return len(self._peers)

    def standing(self, peer: str) -> Standing | None:
        return self._peers.get(peer)

    def record(self, peer: str, outcome: Outcome) -> bool:
        """Count one check of ``peer``; True when it holds the peer back now."""
        now = self._clock()
        s = self._peers.get(peer)
        if s is None:
            s = self._peers[peer] = Standing()
        s.checked += 1
        s.last = now
        self.changes += 1
        held = False
        if outcome is Outcome.AGREED:
            s.agreed += 1
            s.streak += 1
            if s.streak >= self.policy.forgive_after:
                s.holds = 0
        elif outcome is Outcome.DISPUTED:
            s.disputed += 1
        elif outcome is Outcome.UNSURE:
            s.unsure += 1
        else:
            s.strikes += 1
            s.streak = 0
            held = self._past_threshold(s) and s.held_until <= now
            if held:
                s.holds += 1
                hold = self.policy.hold_s * 2.0 ** min(s.holds - 1, 64)
                s.held_until = now + min(self.policy.max_hold_s, hold)
                log.warning(
                    "peer %s held back for %.0f s: %d strikes in %d checks",
                    peer,
                    s.held_until - now,
                    s.strikes,
                    s.checked,
                )
        self._trim()
        return held

    def held_back(self) -> frozenset[str]:
        """The peers to leave out of plans now."""
        now = self._clock()
        return frozenset(p for p, s in self._peers.items() if s.held_until > now)

    def describe(self) -> dict[str, dict[str, Any]]:
        """Plain data for ``swarm status``: each peer checked, by peer id."""
        now = self._clock()
        out: dict[str, dict[str, Any]] = {}
        for peer in sorted(self._peers):
            s = self._peers[peer]
            left = max(0.0, s.held_until - now)
            out[peer] = {
                "checked": s.checked,
                "agreed": s.agreed,
                "strikes": s.strikes,
                "disputed": s.disputed,
                "unsure": s.unsure,
                "held_back": left > 0,
                "held_for_s": round(left, 1),
                "holds": s.holds,
            }
        return out

    def rows(self) -> dict[str, Any]:
        """The whole table as the file holds it."""
        return {"format": FORMAT, "peers": {p: asdict(s) for p, s in self._peers.items()}}

    def _past_threshold(self, s: Standing) -> bool:
        p = self.policy
        return s.strikes >= p.min_strikes and s.strikes >= p.strike_rate * s.checked

    def _trim(self) -> None:
        excess = len(self._peers) - self.policy.max_peers
        if excess <= 0:
            return
        now = self._clock()
        # The least recently checked go first; held-back peers only when nothing else is left.
        order = sorted(
            self._peers, key=lambda p: (self._peers[p].held_until > now, self._peers[p].last, p)
        )
        for peer in order[:excess]:
            del self._peers[peer]


class ReputationFile:
    """``<data dir>/reputation.json``: the table, written whole and atomically. Blocking:
    callers on the trio thread run ``save`` in a worker thread."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def in_data_dir(cls, data_dir: Path) -> ReputationFile:
        return cls(data_dir / FILENAME)

    def load(self) -> dict[str, Standing]:
        """The standings saved last; empty when there is no file, and when it is damaged
        (logged: the next save replaces it)."""
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("%s is unreadable, starting without reputations: %s", self.path, exc)
            return {}
        peers = data.get("peers") if isinstance(data, dict) else None
        if not isinstance(peers, dict) or data.get("format") != FORMAT:
            log.warning("%s is not a reputation table of format %d; ignored", self.path, FORMAT)
            return {}
        out: dict[str, Standing] = {}
        for peer, row in peers.items():
            standing = Standing.from_row(row)
            if _peer_id_ok(peer) and standing is not None:
                out[peer] = standing
        if len(out) < len(peers):
            log.warning("%s: %d damaged row(s) skipped", self.path, len(peers) - len(out))
        return out

    def save(self, rows: Mapping[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w") as out:
            json.dump(rows, out, separators=(",", ":"))
            out.flush()
            os.fsync(out.fileno())
        tmp.replace(self.path)


def _peer_id_ok(peer: Any) -> bool:
    return isinstance(peer, str) and 0 < len(peer) <= MAX_PEER_ID and peer.isalnum()
