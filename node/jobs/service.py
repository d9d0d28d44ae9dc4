"""Where a request runs: on a local runner, or forwarded to a peer that serves it.

This is the one place that turns a Request into a Result, whatever carried it
(a libp2p stream today; the HTTP gateway later). It owns admission per model,
the request's deadline, and shutdown: while draining, new work is refused with
NOT_EXECUTED, and work cut off by shutdown is told NOT_EXECUTED if it had not
started or OUTCOME_UNKNOWN if it had.

Every job is held against the client that sent it (``execute``'s ``client``:
the stream's authenticated peer id, or ``GATEWAY`` for the node's own HTTP
clients) in the fair-share ledger (``fairness``): its limits are checked as it
arrives, it waits in the gates within its peer's share, and what became of it
is counted for status.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import trio

from capabilities.record import Load
from node.errors import DeadlineExceeded, Interrupted, OverBudget, Overloaded, ShuttingDown
from node.observe import logs
from protocols import MAX_HOPS, Priority, Request, Result, SwarmError, Value
from runners.base import Runner, opened_stream
from runners.errors import ModelNotFound

from .admission import PriorityGate
from .fair_queue import EVERYONE, Who
from .fairness import GATEWAY, FairnessConfig, Ledger, Ticket, who_for

log = logging.getLogger(__name__)

Emit = Callable[[Mapping[str, Value]], Awaitable[None]]


class RunHere(Protocol):
    """Runs a job on this node, its chunks to ``emit``: the job given, or the one it
    was made for (a resumed stream's continuation is another job)."""

    def __call__(self, emit: Emit, request: Request | None = None, /) -> Awaitable[Result]: ...


class Forwarder(Protocol):
    """Chooses where a request runs (``local`` runs it here) and fails over."""

    async def forward(
        self, request: Request, emit: Emit, local: RunHere | None = None
    ) -> Result: ...

    def serves(self, model: str) -> bool: ...


@dataclass(eq=False)
class _Active:
    who: Who = EVERYONE  # whose it is: the share it waits in
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    started: bool = False


@dataclass
class Stats:
    """Counters for status and capability records."""

    served: int = 0
    failed: int = 0
    forwarded: int = 0
    ewma_ms: float = 0.0

    def observe(self, ms: float) -> None:
        self.ewma_ms = ms if self.served == 0 else self.ewma_ms + 0.2 * (ms - self.ewma_ms)
        self.served += 1

    def describe(self) -> dict[str, int]:
        return {"served": self.served, "failed": self.failed, "forwarded": self.forwarded}


class InferenceService:
    def __init__(
        self,
        runners: Mapping[str, Runner],
        *,
        node_id: str,
        max_queue: int,
        forwarder: Forwarder | None = None,
        fairness: FairnessConfig | None = None,
        own_clients: Collection[str] = (),
    ) -> None:
        """``own_clients``: peer ids that are this node's own (the CLI's client id),
        weighed as such beside ``GATEWAY``."""
        self.node_id = node_id
        self.ledger = Ledger(fairness or FairnessConfig(), own=(GATEWAY, *own_clients))
        self.runners = {name.lower(): r for name, r in runners.items()}
        self.gates = {name: self._gate(r, max_queue) for name, r in self.runners.items()}
        self.forwarder = forwarder
        # Told of every finished request (metrics): request, outcome ("ok" or an error
        # code), seconds taken, and the node that ran it when it ran.
        self.observer: Callable[[Request, str, float, str | None], None] | None = None
        # Told of every request as it is accepted (the live feed's job events).
        self.on_start: Callable[[Request], None] | None = None
        self.draining = False
        self.stats = Stats()
        self._active: set[_Active] = set()
        self._drained: trio.Event | None = None  # exists only while drain() waits

    def _gate(self, runner: Runner, max_queue: int) -> PriorityGate:
        return PriorityGate(
            concurrency=runner.concurrency,
            max_waiting=max_queue,
            weight_of=self.ledger.weight,
            queued_limit=self.ledger.queued_limit,
            fair=self.ledger.config.enabled,
        )

    def add_runner(self, runner: Runner, max_queue: int) -> None:
        """Serve one more model (loaded already)."""
        name = runner.info.name.lower()
        self.gates[name] = self._gate(runner, max_queue)
        self.runners[name] = runner

    async def remove_runner(self, name: str, grace_s: float) -> Runner | None:
        """Stop serving ``name``: new requests no longer find it (they go to peers);
        those already admitted finish, waited for up to ``grace_s``. The runner is
        returned for its owner to close."""
        key = name.lower()
        runner = self.runners.pop(key, None)
        gate = self.gates.pop(key, None)
        if gate is not None:
            with trio.move_on_after(grace_s):
                while gate.running or gate.waiting:  # noqa: ASYNC110 (no event to wait on)
                    await trio.sleep(0.05)
        return runner

    @property
    def in_flight(self) -> int:
        return len(self._active)

    def load(self) -> Load:
        """Queue depth per priority, in flight and latency, for status and records."""
        depth = {p.name.lower(): 0 for p in Priority}
        for gate in self.gates.values():
            for prio, n in gate.depth().items():
                depth[prio] += n
        ewma = round(self.stats.ewma_ms, 3) if self.stats.served else None
        return Load(queue_depth=depth, in_flight=self.in_flight, ewma_latency_ms=ewma)

    async def execute(self, request: Request, emit: Emit, *, client: str = GATEWAY) -> Result:
        """Run or forward ``request`` of ``client``; chunks go to ``emit`` when it streams.

        ``client`` is whom the job is held against (see the module docstring).
        Raises a SwarmError subclass (its ``code`` is what the caller is told).
        """
        if self.draining:
            raise ShuttingDown("the node is shutting down and takes no new work")
        who = who_for(client, request)
        # Forwarded on, the job names whose it is, inside this node's own share.
        request = replace(request, origin=who.origin)
        started = trio.current_time()
        logs.request_id.set(request.id)  # each request runs in a task of its own
        try:
            ticket = self.ledger.arrive(who, request.priority, started, self._retry_ms(request))
        except OverBudget as exc:
            self.stats.failed += 1
            self._observe(request, str(exc.code), started, None)
            raise
        if ticket.priority is not request.priority:
            request = replace(request, priority=ticket.priority)  # over its HIGH budget
        job = _Active(ticket.who)
        self._active.add(job)
        if self.on_start is not None:
            self.on_start(request)
        try:
            with job.scope:
                result = await self._within_deadline(request, emit, job)
                self._observe(request, "ok", started, result.meta.get("served_by"))
                self._depart(ticket, "ok")
                return result
            if job.started:
                raise Interrupted("the node shut down while running the request")
            raise ShuttingDown("the node shut down before running the request")
        except BaseException as exc:
            self.stats.failed += 1
            outcome = str(exc.code) if isinstance(exc, SwarmError) else "CANCELLED"
            self._observe(request, outcome, started, None)
            refused = isinstance(exc, Overloaded)  # this node's own refusal, not a peer's
            self._depart(ticket, "refused" if refused else outcome, getattr(exc, "reason", None))
            raise
        finally:
            self._active.discard(job)
            if not self._active and self._drained is not None:
                self._drained.set()

    def _depart(self, ticket: Ticket, outcome: str, over: str | None = None) -> None:
        self.ledger.depart(ticket, outcome, trio.current_time(), over)

    def _retry_ms(self, request: Request) -> int:
        """When to try again after a refusal for a full in-flight budget."""
        gate = self.gates.get(request.model.lower())
        if gate is not None:
            return gate.retry_after_ms()
        return max(1, int(self.stats.ewma_ms or 50))

    def shares(self) -> dict[str, object]:
        """The fair-share ledger for status: the top peers and the rest (plain data)."""
        queued: dict[str, int] = {}
        running: dict[str, int] = {}
        for gate in self.gates.values():
            for holder, n in gate.queued_by().items():
                queued[holder] = queued.get(holder, 0) + n
            for holder, n in gate.running_by.items():
                running[holder] = running.get(holder, 0) + n
        described: dict[str, object] = self.ledger.describe(trio.current_time(), queued, running)
        return described

    def _observe(self, request: Request, outcome: str, started: float, by: Any) -> None:
        took = trio.current_time() - started
        served_by = by if isinstance(by, str) else None
        log.debug("%s %s in %.1f ms, ran on %s", request.model, outcome, 1000 * took, served_by)
        if self.observer is not None:
            self.observer(request, outcome, took, served_by)

    async def drain(self, grace_s: float) -> None:
        """Refuse new work; let work in flight finish for ``grace_s``, then cut it off."""
        self.draining = True
        if self._active:
            self._drained = trio.Event()
            with trio.move_on_after(grace_s):
                await self._drained.wait()
        for job in list(self._active):
            job.scope.cancel()

    async def _within_deadline(self, request: Request, emit: Emit, job: _Active) -> Result:
        if request.deadline_ms is None:
            return await self._route(request, emit, job)
        with trio.move_on_after(request.deadline_ms / 1000):
            return await self._route(request, emit, job)
        raise DeadlineExceeded(f"deadline of {request.deadline_ms} ms passed")

    async def _route(self, request: Request, emit: Emit, job: _Active) -> Result:
        """A client's request is routed here (this node or a peer, with failover);
        a request a peer routed to us runs here if we serve its model."""
        name = request.model.lower()
        runner = self.runners.get(name)
        forwarder = self.forwarder
        if runner is not None and (forwarder is None or request.hops > 0):
            return await self._run_local(name, runner, request, emit, job)
        if (
            forwarder is not None
            and request.hops < MAX_HOPS
            and (runner is not None or forwarder.serves(name))
        ):
            local: RunHere | None = None
            if runner is not None:

                async def run_here(to: Emit, other: Request | None = None) -> Result:
                    assert runner is not None
                    return await self._run_local(name, runner, other or request, to, job)

                local = run_here
            result = await forwarder.forward(request, emit, local)
            if result.meta.get("served_by") != self.node_id:
                self.stats.forwarded += 1
            return result
        raise ModelNotFound(
            f"no peer known to this node serves {request.model!r}; "
            f"this node serves {sorted(self.runners) or 'no models'}"
        )

    async def _run_local(
        self, name: str, runner: Runner, request: Request, emit: Emit, job: _Active
    ) -> Result:
        runner.check(request.inputs, request.params)  # refuse bad input before queueing
        queued_at = trio.current_time()
        async with self.gates[name].slot(request.priority, job.who):
            job.started = True
            started_at = trio.current_time()
            outputs: Mapping[str, Value]
            if request.stream:
                chunks = 0
                async with opened_stream(runner, request.inputs, request.params) as stream:
                    async for chunk in stream:
                        await emit(chunk)
                        chunks += 1
                outputs = {}
            else:
                outputs = await runner.infer(request.inputs, request.params)
            done_at = trio.current_time()
        run_ms = 1000 * (done_at - started_at)
        self.stats.observe(run_ms)
        meta: dict[str, str | int | float | bool | None] = {
            "served_by": self.node_id,
            "model": runner.info.name,
            "runner": runner.info.runner,
            "device": runner.info.device,
            "queue_ms": round(1000 * (started_at - queued_at), 3),
            "run_ms": round(run_ms, 3),
        }
        if request.stream:
            meta["chunks"] = chunks
        return Result(id=request.id, outputs=dict(outputs), meta=meta)
