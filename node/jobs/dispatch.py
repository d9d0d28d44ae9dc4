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

A stream that already relayed chunks is not sent again whole (the caller has
part of one answer; a second would be a different one). It is resumed instead
(``node.jobs.resume``), at most ``max_resumes`` times: when its producer fails
in a way that would fail over a job that had sent nothing, the rest goes to a
peer whose record says it continues the job's input (the producer's numerics
first), continuing from the text the caller got; its chunks follow on the same
stream and the answer's meta names each producer and where it took over. When
no peer can continue it, it fails with ``StreamBroken``, which says how many
chunks arrived. Attempts are bounded (``max_attempts`` per producer sought), and
the request's deadline bounds them all. Only one answer ever reaches the
caller: an attempt is abandoned (and the peer told ``Cancel``) before the next
starts, and every attempt carries the caller's request id.

Hedging (``node.jobs.hedge``): an idempotent job whose first attempt has
delivered nothing after ``hedge_ms`` (the job's, else the node's; 0 is off) is
sent to the next candidate too; the first to deliver wins and the other is
cancelled.

Peers that fail are reported to the peer breakers, which keep them out of plans
for a while (doubling on each failed probe); peers that answer close them.

Verification (``node.jobs.verify``, when wired as ``verifier``) hooks in twice:
a job that asks for ``verify`` is handed to it whole, and each answer a peer
gave is offered to it for a spot check once it is on its way to the caller.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

import trio
from libp2p.peer.id import ID

