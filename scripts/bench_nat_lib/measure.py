"""What scripts/bench_nat.py measures on the NAT swarm (``nodes``), section by section.

Every job is submitted at A's local socket by this process (``LocalClient``, the
CLI's client, with no CLI process to start); A routes it to the one node that
serves its model. Four paths, one model each, so a job's model says its path:

- ``local``: A's own model (no network: what the socket and A's service cost);
- ``direct``: R's model, over A's direct connection to R;
- ``hole-punched``: B's, over the connection DCUtR made between homes 1 and 2;
- ``relayed``: C's, through R's relay (C's router randomises ports, so the
  punch fails and the circuit stays).

Each path's kind is read from A's status (``view.reach.connections``) before and
after each section, and each answer's ``served_by`` must be that path's node and
carry no ``via`` (not forwarded by a third node). Every answer is counted per
server in ``Ledger``; at the end each server's own ``stats.served`` is compared
with it.
"""

from __future__ import annotations

import os
import random
import statistics
from collections import Counter
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import trio

from node.cli.local_client import LocalClient
from protocols import Result, SwarmError
from runners.fake import WORDS

from .nodes import Daemon, NatSwarm

PATHS = ("local", "direct", "hole-punched", "relayed")
JOB_DEADLINE_S = 10.0
FIRST_DEADLINE_S = 10.0  # one try of the first job (a try refused at once is retried)
FIRST_BOUND_S = 60.0  # the last start -> the first job answered, at most
# A-B hole-punched, at most, after the first job. py-libp2p's DCUtR drives punches
# one peer at a time (``_auto_drive_loop`` awaits each): B's three failing tries to C
# (7 to 17 s each) can come first, so A-B's may start only ~35 s in.
PUNCH_BOUND_S = 90.0
QUICK_PUNCH_BOUND_S = 45.0  # --quick: the rows then say when the punch came too late
PACE_S = 0.02  # between the jobs sent while waiting for the punch
RELAYED_BOUND_S = 30.0  # A-C connected (relayed), at most
KIND_EVERY_S = 0.3  # A's status asked this often while waiting
STREAM_CHUNKS = 64
TENSOR_SHAPE = (64, 65536)  # float32: 16 MiB
MIB = 1024 * 1024
BIG_DEADLINE_S = 120.0
FAKE_DIM = 8  # the fake runner's embedding width


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))]


def spread(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"n": 0}
    return {
        "n": len(values),
        "median": statistics.median(values),
        "p90": percentile(values, 0.9),
        "p99": percentile(values, 0.99),
        "min": min(values),
        "max": max(values),
    }


@dataclass(frozen=True)
class Target:
    path: str
    node: Daemon

    @property
    def model(self) -> str:
        return self.node.model


EXPECTED_KINDS = {"r": "direct", "b": "hole-punched", "c": "relayed"}  # A's to each


def unexpected(kinds: dict[str, str | None]) -> dict[str, str | None]:
    """The nodes to which A's connection is not of its path's kind."""
    return {n: k for n, k in kinds.items() if EXPECTED_KINDS.get(n) != k}


def targets(swarm: NatSwarm) -> list[Target]:
    nodes = (swarm.a, swarm.r, swarm.b, swarm.c)
    return [Target(path, node) for path, node in zip(PATHS, nodes, strict=True)]


@dataclass
class Ledger:
    """What the callers got: answers per server peer id, failures per section."""

    answered: Counter[str] = field(default_factory=Counter)
    sent: Counter[str] = field(default_factory=Counter)  # per section
    failed: list[dict[str, str]] = field(default_factory=list)
    wrong: list[dict[str, str]] = field(default_factory=list)  # served elsewhere, or via

    def answer(
        self, section: str, target: Target | None, result: Result, *, via_ok: bool = False
    ) -> bool:
        """Count an answer; False (and noted) when ``target`` did not serve it, or it came
        through a forwarding peer (``via``) and ``via_ok`` is not set."""
        served_by = str(result.meta.get("served_by", ""))
        self.answered[served_by] += 1
        if target is None:
            return True
        via = result.meta.get("via")
        if served_by != target.node.peer_id or (via and not via_ok):
            self.wrong.append(
                {"section": section, "path": target.path, "served_by": served_by, "via": str(via)}
            )
            return False
        return True

    def fail(self, section: str, path: str, exc: BaseException) -> None:
        self.failed.append({"section": section, "path": path, "error": describe_error(exc)})


def describe_error(exc: BaseException) -> str:
    code = getattr(exc, "code", None)
    name = str(code) if code is not None else type(exc).__name__
    return f"{name}: {exc}"[:200]


