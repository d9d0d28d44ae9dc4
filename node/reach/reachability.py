"""Whether this node is publicly reachable: a pure reducer over dial-back answers.

``state = apply(state, event)``; ``verdict(state)`` says public, private or
unknown and why; ``next_asks(state, linked)`` says which linked peers to ask
for a dial-back now. No I/O, no clock: every event carries its time.
``node.reach.monitor`` does the asking and feeds the answers in.

The rules (``--reachability auto``):

- An answer is one peer's report on the addresses we asked it to dial: the IP it
  sees us connect from (``observed``) and, per address, ok (a fresh connection
  reached us and the Noise handshake proved our peer id), failed, or refused
  (not the IP it sees us at). Each peer's latest answer counts for
  ``answer_valid_s``.
- NAT evidence: a peer that sees us at an IP that is none of our own. Once there
  is any, only such peers' answers count: a peer on our own LAN sees us at our
  private address and can dial it, which says nothing of the world beyond our
  router. Without NAT evidence (a flat network, a public IP on the interface,
  one machine) every answer counts. A peer that sees us at a loopback address
  is on this machine: its answer counts only for a node that listens on
  loopback alone (a swarm on one machine), and is never NAT evidence.
- Public: an address confirmed by ``needed`` distinct counted peers, where
  ``needed`` is 2, or 1 while this node links only one peer (a two-node swarm has
  no second opinion to ask). One lying peer cannot make us public while a second
  peer can be asked. Once public, we stay public while at least one confirmation
  is valid and no counted peer failed to dial us (hysteresis: a third peer
  joining does not flip the verdict while we ask it).
- Private: at least one counted peer dialled and failed, and no address has a
  confirmation. A false "private" costs a relay; a false "public" announces an
  address nobody can dial: so one failure suffices for private, two
  confirmations are needed for public. Once private, we stay private until an
  address reaches ``needed`` confirmations.
- Unknown otherwise: nobody answered yet, or the answers disagree (then more
  peers are asked).
- Configuration (``--reachability public|private``, ``--public-addr``) decides
  outright and nothing is asked.

When our candidate addresses change (a new interface, a new observed IP),
answers given before the change no longer satisfy ``next_asks``, so peers are
asked again at once; the verdict keeps using them until newer ones arrive.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TypeVar

from .addresses import endpoint
from .config import Reach, ReachConfig

WANTED_ANSWERS = 2  # counted answers we try to hold at any time
T = TypeVar("T")


class Outcome(enum.StrEnum):
    OK = "ok"
    FAILED = "failed"
    REFUSED = "refused"


@dataclass(frozen=True, slots=True)
class DialResult:
    addr: str
    outcome: Outcome
    why: str = ""


# ---------------------------------------------------------------------------
# events


@dataclass(frozen=True, slots=True)
class Asked:
    peer_id: str
    addrs: tuple[str, ...]
    at: float


@dataclass(frozen=True, slots=True)
class Answered:
    peer_id: str
    observed: str | None  # the IP the peer sees us at (None: it did not say)
    results: tuple[DialResult, ...]
    at: float


@dataclass(frozen=True, slots=True)
class NoAnswer:
    """The peer did not answer (no protocol, timed out, rate-limited us)."""

    peer_id: str
    why: str
    at: float
    retry_after_s: float = 0.0


@dataclass(frozen=True, slots=True)
class Addresses:
    """Our own IPs (loopback included), the candidates we ask peers to dial, and
    how many peers we link now."""

    own_ips: frozenset[str]
    candidates: tuple[str, ...]
    linked: int
    at: float


Event = Asked | Answered | NoAnswer | Addresses


# ---------------------------------------------------------------------------
# state


@dataclass(frozen=True, slots=True)
class Verdict:
    reach: Reach
    why: str
    confirmed: tuple[str, ...] = ()  # addresses dial-backs reached (used while public)
    refuted: tuple[str, ...] = ()  # addresses dial-backs could not reach
    by: tuple[str, ...] = ()  # the peers whose answers decided it


@dataclass(frozen=True, slots=True)
class ReachState:
    config: ReachConfig = field(default_factory=ReachConfig)
    own_ips: frozenset[str] = frozenset()
    candidates: tuple[str, ...] = ()
    candidates_since: float = 0.0  # when the candidates last changed
    linked: int = 0
    answers: Mapping[str, Answered] = field(default_factory=dict)  # latest per peer
    asked: Mapping[str, Asked] = field(default_factory=dict)  # latest per peer
    not_before: Mapping[str, float] = field(default_factory=dict)  # per peer, after NoAnswer
    in_flight: frozenset[str] = frozenset()
    now: float = 0.0
    verdict: Verdict = field(default_factory=lambda: Verdict(Reach.UNKNOWN, "not checked yet"))
    answers_in: int = 0
    failures: int = 0  # requests that got no answer

    def __post_init__(self) -> None:
        configured = self.config.configured
        if configured is not None and self.verdict.reach is not configured:
            object.__setattr__(self, "verdict", _configured(self.config))


MAX_PEERS_HELD = 256  # answers and asks kept, the oldest dropped first


def apply(state: ReachState, event: Event) -> ReachState:
    """The state after ``event`` (the verdict recomputed). Never raises."""
    now = max(state.now, event.at)
    match event:
        case Addresses():
            changed = event.candidates != state.candidates
            state = replace(
                state,
                own_ips=event.own_ips,
                candidates=event.candidates,
                candidates_since=event.at if changed else state.candidates_since,
                linked=max(0, event.linked),
            )
        case Asked(peer_id=pid):
            asked = {k: v for k, v in state.asked.items() if k != pid}
            state = replace(
                state,
                asked=_bounded({**asked, pid: event}),
                in_flight=state.in_flight | {pid},
            )
        case Answered(peer_id=pid):
            answers = {k: v for k, v in state.answers.items() if k != pid}
            state = replace(
                state,
                answers=_bounded({**answers, pid: event}),
                in_flight=state.in_flight - {pid},
                answers_in=state.answers_in + 1,
            )
        case NoAnswer(peer_id=pid):
            wait = max(event.retry_after_s, state.config.reask_after_s)
            state = replace(
                state,
                not_before=_bounded({**state.not_before, pid: event.at + wait}),
                in_flight=state.in_flight - {pid},
                failures=state.failures + 1,
            )
    state = replace(state, now=now)
    return replace(state, verdict=verdict(state))


def _bounded(items: dict[str, T]) -> dict[str, T]:
    """At most MAX_PEERS_HELD entries: the latest inserted (dicts keep that order)."""
    if len(items) <= MAX_PEERS_HELD:
        return items
    return dict(list(items.items())[-MAX_PEERS_HELD:])


# ---------------------------------------------------------------------------
# the verdict


def _configured(config: ReachConfig) -> Verdict:
    if config.configured is Reach.PRIVATE:
        return Verdict(Reach.PRIVATE, "configured (--reachability private)")
    if config.mode.value == "public":
        return Verdict(Reach.PUBLIC, "configured (--reachability public)")
    return Verdict(Reach.PUBLIC, "configured (--public-addr)")


def counted_answers(state: ReachState) -> list[Answered]:
    """The fresh answers that count (see the module docstring), by peer id."""
    fresh = [
        a
        for a in state.answers.values()
        if a.observed is not None and state.now - a.at <= state.config.answer_valid_s
    ]
    if not _all_loopback_ips(state.own_ips):  # a peer on this machine says nothing of others
        fresh = [a for a in fresh if not _loopback_ip(a.observed)]
    nat = any(a.observed not in state.own_ips for a in fresh)
    return sorted(
        (a for a in fresh if not nat or a.observed not in state.own_ips),
        key=lambda a: a.peer_id,
    )


def needed(state: ReachState) -> int:
    return 2 if state.linked >= 2 else 1


def verdict(state: ReachState) -> Verdict:
    configured = state.config.configured
    if configured is not None:
        return _configured(state.config)
    counted = counted_answers(state)
    ok_by: dict[str, list[str]] = {}
    failed: dict[str, list[str]] = {}  # peer -> addresses it could not reach
    for answer in counted:
        oks = [r.addr for r in answer.results if r.outcome is Outcome.OK]
        for addr in oks:
            ok_by.setdefault(addr, []).append(answer.peer_id)
        bad = [r.addr for r in answer.results if r.outcome is Outcome.FAILED]
        if bad and not oks:
            failed[answer.peer_id] = bad
    best = max((len(p) for p in ok_by.values()), default=0)
    need = needed(state)
    before = state.verdict.reach
    staying = before is Reach.PUBLIC and best >= 1 and not failed
    if best >= need or staying:
        floor = 1 if staying and best < need else need
        confirmed = tuple(a for a, peers in ok_by.items() if len(peers) >= floor)
        by = tuple(sorted({p for a in confirmed for p in ok_by[a]}))
        refuted = tuple(sorted({a for addrs in failed.values() for a in addrs}))
        return Verdict(Reach.PUBLIC, _public_why(confirmed, by, state), confirmed, refuted, by)
    if failed and (best == 0 or before is Reach.PRIVATE):
        refuted = tuple(sorted({a for addrs in failed.values() for a in addrs}))
        return Verdict(
            Reach.PRIVATE, _private_why(counted, failed, state), (), refuted, tuple(failed)
        )
    if not state.answers:
        why = "no linked peer to dial us back yet" if not state.linked else "asking peers"
        return Verdict(Reach.UNKNOWN, why)
    if best or failed:
        why = (
            f"answers disagree: {best} peer(s) reached us, {len(failed)} could not; "
            "asking more peers"
        )
        return Verdict(Reach.UNKNOWN, why)
    return Verdict(Reach.UNKNOWN, "no peer has dialled any of our addresses yet")


def _public_why(confirmed: Sequence[str], by: Sequence[str], state: ReachState) -> str:
    shown = ", ".join(_host_port(a) for a in confirmed[:2])
    where = " (this machine only: we listen on loopback)" if _all_loopback(confirmed) else ""
    return f"dialled back at {shown} by {len(by)} peer(s) over fresh connections{where}"


def _private_why(
    counted: Sequence[Answered], failed: Mapping[str, Sequence[str]], state: ReachState
) -> str:
    peer = sorted(failed)[0]
    answer = next(a for a in counted if a.peer_id == peer)
    addr = _host_port(failed[peer][0])
    if answer.observed not in state.own_ips:
        return (
            f"behind a NAT: {_short(peer)} sees us at {answer.observed} and could not "
            f"dial {addr} back"
        )
    return f"{_short(peer)} could not dial {addr} back (a firewall?)"


def _loopback_ip(text: str | None) -> bool:
    try:
        return text is not None and ipaddress.ip_address(text).is_loopback
    except ValueError:
        return False


def _all_loopback_ips(ips: frozenset[str]) -> bool:
    return bool(ips) and all(_loopback_ip(ip) for ip in ips)


def _all_loopback(addrs: Sequence[str]) -> bool:
    points = [endpoint(a) for a in addrs]
    return bool(points) and all(p is not None and p.ip.is_loopback for p in points)


def _host_port(addr: str) -> str:
    point = endpoint(addr)
    if point is None:
        return addr
    return f"[{point.ip}]:{point.port}" if point.ip.version == 6 else f"{point.ip}:{point.port}"


def _short(peer_id: str) -> str:
    return peer_id[-8:]


# ---------------------------------------------------------------------------
# planning the next requests


def next_asks(state: ReachState, linked: Sequence[str]) -> list[str]:
    """The linked peers to ask for a dial-back now (maybe none), best first.

    At most ``max_asking`` requests are in flight. A peer is asked:

    - again at once when it answered "refused" for every address but told us an
      IP we did not offer, and our candidates hold that IP now (we learnt it
      from its answer);
    - while fewer than ``WANTED_ANSWERS`` counted answers were given since our
      candidates last changed (or fewer than the linked peers, when fewer are
      linked): peers not asked yet first, then those asked longest ago, each at
      most once per ``reask_after_s``;
    - once per ``recheck_s`` otherwise (the one asked longest ago).
    """
    config = state.config
    if config.configured is not None or not state.candidates:
        return []
    room = config.max_asking - len(state.in_flight)
    if room <= 0:
        return []
    now = state.now
    offered = _ips(state.candidates)

    def free(pid: str) -> bool:
        return pid not in state.in_flight and now >= state.not_before.get(pid, float("-inf"))

    def last_asked(pid: str) -> float:
        asked = state.asked.get(pid)
        return float("-inf") if asked is None else asked.at

    peers = [p for p in dict.fromkeys(linked) if free(p)]
    chosen: list[str] = []
    for pid in peers:  # a re-ask with the IP the peer told us
        answer, asked = state.answers.get(pid), state.asked.get(pid)
        if answer is None or answer.observed is None or answer.observed not in offered:
            continue
        if _refused_only(answer) and answer.observed not in _ips(asked.addrs if asked else ()):
            chosen.append(pid)
    current = [
        a for a in counted_answers(state) if a.at >= state.candidates_since and not _refused_only(a)
    ]
    want = min(WANTED_ANSWERS, max(1, len(set(linked))))
    answered = {a.peer_id for a in current}
    if len(current) < want:
        rest = [
            p
            for p in peers
            if p not in chosen
            and p not in answered
            and (
                now - last_asked(p) >= config.reask_after_s
                or last_asked(p) < state.candidates_since
            )
        ]
        rest.sort(key=lambda p: (last_asked(p), p))
        chosen += rest[: max(0, want - len(current))]
    elif not chosen:
        newest = max((a.at for a in current), default=float("-inf"))
        if now - newest >= config.recheck_s:
            due = [p for p in peers if now - last_asked(p) >= config.reask_after_s]
            chosen += sorted(due, key=lambda p: (last_asked(p), p))[:1]
    return chosen[:room]


def _refused_only(answer: Answered) -> bool:
    return all(r.outcome is Outcome.REFUSED for r in answer.results)


def _ips(addrs: Sequence[str]) -> set[str]:
    return {str(p.ip) for p in (endpoint(a) for a in addrs) if p is not None}