from bootstrap.table import Peer, PeerTable
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
from .hedge import Failed, HedgeStats, race
from .outbound import Caller
from .resume import Progress, Resume, continued, may_resume, resume_of
from .resume import meta as resume_meta
from .router import LocalNode, Preview, Router, RouteRequest, Strategy
from .service import RunHere

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
    """Orders the candidates for ``request``, leaving out ``exclude``; with ``resume``
    only those that can continue the stream (``node.jobs.resume``)."""

    def plan(
        self,
        request: Request,
        exclude: frozenset[str],
        local: bool,
        resume: Resume | None = None,
    ) -> list[Choice]: ...

    def entry(self, peer_id: str, model: str) -> Mapping[str, Any] | None: ...

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
        max_resumes: int = 2,
        hedge_ms: int = 0,
    ) -> None:
        if max_attempts < 1:
            raise ConfigError("max_attempts must be at least 1")
        if max_resumes < 0 or hedge_ms < 0:
            raise ConfigError("max_resumes and hedge_ms must be at least 0")
        self.self_id = self_id
        self._providers = providers
        self._caller = caller
        self._planner = planner
        self.max_attempts = max_attempts
        self.max_resumes = max_resumes
        self.hedge_ms = hedge_ms
        self.calls = OwnCalls()  # our requests at each peer: now, lately, how long they took
        self.failovers = 0  # attempts after the first, for status
        self.resumes = 0  # streams continued on another producer, for status
        self.broken = 0  # streams that failed after chunks with no one to continue them
        self.hedges = HedgeStats()
        self.via_jobs = 0  # jobs answered through an intermediary, for status
        self.verifier: Checks | None = None  # spot checks and verify: N (set by the wiring)

    def serves(self, model: str) -> bool:
        return self._providers.serves(model)

    async def forward(self, request: Request, emit: Emit, local: RunHere | None = None) -> Result:
        """Run ``request`` on the best candidate, failing over as the module says.

        ``local`` runs it on this node (when this node serves the model): the
        planner may choose it like any peer. Raises the last attempt's error,
        ``StreamBroken``, or ``ModelNotFound`` when no candidate serves it.
        """
        if request.verify and self.verifier is not None:
            return await self.verifier.verified(request, local)
        progress = Progress()
        tried: set[str] = set()
        last: SwarmError | None = None
        job = request  # what the next attempt sends: the request, or its continuation
        resume: Resume | None = None  # what the next producer must do, once chunks went
        producer: Choice | None = None  # who produced the chunks so far, last
        attempts = sought = 0  # attempts in all; attempts for the producer now sought

        async def relay(outputs: Mapping[str, Any]) -> None:
            progress.relayed(outputs)
            await emit(outputs)

        while sought < self.max_attempts:
            plan = self._planner.plan(job, frozenset(tried), local is not None, resume)
            if not plan and not tried and local is None:
                await self._providers.providers(request.model)  # the DHT, when it runs
                plan = self._planner.plan(job, frozenset(tried), False, resume)
            if not plan:
                break
            choice = plan[0]
            tried.add(choice.peer_id)
            if not choice.local and not self._planner.admit(choice.peer_id):
                continue  # its breaker's one probe is out already: not an attempt
            attempts += 1
            sought += 1
            if attempts > 1:
                self.failovers += 1
            if not choice.local:  # the model is in use and this link busy: both kept
                self._providers.note_use(request.model, choice.peer_id)
            since = progress.mark()
            try:
                choice, result = await self._attempt(choice, job, relay, local, plan, tried)
            except Failed as failed:
                choice, exc = failed.choice, failed.error
                if progress.chunks > since[0]:  # it produced part of the stream, then failed
                    progress.produced(choice.peer_id, since)
                    producer = choice
                    job, resume = self._resumed(request, progress, choice, exc, attempts)
                    sought = 0
                    last = exc
                    continue
                if not may_fail_over(exc, job):
                    if progress.chunks:  # a continuation refused: the stream stays cut
                        raise self._broken(producer or choice, progress, exc) from exc
                    raise exc from None
                log.info("attempt %d at %s failed, trying another: %s", attempts, choice, exc)
                last = exc
                continue
            progress.produced(choice.peer_id, since)
            return self._answer(request, progress, choice, result, attempts)
        if progress.chunks:
            assert producer is not None and last is not None
            raise self._broken(producer, progress, last, "no other peer could continue it")
        if last is not None:
            raise last
        raise ModelNotFound(f"no peer in the swarm is known to serve {request.model!r}")

    def _resumed(
        self, request: Request, progress: Progress, choice: Choice, exc: SwarmError, attempt: int
    ) -> tuple[Request, Resume]:
        """The continuation of ``request``'s stream, and what its producer must do;
        StreamBroken when it may not or cannot be resumed."""
        resume = resume_of(request, self._planner.entry(choice.peer_id, request.model))
        job = continued(request, progress)
        # Only the node the client talks to resumes: an intermediary's stream that
        # breaks is the first node's to continue, once.
        if request.hops or not may_resume(exc, request) or resume is None or job is None:
            raise self._broken(choice, progress, exc) from exc
        if progress.resumes >= self.max_resumes:
            raise self._broken(choice, progress, exc, f"resumed {progress.resumes} times already")
        self.resumes += 1
        log.info(
            # "trying another", as a failover says: the attempt that resumes is one too.
            "attempt %d at %s failed after %d chunk(s) of the stream, trying another to "
            "resume it from token %d: %s",
            attempt,
            choice,
            progress.chunks,
            progress.tokens,
            exc,
        )
        return job, resume

    def _broken(
        self, producer: Choice, progress: Progress, exc: SwarmError, why: str = ""
    ) -> StreamBroken:
        self.broken += 1
        said = f"{exc}; {why}" if why else str(exc)
        return StreamBroken(
            f"{producer.peer_id} failed after {progress.chunks} chunk(s) of the stream: {said}",
            chunks=progress.chunks,
        )

    def _answer(
        self, request: Request, progress: Progress, choice: Choice, result: Result, attempts: int
    ) -> Result:
        meta: dict[str, Any] = {**result.meta, "attempts": attempts}
        if request.stream:
            meta.update(resume_meta(progress))
        if not choice.local:
            meta["forwarded_by"] = self.self_id
            # An intermediary passed on another's answer, and a resumed stream is
            # several nodes' answer: neither is one peer's own to check.
            if self.verifier is not None and not choice.via and not progress.resumes:
                self.verifier.offer(request, result, choice.peer_id)
        if choice.via:
            meta["via"] = choice.peer_id
            self.via_jobs += 1
        return replace(result, id=request.id, meta=meta)

    async def _attempt(
        self,
        choice: Choice,
        job: Request,
        relay: Emit,
        local: RunHere | None,
        plan: list[Choice],
        tried: set[str],
    ) -> tuple[Choice, Result]:
        """``job`` at ``choice``, hedged on the plan's next candidate when the job asks
        for it; the choice that answered and its result. Raises ``Failed``."""

        async def run(at: Choice, emit: Emit) -> Result:
            if at.local:
                assert local is not None
                return await local(emit, job)
            return await self._remote(at.peer_id, job, _chunks_to(emit))

        hedge_ms = self.hedge_ms if job.hedge_ms is None else job.hedge_ms
        if not hedge_ms or not job.idempotent or job.verify or job.hops:
            try:
                return choice, await run(choice, relay)
            except SwarmError as exc:
                raise Failed(choice, exc) from exc

        def second() -> Choice | None:
            for other in plan[1:]:
                if other.peer_id in tried:
                    continue
                if other.local or self._planner.admit(other.peer_id):
                    tried.add(other.peer_id)
                    return other
            return None

        return await race(run, choice, second, relay, hedge_ms / 1000, self.hedges)

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
        forwarded = replace(request, hops=request.hops + 1, deadline_ms=deadline_ms, hedge_ms=None)
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