async def kinds(swarm: NatSwarm) -> dict[str, str | None]:
    """A's connection kind to R, B and C now."""
    connections = (await swarm.a.reach())["connections"]
    return {d.name: connections.get(d.peer_id) for d in (swarm.r, swarm.b, swarm.c)}


async def relay_bytes(swarm: NatSwarm) -> int:
    return int((await swarm.r.reach())["relay_service"]["bytes_relayed"])


# -- 1. the first job across two NATs ----------------------------------------------------


async def first_job(swarm: NatSwarm, target: Target, last_start: float, ledger: Ledger) -> dict:
    """Try ``target``'s model at A until a try is answered: its time from the last
    node's start, the connection A had to the server then, the refusals before."""
    a = swarm.a
    tries, refusals = 0, Counter[str]()
    with trio.move_on_after(FIRST_BOUND_S):
        while True:
            if not a.socket.exists():
                await trio.sleep(0.05)
                continue
            tries += 1
            try:
                async with LocalClient.connect(a.socket) as client:
                    result = await client.infer(
                        target.model, {"text": "first"}, deadline_s=FIRST_DEADLINE_S
                    )
            except (SwarmError, OSError, trio.TooSlowError) as exc:
                refusals[describe_error(exc).split(":")[0]] += 1
                await trio.sleep(0.1)
                continue
            at = trio.current_time()
            ledger.sent["first job"] += 1
            ledger.answer("first job", None, result)
            kind = await a.kind_of(target.node)
            return {
                "model": target.model,
                "server": target.node.name,
                "at": at,
                "from_last_start_s": at - last_start,
                "tries": tries,
                "refused_before": dict(refusals),
                "served_by": swarm.name_of(str(result.meta.get("served_by", ""))),
                "via": swarm.name_of(str(result.meta["via"])) if result.meta.get("via") else None,
                "kind_after": kind,
                "load": load(),
            }
    return {"model": target.model, "server": target.node.name, "from_last_start_s": None,
            "tries": tries, "refused_before": dict(refusals), "load": load()}  # fmt: skip


# -- 2. A-B relayed until DCUtR punches through -------------------------------------------


async def until_punched(
    swarm: NatSwarm, ledger: Ledger, since: float, bound_s: float = PUNCH_BOUND_S
) -> dict[str, Any]:
    """Jobs to B (PACE_S apart) while A watches its connection to B, until DCUtR makes it
    hole-punched: when that was (from ``since``, the last start), when the first job
    went to B itself rather than through a forwarding peer (``via``), and the round
    trips of the jobs that ran wholly while the connection was relayed, and of those
    a peer forwarded."""
    b = Target("relayed, before DCUtR", swarm.b)
    seen: list[tuple[float, str | None]] = []
    jobs: list[tuple[float, float, bool]] = []  # start, end, forwarded by a third node
    punched = trio.Event()  # or given up on: the jobs stop

    punches: list[tuple[float, dict[str, tuple[int, int]]]] = []

    async def watch() -> None:
        while True:
            with suppress(SwarmError, OSError, trio.TooSlowError):
                kind = await swarm.a.kind_of(swarm.b)
                seen.append((trio.current_time(), kind))
                counts = {}
                for d in (swarm.a, swarm.b, swarm.c):
                    hp = (await d.reach())["hole_punch"]
                    counts[d.name] = (int(hp["attempts"]), int(hp["successes"]))
                if not punches or punches[-1][1] != counts:
                    punches.append((trio.current_time(), counts))
                if kind == "hole-punched":
                    return
            await trio.sleep(KIND_EVERY_S)

    async def submit() -> None:
        async with LocalClient.connect(swarm.a.socket) as client:
            while not punched.is_set():
                ledger.sent["until punched"] += 1
                start = trio.current_time()
                try:
                    result = await client.infer(b.model, {"text": "x"}, deadline_s=JOB_DEADLINE_S)
                except (SwarmError, OSError, trio.TooSlowError) as exc:
                    ledger.fail("until punched", b.path, exc)
                    await trio.sleep(0.1)
                    continue
                if ledger.answer("until punched", b, result, via_ok=True):
                    jobs.append((start, trio.current_time(), bool(result.meta.get("via"))))
                await trio.sleep(PACE_S)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(submit)  # its last job ends (within its deadline) before we go on
        with trio.move_on_after(bound_s):
            await watch()
        punched.set()
    relayed: list[float] = []
    forwarded: list[float] = []
    for start, end, via in jobs:
        if via:
            forwarded.append(1000 * (end - start))
            continue
        before = [k for t, k in seen if t <= start]
        after = [k for t, k in seen if t >= end]
        if before and after and before[-1] == after[0] == "relayed":
            relayed.append(1000 * (end - start))
    at = next((t for t, k in seen if k == "hole-punched"), None)
    own = next((end for _, end, via in jobs if not via), None)
    return {
        "punched_after_last_start_s": None if at is None else at - since,
        "first_to_b_itself_after_last_start_s": None if own is None else own - since,
        # A's kind of connection to B, at each change (seconds from the last start).
        "kinds_seen": [
            (round(t - since, 2), k)
            for i, (t, k) in enumerate(seen)
            if i == 0 or seen[i - 1][1] != k
        ],
        # Each node's hole punches (tried, succeeded) at each change: a punch that
        # cannot work (to C) may hold up the others of the same node.
        "punch_counts": [(round(t - since, 2), counts) for t, counts in punches],
        "jobs": len(jobs),
        "relayed_ms": spread(relayed),
        "forwarded_ms": spread(forwarded),
        "load": load(),
    }


