"""Running a job again elsewhere to find out whether its answer was right.

Two ways in, both on the node that routed the job (``Dispatcher`` calls them):

- Spot checks (``offer``). A share ``rate`` of the deterministic jobs this node
  routed to a peer is run again, in the background, on a second node serving
  the model: this node itself when it serves it (its own run is the ground
  truth), else another peer (for greedy generation one announcing the same
  runner and precision, when there is one). When two peers disagree, a third
  node is asked and the majority decides (``node.jobs.judge``). A check never
  delays or changes the client's answer: the answer has left when it starts. It
  runs at LOW priority, under a fresh request id, at most ``max_in_flight`` at
  once and ``per_minute`` a minute; what does not fit is skipped, not queued.
- ``verify: N`` jobs (``verified``). The job runs on N+1 distinct nodes at once,
  failing over per run as routing does; the answer is the first that stands
  (the local node's, or the majority's; else simply the first), and its meta
  says how they compared: ``verify_verdict`` (agree, disagree, unsure, or
  unverified when fewer than two answered), ``verify_agreed``, ``verify_nodes``
  (who answered, first first), ``verify_against`` (struck or disputed) and
  ``verify_min_cosine``. A disagreement is reported, never hidden.

Either way the judgement goes into this node's ``Reputation``; held-back peers
leave plans (``RouterPlanner``'s ``held_back``), so they get neither jobs nor
checks until their hold ends. The table is saved to the data dir at most once
a second while it changes, and when the node stops.
"""

from __future__ import annotations

import logging
import math
import random
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import trio
from trio_typing import TaskStatus

from node.errors import NodeError
from protocols import ErrorCode, Priority, Request, Result, SwarmError, Tensor, Value
from protocols.config import Table
from protocols.errors import ConfigError
from runners.errors import ModelNotFound

from .compare import GENERATION, Side, Verdict, uncheckable
from .judge import Answer, Judgement, judge
from .reputation import Outcome, Reputation, ReputationFile, ReputationPolicy

log = logging.getLogger(__name__)

Emit = Callable[[Mapping[str, Value]], Awaitable[None]]
RunLocal = Callable[[Emit], Awaitable[Result]]
SAVE_EVERY_S = 1.0


class BadVerify(NodeError):
    """``verify`` asked of a job whose answers cannot be compared."""

    code = ErrorCode.BAD_REQUEST


@dataclass(frozen=True, slots=True)
class VerifyConfig:
    rate: float = 0.05  # share of the jobs routed to a peer that are checked
    max_in_flight: int = 2  # checks running at once
    per_minute: int = 120  # checks started per minute, at most
    timeout_s: float = 30.0  # a check's whole budget (a tie-break included)
    max_input_bytes: int = 1 << 20  # larger jobs are not kept for a check
    policy: ReputationPolicy = field(default_factory=ReputationPolicy)
    seed: int | None = None  # the check draws' rng; tests and benchmarks replay theirs

    def __post_init__(self) -> None:
        if not 0.0 <= self.rate <= 1.0:
            raise ConfigError("verify rate must be from 0 to 1")
        for name in ("max_in_flight", "per_minute", "max_input_bytes"):
            value = getattr(self, name)
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
                raise ConfigError(f"verify {name} must be an integer >= 1")
        if not (math.isfinite(self.timeout_s) and self.timeout_s > 0):
            raise ConfigError("verify timeout_s must be a positive number")

    @classmethod
    def from_table(cls, table: Table) -> VerifyConfig:
        """``[verify]`` in config.toml; every key optional, bad ones named (ConfigError)."""
        base = cls()
        config = cls(
            rate=table.number("rate", base.rate, low=0.0, high=1.0),
            max_in_flight=table.integer("max_in_flight", base.max_in_flight, low=1, high=1024),
            per_minute=table.integer("per_minute", base.per_minute, low=1, high=1_000_000),
            timeout_s=table.number("timeout_s", base.timeout_s, low=0.01, high=86400.0),
            max_input_bytes=table.integer(
                "max_input_bytes", base.max_input_bytes, low=1, high=1 << 32
            ),
            policy=ReputationPolicy.read(table),
        )
        table.done()
        return config


