"""Where a job runs, and what happens when that fails: routing with failover.

The node a client talks to routes: it asks the router for the candidates that
serve the model (itself included, when it does), tries the first, and on a
failure decides from the failure alone whether the next may be tried:

- nothing was sent (``PeerUnavailable``), or the peer answered an error whose
  retry policy is ELSEWHERE (``OVERLOADED``, ``NOT_EXECUTED``,
  ``MODEL_NOT_FOUND``...): the next candidate, at once;
- the peer may have run it (the stream broke after the request left, garbage
  came back, or ``OUTCOME_UNKNOWN`` / ``INTERNAL``): the next candidate only if
  the request is idempotent (inference is, by default), else that error;
- the request itself is at fault (``BAD_REQUEST``...) or the deadline passed:
  that error, at once.

A stream that already relayed chunks is never retried (the caller has part of
one answer; a second would be a different one): it fails with ``StreamBroken``,
which says how many chunks arrived. Attempts are bounded, and the request's
deadline bounds them all. Only one answer ever reaches the caller: an attempt
is abandoned (and the peer told ``Cancel``) before the next starts, and every
attempt carries the caller's request id.

Peers that fail are reported to the peer breakers, which keep them out of plans
for a while (doubling on each failed probe); peers that answer close them.

Verification (``node.jobs.verify``, when wired as ``verifier``) hooks in twice:
a job that asks for ``verify`` is handed to it whole, and each answer a peer
gave is offered to it for a spot check once it is on its way to the caller.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Protocol

import trio
from libp2p.peer.id import ID

from bootstrap.table import PeerTable
from node.errors import ConnectionLost, NodeError, PeerUnavailable
from protocols import (
    ErrorCode,
    Priority,
    RemoteError,
    RemoteProtocolError,
    Request,
    Result,
    Retry,
    SwarmError,
    Tensor,
    retry_policy,
)
from protocols.errors import ConfigError
from runners.errors import ModelNotFound

from .calls import OwnCalls
from .outbound import Caller
from .router import LocalNode, Preview, Router, RouteRequest, Strategy

log = logging.getLogger(__name__)

Emit = Callable[[Mapping[str, Any]], Awaitable[None]]
RunLocal = Callable[[Emit], Awaitable[Result]]  # runs it here, chunks to the Emit given
# Our calls' service time for a peer counts while an answer refreshed it this lately;
# then the router falls back to what the peer's heartbeats report (its own EWMA).
SERVICE_FRESH_S = 10.0
# Codes after which a peer counts as failing (not the request's fault, not busy).
PEER_FAULTS = frozenset({ErrorCode.INTERNAL, ErrorCode.OUTCOME_UNKNOWN, ErrorCode.MALFORMED})


class StreamBroken(NodeError):
    """The peer producing a stream failed after some chunks were relayed."""

    code = ErrorCode.OUTCOME_UNKNOWN

    def __init__(self, message: str, *, chunks: int) -> None:
        super().__init__(message)
        self.chunks = chunks


class BadStrategy(NodeError):
    code = ErrorCode.BAD_REQUEST


@dataclass(frozen=True, slots=True)
class Choice:
    """One candidate of a plan: a peer, or this node itself."""

    peer_id: str
    local: bool = False
    via: bool = False  # an intermediary: it passes the job on to a provider it links


class Planner(Protocol):
    """Orders the candidates for ``request``, leaving out ``exclude``."""

    def plan(self, request: Request, exclude: frozenset[str], local: bool) -> list[Choice]: ...

    def admit(self, peer_id: str) -> bool: ...

    def success(self, peer_id: str) -> None: ...

    def failure(self, peer_id: str) -> None: ...

    def abandon(self, peer_id: str) -> None: ...


class Checks(Protocol):
    """What the dispatcher needs of verification (``node.jobs.verify.Verifier``)."""

    def offer(self, request: Request, result: Result, peer_id: str) -> None: ...

    async def verified(self, request: Request, local: RunLocal | None) -> Result: ...


class Providers(Protocol):
    """What the dispatcher needs of membership."""

    def serves(self, model: str) -> bool: ...

    async def providers(self, model: str) -> list[Any]: ...

    def mark_unreachable(self, peer_id: str, reason: str) -> None: ...

    def note_use(self, model: str, peer_id: str) -> None: ...


class Dispatcher:
    """Routes a request to a candidate and fails over (see the module docstring)."""

    def __init__(
        self,
        self_id: str,
        providers: Providers,
        caller: Caller,
        planner: Planner,
        *,
        max_attempts: int = 3,
    ) -> None:
        if max_attempts < 1:
            raise ConfigError("max_attempts must be at least 1")
        self.self_id = self_id
        self._providers = providers
        self._caller = caller
        self._planner = planner
        self.max_attempts = max_attempts
        self.calls = OwnCalls()  # our requests at each peer: now, lately, how long they took
        self.failovers = 0  # attempts after the first, for status
        self.via_jobs = 0  # jobs answered through an intermediary, for status
        self.verifier: Checks | None = None  # spot checks and verify: N (set by the wiring)

    def serves(self, model: str) -> bool:
        return self._providers.serves(model)

    async def forward(self, request: Request, emit: Emit, local: RunLocal | None = None) -> Result:
        """Run ``request`` on the best candidate, failing over as the module says.

        ``local`` runs it on this node (when this node serves the model): the
        planner may choose it like any peer. Raises the last attempt's error,
        ``StreamBroken``, or ``ModelNotFound`` when no candidate serves it.
        """
        if request.verify and self.verifier is not None:
            return await self.verifier.verified(request, local)
        tried: set[str] = set()
        relayed = 0
        last: SwarmError | None = None

        async def counted(outputs: Mapping[str, Any]) -> None:
            nonlocal relayed
            relayed += 1
            await emit(outputs)

        async def relay(chunk: Any) -> None:
            await counted(chunk.outputs)

        attempts = 0
        while attempts < self.max_attempts:
            plan = self._planner.plan(request, frozenset(tried), local is not None)
            if not plan and not tried and local is None:
                await self._providers.providers(request.model)  # the DHT, when it runs
                plan = self._planner.plan(request, frozenset(tried), False)
            if not plan:
                break
            choice = plan[0]
            tried.add(choice.peer_id)
            if not choice.local and not self._planner.admit(choice.peer_id):
                continue  # its breaker's one probe is out already: not an attempt
            attempts += 1
            if attempts > 1:
                self.failovers += 1
            if not choice.local:  # the model is in use and this link busy: both kept
                self._providers.note_use(request.model, choice.peer_id)
            try:
                if choice.local:
                    assert local is not None
                    result = await local(counted)
                else:
                    result = await self._remote(choice.peer_id, request, relay)
            except SwarmError as exc:
                if relayed:
                    raise StreamBroken(
                        f"{choice.peer_id} failed after {relayed} chunk(s) of the stream: {exc}",
                        chunks=relayed,
                    ) from exc
                if not may_fail_over(exc, request):
                    raise
                log.info("attempt %d at %s failed, trying another: %s", attempts, choice, exc)
                last = exc
                continue
            meta: dict[str, Any] = {**result.meta, "attempts": attempts}
            if not choice.local:
                meta["forwarded_by"] = self.self_id
                # An intermediary passed on another's answer: not its own to check.
                if self.verifier is not None and not choice.via:
                    self.verifier.offer(request, result, choice.peer_id)
            if choice.via:
                meta["via"] = choice.peer_id
                self.via_jobs += 1
            return replace(result, id=request.id, meta=meta)
        if last is not None:
            raise last
        raise ModelNotFound(f"no peer in the swarm is known to serve {request.model!r}")

    async def attempt(
        self, choice: Choice, request: Request, local: RunLocal | None = None
    ) -> Result:
        """``request`` at ``choice`` alone, no failover: verification's extra runs.
        Raises PeerUnavailable when the peer's breaker admits no call now, and what
        the run raised otherwise."""
        if choice.local:
            if local is None:
                raise ModelNotFound(f"this node does not serve {request.model!r}")
            return await local(_no_chunks)
        if not self._planner.admit(choice.peer_id):
            raise PeerUnavailable(f"{choice.peer_id} is held back by its breaker")
        return await self._remote(choice.peer_id, request, _no_chunks)

    @property
    def in_flight(self) -> Mapping[str, int]:
        """Our requests at each peer, now."""
        return self.calls.in_flight

    async def _remote(self, peer_id: str, request: Request, relay: Any) -> Result:
        left = trio.current_effective_deadline() - trio.current_time()
        deadline_ms = None if left == float("inf") else max(1, int(left * 1000))
        forwarded = replace(request, hops=request.hops + 1, deadline_ms=deadline_ms)
        self.calls.started(peer_id, trio.current_time())
        verdict: str | None = None
        meta: Mapping[str, Any] | None = None  # the answer's: how long the job ran there
        try:
            result = await self._caller.call(ID.from_base58(peer_id), forwarded, relay)
            verdict, meta = "success", result.meta
            return result
        except PeerUnavailable as exc:
            verdict = "failure"
            self._providers.mark_unreachable(peer_id, str(exc))
            raise
        except RemoteError as exc:
            verdict = "failure" if exc.code in PEER_FAULTS else "success"
            raise
        except (ConnectionLost, RemoteProtocolError) as exc:
            verdict = "failure"
            raise ConnectionLost(f"{peer_id} broke off after the request left: {exc}") from exc
        finally:
            self.calls.ended(peer_id, trio.current_time(), request.model, meta)
            if verdict == "success":
                self._planner.success(peer_id)
            elif verdict == "failure":
                self._planner.failure(peer_id)
            else:  # cancelled: no verdict on the peer
                self._planner.abandon(peer_id)


async def _no_chunks(chunk: Any) -> None:
    """Verification's runs do not stream: nothing to relay."""