async def wait_connected(swarm: NatSwarm, other: Daemon, bound_s: float) -> str | None:
    """A's connection kind to ``other`` once it has one (None after ``bound_s``)."""
    with trio.move_on_after(bound_s):
        while True:
            if (kind := await swarm.a.kind_of(other)) is not None:
                return kind
            await trio.sleep(KIND_EVERY_S)
    return None


# -- 3. round trips on every path, interleaved ----------------------------------------------


async def round_trips(
    swarm: NatSwarm, ledger: Ledger, rounds: int, warm: int, seed: int = 1
) -> dict[str, Any]:
    """``warm + rounds`` rounds; each sends one small job on every path, in a new
    random order each round, one at a time on one client (its connection reused)."""
    times: dict[str, list[float]] = {p: [] for p in PATHS}
    rng = random.Random(seed)
    order = targets(swarm)
    kinds_before, load_before = await kinds(swarm), load()
    relay_before = await relay_bytes(swarm)
    async with LocalClient.connect(swarm.a.socket) as client:
        for i in range(warm + rounds):
            rng.shuffle(order)
            for t in order:
                ledger.sent["round trips"] += 1
                start = trio.current_time()
                try:
                    result = await client.infer(t.model, {"text": "x"}, deadline_s=JOB_DEADLINE_S)
                except (SwarmError, OSError, trio.TooSlowError) as exc:
                    ledger.fail("round trips", t.path, exc)
                    continue
                took = 1000 * (trio.current_time() - start)
                if ledger.answer("round trips", t, result) and i >= warm:
                    times[t.path].append(took)
    return {
        "rounds": rounds,
        "warm_up_rounds": warm,
        "ms": {p: spread(v) for p, v in times.items()},
        "kinds_before": kinds_before,
        "kinds_after": await kinds(swarm),
        "relay_bytes": await relay_bytes(swarm) - relay_before,
        "load_before": load_before,
        "load_after": load(),
    }


# -- 4. streamed generations on every path ------------------------------------------------


async def streams(swarm: NatSwarm, ledger: Ledger, reps: int, seed: int = 2) -> dict[str, Any]:
    """``reps`` streamed jobs of STREAM_CHUNKS chunks per path: whole (every chunk, in
    order, the words the fake makes) or not, and the time to the last chunk."""
    text = "tell me"
    want = "".join(WORDS[(len(text) + i) % len(WORDS)] + " " for i in range(STREAM_CHUNKS))
    rng = random.Random(seed)
    order = targets(swarm)
    out: dict[str, dict[str, Any]] = {p: {"whole": 0, "broken": 0, "ms": []} for p in PATHS}
    async with LocalClient.connect(swarm.a.socket) as client:
        for _ in range(reps):
            rng.shuffle(order)
            for t in order:
                got: list[Any] = []

                async def on_chunk(chunk: Any, got: list[Any] = got) -> None:
                    got.append(chunk)

                ledger.sent["streams"] += 1
                start = trio.current_time()
                try:
                    result = await client.infer(
                        t.model,
                        {"text": text},
                        params={"chunks": STREAM_CHUNKS},
                        deadline_s=JOB_DEADLINE_S,
                        on_chunk=on_chunk,
                    )
                except (SwarmError, OSError, trio.TooSlowError) as exc:
                    ledger.fail("streams", t.path, exc)
                    out[t.path]["broken"] += 1
                    continue
                took = 1000 * (trio.current_time() - start)
                whole = [c.seq for c in got] == list(range(STREAM_CHUNKS)) and "".join(
                    str(c.outputs["text"]) for c in got
                ) == want
                if ledger.answer("streams", t, result) and whole:
                    out[t.path]["whole"] += 1
                    out[t.path]["ms"].append(took)
                else:
                    out[t.path]["broken"] += 1
    for p in PATHS:
        out[p]["ms"] = spread(out[p]["ms"])
    return {"chunks": STREAM_CHUNKS, "reps": reps, "paths": out, "load": load()}