@dataclass(frozen=True, slots=True)
class Choice:
    """Where one run goes (``node.jobs.dispatch.Choice`` has this shape)."""

    peer_id: str
    local: bool = False


class Nodes(Protocol):
    """What the verifier reads of the swarm: how a node announces a model."""

    def entry(self, node: str, model: str) -> Mapping[str, Any] | None: ...

    def serves_here(self, model: str) -> bool: ...


Plan = Callable[[Request, frozenset[str], bool], list[Any]]  # Choice-shaped objects, best first
Attempt = Callable[[Any, Request, RunLocal | None], Awaitable[Result]]


@dataclass
class VerifyStats:
    routed: int = 0  # jobs routed to a peer and offered for a check
    checks: int = 0  # spot checks judged
    verified: int = 0  # verify: N jobs judged
    verdicts: Counter[str] = field(default_factory=Counter)  # agree / disagree / unsure
    skipped: Counter[str] = field(default_factory=Counter)  # why a drawn job was not checked

    def describe(self) -> dict[str, Any]:
        return {
            "routed": self.routed,
            "checks": self.checks,
            "verified_jobs": self.verified,
            "verdicts": dict(self.verdicts),
            "skipped": dict(self.skipped),
        }


class Verifier:
    """Spot checks and ``verify: N`` jobs, and the reputation they feed (see the module)."""

    def __init__(
        self,
        config: VerifyConfig,
        self_id: str,
        reputation: Reputation,
        nodes: Nodes,
        *,
        plan: Plan,
        attempt: Attempt,
        run_here: Callable[[Request], Awaitable[Result]],
        rng: random.Random,
        store: ReputationFile | None = None,
        max_attempts: int = 3,
    ) -> None:
        self.config = config
        self.self_id = self_id
        self.reputation = reputation
        self.stats = VerifyStats()
        self._nodes = nodes
        self._plan = plan
        self._attempt = attempt
        self._run_here = run_here
        self._rng = rng
        self._store = store
        self._max_attempts = max_attempts
        self._running = 0
        self._tokens = float(config.per_minute)
        self._refilled: float | None = None
        self._nursery: trio.Nursery | None = None

    def describe(self) -> dict[str, Any]:
        """Plain data for ``swarm status``: settings, counts, every peer checked."""
        return {
            "rate": self.config.rate,
            "in_flight": self._running,
            **self.stats.describe(),
            "peers": self.reputation.describe(),
        }

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Hold the checks' nursery and keep the table saved; a last save on the way out."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await self._keep_saved()
        finally:
            self._nursery = None
            with trio.CancelScope(shield=True):
                await self._save()

    # -- spot checks ------------------------------------------------------------------

    def offer(self, request: Request, result: Result, peer_id: str) -> None:
        """A job ``peer_id`` answered for this node: maybe check it. Never blocks."""
        self.stats.routed += 1
        if self._nursery is None or not self._rng.random() < self.config.rate:
            return
        entry = self._nodes.entry(peer_id, request.model)
        side = Side.of(entry)
        task = _task(entry)
        why = uncheckable(task, request, side)
        if why is not None:
            self.stats.skipped["uncheckable"] += 1
            log.debug("job %s not checked: %s", request.id, why)
            return
        if _size(request.inputs) > self.config.max_input_bytes:
            self.stats.skipped["too_large"] += 1
            return
        if self._running >= self.config.max_in_flight or not self._take_token():
            self.stats.skipped["busy"] += 1
            return
        self._running += 1
        first = Answer(peer_id, False, side, result.outputs)
        self._nursery.start_soon(self._check, request, first, task)

    def _take_token(self) -> bool:
        now = trio.current_time()
        if self._refilled is not None:
            earned = (now - self._refilled) * self.config.per_minute / 60.0
            self._tokens = min(float(self.config.per_minute), self._tokens + earned)
        self._refilled = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True

    async def _check(self, request: Request, first: Answer, task: str | None) -> None:
        job = replace(
            request,
            id=f"check-{uuid.uuid4().hex}",  # the second node cannot tie it to the first job
            priority=Priority.LOW,
            deadline_ms=max(1, int(self.config.timeout_s * 1000)),
            strategy=None,
            verify=0,
            origin=None,  # this node's own job: the check costs its share, not the client's
        )
        try:
            with trio.move_on_after(self.config.timeout_s):
                self._judged(request, first, await self._second_opinion(job, first, task))
                return
            self.stats.skipped["timeout"] += 1
        except Exception:  # a check must never take the node down with it
            log.exception("spot check of %s's answer to %s failed", first.node, request.id)
            self.stats.skipped["error"] += 1
        finally:
            self._running -= 1

    def _judged(self, request: Request, first: Answer, judged: Judgement | None) -> None:
        if judged is None:
            self.stats.skipped["no_second_node"] += 1
            return
        self.stats.checks += 1
        self._apply(judged)
        log.log(
            logging.WARNING if judged.verdict is Verdict.DISAGREE else logging.DEBUG,
            "spot check of %s's answer to %s: %s (%s)",
            first.node,
            request.id,
            judged.verdict,
            judged.why,
        )

    async def _second_opinion(
        self, job: Request, first: Answer, task: str | None
    ) -> Judgement | None:
        """Judge ``first`` against a second node, and a third when two peers differ."""
        tried = {first.node}
        second = await self._answer_elsewhere(job, tried, first.side, task)
        if second is None:
            return None
        judged = judge(task, [first, second])
        if judged.verdict is not Verdict.DISAGREE or second.local:
            return judged
        third = await self._answer_elsewhere(job, tried, first.side, task)
        return judged if third is None else judge(task, [first, second, third])

    async def _answer_elsewhere(
        self, job: Request, tried: set[str], side: Side, task: str | None
    ) -> Answer | None:
        """An answer from a node not in ``tried`` (added to it): this node when it serves
        the model, else peers in plan order, one failed run after another."""
        for _ in range(self._max_attempts):
            here = self.self_id not in tried and self._nodes.serves_here(job.model)
            choice = Choice(self.self_id, True) if here else self._pick(job, tried, side, task)
            if choice is None:
                return None
            tried.add(choice.peer_id)
            try:
                if choice.local:
                    result = await self._run_here(job)
                else:
                    result = await self._attempt(choice, job, None)
            except SwarmError as exc:
                log.debug("a check's run at %s failed: %s", choice.peer_id, exc)
                continue
            return self._answer(choice, job.model, result)
        return None

    def _plan_direct(self, job: Request, exclude: frozenset[str], local: bool) -> list[Any]:
        """The plan's nodes that run the job themselves (no intermediary passing it on:
        its answer would be another's, maybe one already asked)."""
        return [c for c in self._plan(job, exclude, local) if not getattr(c, "via", False)]

    def _pick(self, job: Request, tried: set[str], side: Side, task: str | None) -> Any:
        choices = self._plan_direct(job, frozenset(tried | {self.self_id}), False)
        if task == GENERATION:  # greedy text is compared strictly only at one precision
            alike = [c for c in choices if Side.of(self._nodes.entry(c.peer_id, job.model)) == side]
            choices = alike or choices
        return choices[0] if choices else None

    # -- verify: N --------------------------------------------------------------------

    async def verified(self, request: Request, local: RunLocal | None) -> Result:
        """Run ``request`` on ``request.verify`` + 1 distinct nodes and answer with how
        they compared (see the module docstring). Raises BadVerify for a job whose
        answers cannot be compared, the first run's error when no run answered, and
        ModelNotFound when no node serves the model."""
        job = replace(request, verify=0)  # the copies run once each
        first = self._plan_direct(job, frozenset(), local is not None)
        if not first:
            raise ModelNotFound(f"no peer in the swarm is known to serve {request.model!r}")
        entry = self._nodes.entry(first[0].peer_id, request.model)
        why = uncheckable(_task(entry), job, Side.of(entry))
        if why is not None:
            raise BadVerify(f"verify cannot compare this job's answers: {why}")
        used: set[str] = set()
        done: list[tuple[Answer, Result]] = []
        failures: list[SwarmError] = []
        attempts = 0

        def pick() -> Any:
            plan = self._plan_direct(job, frozenset(used), local is not None)
            if plan:
                used.add(plan[0].peer_id)
            return plan[0] if plan else None

        async def one_run(choice: Any) -> None:
            nonlocal attempts
            for _ in range(self._max_attempts):
                attempts += 1
                try:
                    result = await self._attempt(choice, job, local if choice.local else None)
                except SwarmError as exc:
                    failures.append(exc)
                    if exc.code in (ErrorCode.BAD_REQUEST, ErrorCode.DEADLINE_EXCEEDED):
                        return
                    if (choice := pick()) is None:
                        return
                    continue
                done.append((self._answer(choice, job.model, result), result))
                return

        # The first run goes where routing said; the others to the next best, each
        # node once: chosen here, before any runs (tasks start in no fixed order).
        used.add(first[0].peer_id)
        choices = [first[0], *(c for c in (pick() for _ in range(request.verify)) if c)]
        async with trio.open_nursery() as nursery:
            for choice in choices:
                nursery.start_soon(one_run, choice)
        if not done:
            if failures:
                raise failures[0]
            raise ModelNotFound(f"no node could run {request.model!r}")
        return self._verified_answer(request, done, attempts)

    def _verified_answer(
        self, request: Request, done: list[tuple[Answer, Result]], attempts: int
    ) -> Result:
        answers = [a for a, _ in done]
        meta: dict[str, Any] = {"verify": request.verify, "verify_ran": len(answers)}
        chosen = done[0]
        if len(answers) < 2:
            meta |= {"verify_verdict": "unverified", "verify_agreed": False}
        else:
            task = _task(self._nodes.entry(answers[0].node, request.model))
            judged = judge(task, answers)
            self.stats.verified += 1
            self._apply(judged)
            if judged.standing:
                chosen = next(d for d in done if d[0].node in judged.standing)
            meta |= {
                "verify_verdict": str(judged.verdict),
                "verify_agreed": judged.verdict is Verdict.AGREE,
                "verify_against": ",".join(judged.against),
            }
            if judged.cosine is not None:
                meta["verify_min_cosine"] = round(judged.cosine, 6)
            if judged.verdict is not Verdict.AGREE:
                log.warning("verify of %s: %s (%s)", request.id, judged.verdict, judged.why)
        meta["verify_nodes"] = ",".join(a.node for a in answers)
        answer, result = chosen
        out: dict[str, Any] = {**result.meta, **meta, "attempts": attempts}
        if not answer.local:
            out["forwarded_by"] = self.self_id
        return replace(result, id=request.id, meta=out)

    # -- shared ---------------------------------------------------------------------

    def _answer(self, choice: Any, model: str, result: Result) -> Answer:
        side = Side.of(self._nodes.entry(choice.peer_id, model))
        return Answer(choice.peer_id, bool(choice.local), side, result.outputs)

    def _apply(self, judged: Judgement) -> None:
        self.stats.verdicts[str(judged.verdict)] += 1
        for peer, outcome in judged.outcomes.items():
            if peer == self.self_id:
                continue
            if self.reputation.record(peer, outcome) and outcome is Outcome.STRUCK:
                log.warning("peer %s is held back from routing: %s", peer, judged.why)

    async def _keep_saved(self) -> None:
        saved = self.reputation.changes
        while True:
            await trio.sleep(SAVE_EVERY_S)
            if self.reputation.changes != saved:
                saved = self.reputation.changes
                await self._save()

    async def _save(self) -> None:
        if self._store is None:
            return
        rows = self.reputation.rows()
        try:
            await trio.to_thread.run_sync(self._store.save, rows)
        except OSError as exc:
            log.warning("could not save %s: %s", self._store.path, exc)


def _task(entry: Mapping[str, Any] | None) -> str | None:
    task = (entry or {}).get("task")
    return task if isinstance(task, str) else None


def _size(inputs: Mapping[str, Value]) -> int:
    total = 0
    for value in inputs.values():
        if isinstance(value, Tensor):
            total += value.nbytes
        elif isinstance(value, str):
            total += len(value)
        elif isinstance(value, list):
            total += sum(len(s) for s in value)
        else:
            total += 8
    return total
