"""Fair share: who a job belongs to, each peer's limits, and what each peer got.

Who: a job is held against the authenticated peer id of the stream it came on
(for the local socket, this machine's CLI client id; for the HTTP gateway,
``GATEWAY``, the node's own HTTP clients). A forwarded job (``hops > 0``) may
name an ``origin``, the client the forwarder vouches for: it divides the
forwarder's share between its clients (``node.jobs.fair_queue``) and never adds
to it, so a forwarder cannot escape its own accountability by inventing
origins; its limits below are the forwarder's. A job a client sends itself
(``hops == 0``) has the client as its origin, whatever it wrote there; that is
what this node passes on when it forwards the job.

Each peer's limits (``FairnessConfig``, config.toml's ``[fairness]``), all
scaled by its weight: how many of its jobs wait for one model (``queued``, in
the gate), how many this node holds for it at once (``in_flight``: waiting,
running, or forwarded), and a token bucket of requests per second (``rate``,
``burst``; 0: none). Over a limit, a job is refused at once with OVERLOADED and
a retry-after (``OverBudget``). ``HIGH`` has a budget too: at most
``high_share`` of a peer's jobs here at once (always one) run as HIGH; more
are taken as NORMAL. Demoted, not refused: the job is still worth doing at the
peer's fair place, and a refusal would make a client that marks everything
HIGH send it again; demoted, marking everything HIGH buys one job's place.

With fair share off (``enabled = false``), no limit applies and the gates are
first come, first served within a priority, as before; the counts still are.

``Ledger`` is the per-peer book: pure, time given to each call, bounded to
``max_peers`` entries. A peer with nothing here is forgotten after
``forget_after_s`` (or sooner, the stalest first, when the book is full); when
the book is full of busy peers, newcomers are held together as ``OTHER``, one
share between them.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from node.errors import OverBudget
from node.net.access import looks_like_peer_id
from protocols import Priority, Request
from protocols.config import Table
from protocols.errors import ConfigError

from .fair_queue import Who

GATEWAY = "gateway"  # the holder of the HTTP gateway's jobs: the node's own clients
OTHER = "other"  # newcomers while the book is full of busy peers; the rest in top-N views
REASONS = ("rate", "in_flight", "queued", "high")  # why a job was over its peer's budget
SHARE_HALF_LIFE_S = 30.0  # how fast a peer's share of recent work fades


@dataclass(frozen=True, slots=True)
class FairnessConfig:
    enabled: bool = True
    weight: float = 1.0  # a peer's share; its limits scale with it
    own_weight: float = 4.0  # the node's own clients: its gateway and this machine's CLI
    weights: Mapping[str, float] = field(default_factory=dict)  # peer id -> weight
    queued: int = 64  # a peer's jobs waiting for one model (x weight)
    in_flight: int = 256  # a peer's jobs held here at once (x weight)
    rate: float = 0.0  # a peer's jobs per second (x weight); 0: no limit
    burst: int = 20  # the bucket's size (x weight)
    high_share: float = 0.25  # of a peer's jobs here at once, at most this share HIGH
    max_peers: int = 1024  # peers kept in the book
    forget_after_s: float = 300.0  # a peer with nothing here is forgotten after this
    top: int = 8  # peers shown by status and /metrics (the rest as "other")

    def __post_init__(self) -> None:
        for name in ("weight", "own_weight", "rate", "high_share", "forget_after_s"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ConfigError(f"fairness {name} must be a finite number >= 0")
        if self.weight <= 0 or self.own_weight <= 0 or self.high_share > 1:
            raise ConfigError("fairness weights must be > 0 and high_share at most 1")
        for name in ("queued", "in_flight", "burst", "max_peers", "top"):
            value = getattr(self, name)
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
                raise ConfigError(f"fairness {name} must be an integer >= 1")
        for peer, w in self.weights.items():
            if not looks_like_peer_id(peer):
                raise ConfigError(f"fairness weights: {peer!r} is not a peer id (12D3KooW...)")
            if not (isinstance(w, int | float) and math.isfinite(w) and w > 0):
                raise ConfigError(f"fairness weights: {peer}'s weight must be a number > 0")
        object.__setattr__(self, "weights", dict(self.weights))

    @classmethod
    def from_table(cls, table: Table) -> FairnessConfig:
        """``[fairness]`` in config.toml; every field optional, bad ones named."""
        base = cls()
        sub = table.table("weights")
        weights = {} if sub is None else {p: sub.number(p, high=1e6) for p in sub.data}
        config = cls(
            enabled=table.flag("enabled", base.enabled),
            weight=table.number("weight", base.weight, low=1e-3, high=1e6),
            own_weight=table.number("own_weight", base.own_weight, low=1e-3, high=1e6),
            weights=weights,
            queued=table.integer("queued", base.queued, low=1, high=1 << 20),
            in_flight=table.integer("in_flight", base.in_flight, low=1, high=1 << 20),
            rate=table.number("rate", base.rate, high=1e6),
            burst=table.integer("burst", base.burst, low=1, high=1 << 20),
            high_share=table.number("high_share", base.high_share, high=1.0),
            max_peers=table.integer("max_peers", base.max_peers, low=1, high=1 << 20),
            forget_after_s=table.number("forget_after_s", base.forget_after_s, high=86400.0),
            top=table.integer("top", base.top, low=1, high=1000),
        )
        if sub is not None:
            sub.done()
        table.done()
        return config


def who_for(peer: str, request: Request) -> Who:
    """The share a job from ``peer`` (the stream's authenticated id) is held against."""
    if request.hops > 0 and request.origin:
        return Who(peer, request.origin)  # as the forwarder vouches, inside its share
    return Who(peer, peer)


@dataclass
class TokenBucket:
    """``rate`` tokens a second, up to ``burst``; one per request."""

    rate: float
    burst: float
    tokens: float
    stamp: float

    def take(self, now: float) -> float:
        """0 if a token was taken, else the seconds until one will be there."""
        self.tokens = min(self.burst, self.tokens + max(0.0, now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


@dataclass
class _Decayed:
    """A count that halves every SHARE_HALF_LIFE_S."""

    value: float = 0.0
    stamp: float = 0.0

    def at(self, now: float) -> float:
        return self.value * math.exp2(-max(0.0, now - self.stamp) / SHARE_HALF_LIFE_S)

    def add(self, now: float, n: float = 1.0) -> None:
        self.value, self.stamp = self.at(now) + n, now


@dataclass(eq=False)
class PeerBook:
    """One peer's page: what it has here now and what it got."""

    weight: float
    own: bool
    bucket: TokenBucket | None
    seen: float
    held: int = 0  # its jobs here now: waiting, running or forwarded
    high: int = 0  # of which taken as HIGH
    served: int = 0
    failed: int = 0
    refused: int = 0  # OVERLOADED by this node: a full queue or its own limit
    over: dict[str, int] = field(default_factory=dict)  # reason -> jobs over its budget
    recent: _Decayed = field(default_factory=_Decayed)  # served, fading
    asked: _Decayed = field(default_factory=_Decayed)  # arrived, fading (for top N)


@dataclass(frozen=True, slots=True)
class Ticket:
    """A job admitted by the ledger: the share it is held against and its priority."""

    who: Who
    priority: Priority
    high: bool  # counted against the HIGH budget


class Ledger:
    """Per-peer limits and counts (see the module docstring). Pure; ``now`` is given."""

    def __init__(self, config: FairnessConfig, own: Collection[str] = (GATEWAY,)) -> None:
        self.config = config
        self.own = frozenset(own)
        self.books: dict[str, PeerBook] = {}
        self.totals: dict[str, int] = {"served": 0, "refused": 0, **{r: 0 for r in REASONS}}
        self.forgotten = 0
        self._swept = -math.inf

    def weight(self, peer: str) -> float:
        c = self.config
        if peer in c.weights:
            return c.weights[peer]
        return c.own_weight if peer in self.own else c.weight

    def limit(self, peer: str, base: int) -> int:
        """A per-peer limit of ``base``, scaled by the peer's weight (at least 1)."""
        return max(1, math.ceil(base * self.weight(peer)))

    def queued_limit(self, holder: str) -> int:
        """How many of ``holder``'s jobs may wait for one model (none with fairness off)."""
        return self.limit(holder, self.config.queued) if self.config.enabled else 1 << 62

    def arrive(self, who: Who, priority: Priority, now: float, retry_ms: int) -> Ticket:
        """Take a job of ``who`` in, or raise OverBudget (OVERLOADED, with retry-after).

        ``retry_ms`` is the retry-after to give for a full ``in_flight`` budget (when
        this node's work will have moved on). The ticket says which share the job is
        held against (``OTHER`` when the book is full of busy peers) and the priority
        it runs at (HIGH over the peer's budget runs as NORMAL).
        """
        book, who = self._book(who, now)
        book.seen = now
        book.asked.add(now)
        c = self.config
        if c.enabled:
            if book.held >= self.limit(who.holder, c.in_flight):
                self._over(book, "in_flight")
                raise OverBudget(
                    f"{book.held} jobs of this peer are here already", "in_flight", retry_ms
                )
            if book.bucket is not None and (wait := book.bucket.take(now)) > 0:
                self._over(book, "rate")
                raise OverBudget("this peer's request rate is over its budget", "rate", _ms(wait))
        high = priority is Priority.HIGH
        if high and c.enabled:
            allowed = max(1, math.floor(c.high_share * (book.held + 1)))
            if book.high + 1 > allowed:
                high, priority = False, Priority.NORMAL
                book.over["high"] = book.over.get("high", 0) + 1
                self.totals["high"] += 1
        book.held += 1
        book.high += high
        return Ticket(who, priority, high)

    def depart(self, ticket: Ticket, outcome: str, now: float, over: str | None = None) -> None:
        """The job of ``ticket`` is over: ``ok``, ``refused`` (OVERLOADED here; ``over``
        is the budget it was over, if that was why) or another error code."""
        book = self.books.get(ticket.who.holder)
        if book is None:
            return
        book.held -= 1
        book.high -= ticket.high
        book.seen = now
        if outcome == "ok":
            book.served += 1
            book.recent.add(now)
            self.totals["served"] += 1
        elif outcome == "refused":
            book.refused += 1
            self.totals["refused"] += 1
            if over in REASONS:
                book.over[over] = book.over.get(over, 0) + 1
                self.totals[over] += 1
        else:
            book.failed += 1

    def _over(self, book: PeerBook, reason: str) -> None:
        book.refused += 1
        book.over[reason] = book.over.get(reason, 0) + 1
        self.totals["refused"] += 1
        self.totals[reason] += 1

    def _book(self, who: Who, now: float) -> tuple[PeerBook, Who]:
        book = self.books.get(who.holder)
        if book is not None:
            return book, who
        if now - self._swept > self.config.forget_after_s / 8 or len(self.books) >= (
            self.config.max_peers
        ):
            self.sweep(now)
        if len(self.books) >= self.config.max_peers:
            idle = [p for p, b in self.books.items() if b.held == 0 and p != OTHER]
            if not idle:
                return self._new(OTHER, now), Who(OTHER, who.holder)
            del self.books[min(idle, key=lambda p: self.books[p].seen)]
            self.forgotten += 1
        return self._new(who.holder, now), who

    def _new(self, holder: str, now: float) -> PeerBook:
        book = self.books.get(holder)
        if book is None:
            c = self.config
            w = self.weight(holder)
            bucket = None
            if c.rate > 0:
                size = max(1.0, c.burst * w)
                bucket = TokenBucket(rate=c.rate * w, burst=size, tokens=size, stamp=now)
            book = self.books[holder] = PeerBook(w, holder in self.own, bucket, now)
        return book

    def sweep(self, now: float) -> None:
        """Forget the peers that have had nothing here for ``forget_after_s``."""
        self._swept = now
        limit = now - self.config.forget_after_s
        for peer in [p for p, b in self.books.items() if b.held == 0 and b.seen < limit]:
            del self.books[peer]
            self.forgotten += 1

    def describe(self, now: float, queued: Mapping[str, int], running: Mapping[str, int]) -> Any:
        """Plain data for status: the top peers by recent asking, the rest as ``other``.

        ``queued`` and ``running`` are each holder's jobs waiting and running in the
        gates now; ``share`` is a peer's part of the work served lately (fading with a
        half-life of SHARE_HALF_LIFE_S) and ``fair`` the part its weight gives it
        among the peers with work here or served lately.
        """
        c = self.config
        recent = {p: b.recent.at(now) for p, b in self.books.items()}
        total = sum(recent.values())
        active = [p for p, b in self.books.items() if b.held or recent[p] > 0.05]
        weights = sum(self.books[p].weight for p in active)

        def row(peer: str, book: PeerBook) -> dict[str, Any]:
            share = recent[peer] / total if total else 0.0
            fair = book.weight / weights if weights and peer in active else 0.0
            return {
                "peer": peer,
                "own": book.own,
                "weight": book.weight,
                "queued": queued.get(peer, 0),
                "running": running.get(peer, 0),
                "in_flight": book.held,
                "served": book.served,
                "failed": book.failed,
                "refused": book.refused,
                "over_budget": dict(book.over),
                "share": round(share, 4),
                "fair": round(fair, 4),
            }

        ranked = sorted(self.books.items(), key=lambda e: (-e[1].asked.at(now), e[0]))
        top = [row(p, b) for p, b in ranked[: c.top]]
        rest = [row(p, b) for p, b in ranked[c.top :]]
        other = None
        if rest:
            other = {
                "peers": len(rest),
                **{k: sum(r[k] for r in rest) for k in _SUMMED},
                "over_budget": {r: sum(x["over_budget"].get(r, 0) for x in rest) for r in REASONS},
                "share": round(sum(r["share"] for r in rest), 4),
            }
        return {
            "enabled": c.enabled,
            "tracked": len(self.books),
            "forgotten": self.forgotten,
            "totals": dict(self.totals),
            "peers": top,
            "other": other,
        }


_SUMMED = ("queued", "running", "in_flight", "served", "failed", "refused")


def _ms(seconds: float) -> int:
    return max(1, math.ceil(1000 * seconds))
