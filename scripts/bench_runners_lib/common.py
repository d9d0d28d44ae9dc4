"""What the bench_runners sections share: run budgets, timing loops, the machine."""

from __future__ import annotations

import os
import platform
import random
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from bench_report import cpu_model

from runners.base import Runner

Figures = dict[str, Any]
Targets = list[tuple[str, str, str, bool]]  # (figure, measured, target, met)
SENTENCE = (
    "the swarm node answers requests from peers over libp2p and runs models on its own "
    "cores while a scheduler decides which peer serves each request by load latency and "
    "capability records signed by every member of the network"
)
WORDS = tuple(SENTENCE.split())


@dataclass(frozen=True, slots=True)
class Budget:
    seconds: float  # per measured case
    min_calls: int
    pairs: int  # interleaved pairs in the forwarding section
    gen_runs: int
    gen_tokens: int


FULL = Budget(seconds=2.5, min_calls=5, pairs=300, gen_runs=5, gen_tokens=64)
QUICK = Budget(seconds=0.5, min_calls=3, pairs=60, gen_runs=2, gen_tokens=24)


def ms(seconds: float) -> float:
    return seconds * 1000.0


def pct(times: list[float], q: float) -> float:
    ordered = sorted(times)
    return ordered[int(q * (len(ordered) - 1))]


def texts(n: int, seed: int = 0) -> list[str]:
    """``n`` deterministic sentences of 8 to 24 words."""
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(8, 24))) + "." for _ in range(n)]


async def alternated(
    calls: dict[str, Callable[[], Awaitable[Any]]], budget: Budget
) -> dict[str, list[float]]:
    """Seconds per call of each of ``calls``, measured in alternating blocks of about
    ``budget.seconds / 4``, so a change in the machine's load hits every one alike.
    Two warm-up calls each; then blocks until each has its seconds and minimum calls."""
    for call in calls.values():
        for _ in range(2):
            await call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    block = budget.seconds / 4
    while True:
        todo = [
            name
            for name, got in times.items()
            if sum(got) < budget.seconds or len(got) < budget.min_calls
        ]
        if not todo:
            return times
        for name in todo:
            start = time.perf_counter()
            while True:
                t = time.perf_counter()
                await calls[name]()
                times[name].append(time.perf_counter() - t)
                if time.perf_counter() - start >= block:
                    break


def machine() -> Figures:
    with open("/proc/meminfo") as f:
        mem_kb = int(next(line for line in f if line.startswith("MemTotal")).split()[1])
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "ram_gib": round(mem_kb / 2**20, 1),
        "python": platform.python_version(),
        "load_before": [round(x, 2) for x in os.getloadavg()],
    }


def met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def med_ms(times: list[float]) -> float:
    return ms(statistics.median(times))


async def interleaved(
    a: Callable[[], Awaitable[Any]], b: Callable[[], Awaitable[Any]], pairs: int
) -> tuple[list[float], list[float]]:
    """Times of ``a`` and ``b`` called in turn, so load changes hit both alike."""
    for _ in range(10):
        await a()
        await b()
    ta: list[float] = []
    tb: list[float] = []
    for _ in range(pairs):
        for call, times in ((a, ta), (b, tb)):
            t = time.perf_counter()
            await call()
            times.append(time.perf_counter() - t)
    return ta, tb


@asynccontextmanager
async def loaded(runner: Runner) -> AsyncIterator[Runner]:
    await runner.load()
    try:
        yield runner
    finally:
        await runner.close()
