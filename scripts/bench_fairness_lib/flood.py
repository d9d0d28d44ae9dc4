"""Peer G floods a node while peer P sends one job now and then: what P gets.

G and P are two libp2p identities (``SwarmClient.connect(..., key_pair=...)``),
so the node tells them apart by their authenticated peer ids. G keeps
``g_in_flight`` jobs in flight: each of its callers sends a job, and when one
is answered sends the next at once; a refusal (OVERLOADED) is honoured for its
retry-after (a greedy client, not a broken one), jittered by the seeded rng so
that refused callers do not come back in lockstep. Once G has had ``warmup_s``
to fill the node's queue, P sends ``p_jobs`` jobs, one every ``p_every_s``,
each in a task of its own (a slow answer does not delay the next send), timing
each from send to answer. Then G stops sending and its last jobs finish, so the
node's count of jobs served can be set beside what the callers got.

Every wait is bounded; nothing here knows whether the node is a process or a
``Node`` in this one.
"""

from __future__ import annotations

import math
import random
import statistics
from dataclasses import dataclass, field
from typing import Any

import trio

from node.client import SwarmClient
from protocols import ErrorCode, RemoteError

MAX_RETRY_S = 2.0


@dataclass
class Caller:
    """What one identity's jobs came to."""

    ok: int = 0
    refused: int = 0  # OVERLOADED
    failed: dict[str, int] = field(default_factory=dict)  # other error codes
    latencies_s: list[float] = field(default_factory=list)  # of the jobs answered

    def failure(self, code: str) -> None:
        self.failed[code] = self.failed.get(code, 0) + 1


@dataclass
class Flood:
    g: Caller
    p: Caller
    p_sent: int
    window_s: float  # from P's first send to its last answer
    served_in_window: int  # by the node, in that window (from its own count)
    served_total: int  # by the node over the whole run, once quiet
    service_s: float

    @property
    def capacity_use(self) -> float:
        """Jobs served in P's window over what one slot of ``service_s`` could serve."""
        return self.served_in_window * self.service_s / self.window_s if self.window_s else 0.0

    def p_quantile(self, q: float) -> float:
        """P's latency at quantile ``q`` (nearest rank), in seconds; inf if none answered."""
        got = sorted(self.p.latencies_s)
        if not got:
            return math.inf
        return got[min(len(got) - 1, max(0, math.ceil(q * len(got)) - 1))]

    def describe(self) -> dict[str, Any]:
        p = self.p.latencies_s
        return {
            "p_sent": self.p_sent,
            "p_answered": self.p.ok,
            "p_refused": self.p.refused,
            "p_failed": self.p.failed,
            "p_median_ms": round(1000 * statistics.median(p), 2) if p else None,
            "p_p95_ms": round(1000 * self.p_quantile(0.95), 2) if p else None,
            "p_max_ms": round(1000 * max(p), 2) if p else None,
            "g_answered": self.g.ok,
            "g_refused": self.g.refused,
            "g_failed": self.g.failed,
            "window_s": round(self.window_s, 3),
            "served_in_window": self.served_in_window,
            "capacity_use": round(self.capacity_use, 3),
            "served_total": self.served_total,
            "callers_got": self.g.ok + self.p.ok,
        }


async def served(client: SwarmClient) -> int:
    """The node's own count of jobs it ran and answered (its status)."""
    body = (await client.record()).body
    return int(body["view"]["stats"]["served"])


async def flood(
    address: str,
    model: str,
    *,
    g_key: Any,
    p_key: Any,
    rng: random.Random,
    service_s: float,
    g_in_flight: int = 96,
    p_jobs: int = 30,
    p_every_s: float = 0.2,
    warmup_s: float = 1.0,
    bound_s: float = 60.0,
) -> Flood:
    """Run the measurement against the node at ``address`` serving ``model``."""
    g, p = Caller(), Caller()
    stop = trio.Event()
    inputs = {"text": "x"}

    async def g_caller(client: SwarmClient) -> None:
        while not stop.is_set():
            try:
                await client.infer(model, inputs)
                g.ok += 1
                continue
            except RemoteError as exc:
                if exc.code is ErrorCode.OVERLOADED:
                    g.refused += 1
                    wait = (exc.retry_after_ms or 50) / 1000
                else:
                    g.failure(str(exc.code))
                    wait = 0.05
            with trio.move_on_after(min(MAX_RETRY_S, wait) * rng.uniform(0.8, 1.2)):
                await stop.wait()

    async def p_job(client: SwarmClient, done: trio.MemorySendChannel[float]) -> None:
        async with done:
            sent = trio.current_time()
            try:
                await client.infer(model, inputs)
                p.ok += 1
                p.latencies_s.append(trio.current_time() - sent)
            except RemoteError as exc:
                if exc.code is ErrorCode.OVERLOADED:
                    p.refused += 1
                else:
                    p.failure(str(exc.code))
            await done.send(trio.current_time())

    with trio.fail_after(bound_s):
        async with (
            SwarmClient.connect(address, key_pair=g_key) as g_client,
            SwarmClient.connect(address, key_pair=p_key) as p_client,
        ):
            before_all = await served(p_client)
            async with trio.open_nursery() as g_nursery:
                for _ in range(g_in_flight):
                    g_nursery.start_soon(g_caller, g_client)
                await trio.sleep(warmup_s)
                before = await served(p_client)
                start = trio.current_time()
                send, receive = trio.open_memory_channel[float](p_jobs)
                async with trio.open_nursery() as p_nursery, send:
                    for i in range(p_jobs):
                        p_nursery.start_soon(p_job, p_client, send.clone())
                        if i < p_jobs - 1:
                            await trio.sleep(p_every_s)
                ends = [t async for t in receive]
                end = max(ends, default=trio.current_time())
                during = await served(p_client) - before
                stop.set()  # G's callers finish the job they have and stop
            total = await served(p_client) - before_all
    return Flood(g, p, p_jobs, end - start, during, total, service_s)