def _chunks_to(emit: Emit) -> Callable[[Any], Awaitable[None]]:
    """A caller's chunk handler that passes each chunk's outputs to ``emit``."""

    async def relay(chunk: Any) -> None:
        await emit(chunk.outputs)

    return relay


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
        unlinked: Callable[[str], Sequence[Peer]] = lambda model: (),
    ) -> None:
        """``paths``: each connected peer's connection kind ("direct", "hole-punched",
        "relayed"), from the circuits manager when there is one. ``calls``: the
        dispatcher's record of our calls (service times, our calls when each peer
        reported its load); without it the router knows only ``in_flight``.
        ``clock``: the one ``calls`` was given times by. ``unlinked``: rows for
        providers of a model known but not linked (their load None: unknown to the
        router), which plans may use beside the table's linked peers."""
        self.router = router
        self._table = table
        self._local = local
        self._in_flight = in_flight
        self._paths = paths
        self._held_back = held_back  # peers reputation keeps out of plans now
        self._calls = calls
        self._clock = clock
        self._unlinked = unlinked

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

    def plan(
        self,
        request: Request,
        exclude: frozenset[str],
        local: bool,
        resume: Resume | None = None,
    ) -> list[Choice]:
        query = RouteRequest(
            model=request.model,
            strategy=parse_strategy(request.strategy),
            priority=request.priority,
            exclude=exclude,
            size_bytes=request_bytes(request),
            via=request.hops == 0,  # a job forwarded to us goes to a provider, not further
            held_back=self._held_back(),
            continues=None if resume is None else resume.kind,
            alike=() if resume is None else resume.alike,
        )
        table = self._table()
        if extra := self._unlinked(request.model):
            table = replace(table, peers={**table.peers, **{p.peer_id: p for p in extra}})
        found = self.router.plan(
            table,
            self._local() if local else None,
            query,
            self._in_flight(),
            self._paths(),
            *self._ours(table, request.model),
        )
        return [Choice(c.peer_id, c.local, c.path == "via") for c in found]

    def entry(self, peer_id: str, model: str) -> Mapping[str, Any] | None:
        """How ``peer_id`` (this node, or a peer by its record) announces ``model``."""
        want = model.casefold()
        local = self._local()
        if peer_id == self.router.self_id:
            entries: Any = [m.describe() for m in local.models]
        else:
            peer = self._table().peers.get(peer_id)
            entries = (peer.body or {}).get("models") if peer is not None else None
        for m in entries if isinstance(entries, list | tuple) else ():
            if isinstance(m, Mapping) and str(m.get("name")).casefold() == want:
                return m
        return None

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