# -- 5. a 16 MiB tensor on every path ----------------------------------------------------


async def tensors(swarm: NatSwarm, ledger: Ledger, reps: int, seed: int = 3) -> dict[str, Any]:
    """``reps`` jobs per path with a 16 MiB float32 ``x`` (the fake answers 8 floats a
    row): seconds per job, MiB/s of input, the relay's bytes and CPU meanwhile."""
    x = np.random.default_rng(seed).standard_normal(TENSOR_SHAPE, dtype=np.float32)
    sums = x.sum(axis=1, dtype=np.float32) * np.float32(2)
    want = np.repeat(sums[:, None], FAKE_DIM, axis=1)
    mib = x.nbytes / MIB
    rng = random.Random(seed)
    order = targets(swarm)
    rows: dict[str, list[dict[str, float]]] = {p: [] for p in PATHS}
    kinds_before, load_before = await kinds(swarm), load()
    async with LocalClient.connect(swarm.a.socket) as client:
        for _ in range(reps):
            rng.shuffle(order)
            for t in order:
                ledger.sent["tensors"] += 1
                relayed, cpu = await relay_bytes(swarm), swarm.r.cpu_s()
                start = trio.current_time()
                try:
                    result = await client.infer(t.model, {"x": x}, deadline_s=BIG_DEADLINE_S)
                except (SwarmError, OSError, trio.TooSlowError) as exc:
                    ledger.fail("tensors", t.path, exc)
                    continue
                took = trio.current_time() - start
                cpu = swarm.r.cpu_s() - cpu
                relayed = await relay_bytes(swarm) - relayed
                got = result.outputs.get("embedding")
                right = got is not None and np.allclose(got.numpy(), want, rtol=1e-5)
                if not right:
                    ledger.fail("tensors", t.path, ValueError("wrong embedding"))
                if ledger.answer("tensors", t, result) and right:
                    rows[t.path].append(
                        {"s": took, "mib_s": mib / took, "relay_bytes": relayed, "r_cpu_s": cpu}
                    )
    out: dict[str, Any] = {}
    for p, got_rows in rows.items():
        out[p] = {
            "n": len(got_rows),
            "s": spread([r["s"] for r in got_rows]),
            "mib_s": statistics.median([r["mib_s"] for r in got_rows]) if got_rows else None,
            "relay_bytes": statistics.median([r["relay_bytes"] for r in got_rows])
            if got_rows
            else None,
            "r_cpu_s": statistics.median([r["r_cpu_s"] for r in got_rows]) if got_rows else None,
        }
    return {
        "mib": mib,
        "reps": reps,
        "paths": out,
        "kinds_before": kinds_before,
        "kinds_after": await kinds(swarm),
        "load_before": load_before,
        "load_after": load(),
    }


# -- 6. what the nodes report ------------------------------------------------------------


async def reports(swarm: NatSwarm) -> dict[str, Any]:
    """Each node's jobs run, hole punches, circuit dials, relays, connection kinds."""
    out: dict[str, Any] = {}
    for d in swarm.all:
        view = await d.view()
        reach = view["reach"]
        out[d.name] = {
            "peer_id": d.peer_id,
            "reach": reach["reach"],
            "stats": view["stats"],
            "hole_punch": reach["hole_punch"],
            "circuit_dials": reach["circuit_dials"],
            "circuit_dial_failures": reach["circuit_dial_failures"],
            "redials": reach["redials"],
            "relays_held": [swarm.name_of(h["relay"]) for h in reach["relays"]["held"]],
            "connections": {swarm.name_of(p): k for p, k in sorted(reach["connections"].items())},
            "relay_service": reach["relay_service"],
            "cpu_s": d.cpu_s(),
        }
    return out


def accounting(swarm: NatSwarm, ledger: Ledger, nodes: dict[str, Any]) -> dict[str, Any]:
    """The jobs each server ran (its own count) against the answers we got from it."""
    per_node = {
        d.name: {
            "ran": int(nodes[d.name]["stats"]["served"]),
            "answered": ledger.answered[d.peer_id],
        }
        for d in swarm.all
    }
    others = {
        swarm.name_of(p): n
        for p, n in ledger.answered.items()
        if p not in {d.peer_id for d in swarm.all}
    }
    sent = sum(ledger.sent.values())
    return {
        "sent": dict(ledger.sent),
        "sent_total": sent,
        "failed": ledger.failed,
        "wrong_path": ledger.wrong,
        "per_node": per_node,
        "answered_by_others": others,
        "none_lost": not ledger.failed
        and not ledger.wrong
        and not others
        and all(v["ran"] == v["answered"] for v in per_node.values()),
    }