def parse_strategy(text: str | None) -> Strategy | None:
    """A strategy's name (None: the router's default); BadStrategy if unknown."""
    try:
        return None if text is None else Strategy(text)
    except ValueError:
        known = ", ".join(s.value for s in Strategy)
        raise BadStrategy(f"unknown strategy {text!r}; one of {known}") from None


def request_bytes(request: Request) -> int:
    """About how many bytes the request's inputs take on the wire."""
    size = 0
    for value in request.inputs.values():
        if isinstance(value, Tensor):
            size += value.nbytes
        elif isinstance(value, str):
            size += len(value.encode("utf-8", "surrogatepass"))
        elif isinstance(value, list):
            size += sum(
                len(v.encode("utf-8", "surrogatepass")) for v in value if isinstance(v, str)
            )
        else:
            size += 8
    return size


def may_fail_over(exc: SwarmError, request: Request) -> bool:
    """Whether a job that failed with ``exc`` may go to the next candidate."""
    policy = retry_policy(exc.code)
    return policy is Retry.ELSEWHERE or (policy is Retry.IF_IDEMPOTENT and request.idempotent)


class RouterPlanner:
    """The dispatcher's planner: ``node.router.Router`` over the membership table."""

    def __init__(
        self,
        router: Router,
        table: Callable[[], PeerTable],
        local: Callable[[], LocalNode],
        in_flight: Callable[[], Mapping[str, int]],
        paths: Callable[[], Mapping[str, str]] = dict,
        held_back: Callable[[], frozenset[str]] = frozenset,
        calls: Callable[[], OwnCalls | None] = lambda: None,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        """``paths``: each connected peer's connection kind ("direct", "hole-punched",
        "relayed"), from the circuits manager when there is one. ``calls``: the
        dispatcher's record of our calls (service times, our calls when each peer
        reported its load); without it the router knows only ``in_flight``.
        ``clock``: the one ``calls`` was given times by."""
        self.router = router
        self._table = table
        self._local = local
        self._in_flight = in_flight
        self._paths = paths
        self._held_back = held_back  # peers reputation keeps out of plans now
        self._calls = calls
        self._clock = clock

    def _ours(
        self, table: PeerTable, model: str
    ) -> tuple[Mapping[str, float] | None, Mapping[str, int] | None]:
        """(each peer's service time for ``model``, our calls at each peer when its
        load was reported: the table's last_seen, when the heartbeat came)."""
        calls = self._calls()
        if calls is None:
            return None, None
        peers = table.peers
        moments = {pid: peers[pid].last_seen for pid in calls.tracked() if pid in peers}
        fresh = self._clock() - SERVICE_FRESH_S
        return calls.service_ms(model, since=fresh), calls.as_of(moments)

    def plan(self, request: Request, exclude: frozenset[str], local: bool) -> list[Choice]:
        query = RouteRequest(
            model=request.model,
            strategy=parse_strategy(request.strategy),
            priority=request.priority,
            exclude=exclude,
            size_bytes=request_bytes(request),
            via=request.hops == 0,  # a job forwarded to us goes to a provider, not further
            held_back=self._held_back(),
        )
        table = self._table()
        found = self.router.plan(
            table,
            self._local() if local else None,
            query,
            self._in_flight(),
            self._paths(),
            *self._ours(table, request.model),
        )
        return [Choice(c.peer_id, c.local, c.path == "via") for c in found]

    def preview(
        self, model: str, strategy: str | None = None, priority: Priority = Priority.NORMAL
    ) -> Preview:
        """Where a job for ``model`` would go now and the candidates, running nothing.

        The local node counts when it serves the model, as in ``forward``; peers are
        only those already linked (a real job with none would ask the DHT first).
        """
        query = RouteRequest(
            model=model,
            strategy=parse_strategy(strategy),
            priority=priority,
            held_back=self._held_back(),
        )
        table = self._table()
        return self.router.preview(
            table, self._local(), query, self._in_flight(), self._paths(), *self._ours(table, model)
        )

    def admit(self, peer_id: str) -> bool:
        return self.router.breakers.admit(peer_id) is None

    def success(self, peer_id: str) -> None:
        self.router.breakers.success(peer_id)

    def failure(self, peer_id: str) -> None:
        self.router.breakers.failure(peer_id)

    def abandon(self, peer_id: str) -> None:
        self.router.breakers.abandon(peer_id)
