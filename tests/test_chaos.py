"""Real daemon processes dying under load: a stream cut off mid-way, and peers
SIGKILLed while jobs flow through the swarm.

What must hold whatever dies: every job ends in exactly one answer or exactly
one typed error, no job hangs, and jobs that can be run elsewhere are.

The chaos test counts each side on its own and compares them. The callers keep
what they got for each request id. The daemons log JSON at DEBUG: each job a
node finishes leaves a ``node.jobs.service`` line (request id, outcome, the node it
ran on), each attempt its dispatcher gives up for another a ``node.jobs.dispatch``
line, and a log file outlives a SIGKILL, so the victims' lines count too. The
survivors' own counters (``stats`` and ``routing.failovers`` in their status
record) must match their lines, so a line lost or misread fails the test instead
of quietly shrinking what it checks.

Its random choices (which peers die, when, each job's model) come from the
``seed`` fixture: printed, recorded as a property, replayed with
SWARM_TEST_SEED=N. The timing of real processes is not replayed.
"""

from __future__ import annotations

import json
import random
import re
import time
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio
from test_daemon_processes import Daemon, Daemons, cli, daemons_under

from node.client import SwarmClient
from protocols import Chunk, ErrorCode, RemoteError, Result, Tensor, Value
from runners.fake import FakeRunner

pytestmark = pytest.mark.slow

FAST = ("--heartbeat", "0.5", "--dead-after", "2", "--no-dht")
ROUND_ROBIN = ("--strategy", "round-robin")
CHUNKS_SAID = re.compile(r"after (\d+) chunk")
BROKEN_BY = re.compile(r"(\S+) failed after (\d+) chunk\(s\) of the stream")


async def wait_serving(entry: Daemon, servers: dict[str, set[str]], timeout_s: float = 30) -> None:
    """Until ``entry`` has linked every other node that serves each model."""
    with trio.fail_after(timeout_s):
        async with SwarmClient.connect(entry.addr) as client:
            while True:
                rows = (await client.record()).body["view"]["peers"]
                seen: dict[str, set[str]] = {}
                for row in rows:
                    if row["status"] == "linked":
                        for model in row["models"]:
                            seen.setdefault(model, set()).add(row["peer_id"])
                if all(seen.get(m, set()) >= ids - {entry.peer_id} for m, ids in servers.items()):
                    return
                await trio.sleep(0.2)


# --- a stream whose producer dies ------------------------------------------------------


def test_a_stream_cut_off_by_a_killed_producer_ends_in_one_typed_error(tmp_path: Path) -> None:
    with daemons_under(tmp_path) as daemons:
        # 400 chunks over 60 s: one every 150 ms, so the kill lands mid-stream.
        producer = daemons.start("producer", "--model", "fake:gen:60000", *FAST).wait_ready()
        entry = daemons.start("entry", "--no-models", "--peer", producer.addr, *FAST)
        entry.wait_ready()
        # Through the CLI first: a job past its deadline ends typed; an unknown strategy
        # is refused before anything is sent.
        late, unknown = cli(
            ["submit", "--peer", entry.addr, "--json", "--deadline", "1", *ROUND_ROBIN, "gen", "x"],
            ["submit", "--peer", entry.addr, "--json", "--strategy", "fastest", "gen", "x"],
        )
        assert late.returncode == 1, late.stderr
        assert json.loads(late.stdout)["error"]["code"] == "DEADLINE_EXCEEDED"
        assert unknown.returncode == 2 and "invalid choice: 'fastest'" in unknown.stderr
        trio.run(stream_then_kill, entry, producer)


async def stream_then_kill(entry: Daemon, producer: Daemon) -> None:
    await wait_serving(entry, {"gen": {producer.peer_id}})
    got: list[Chunk] = []
    errors: list[RemoteError] = []
    three = trio.Event()

    async def on_chunk(chunk: Chunk) -> None:
        got.append(chunk)
        if len(got) == 3:
            three.set()

    async def consume(client: SwarmClient) -> None:
        try:
            await client.infer("gen", {"text": "x"}, params={"chunks": 400}, on_chunk=on_chunk)
        except RemoteError as exc:
            errors.append(exc)

    with trio.fail_after(30):
        async with SwarmClient.connect(entry.addr) as client, trio.open_nursery() as nursery:
            nursery.start_soon(consume, client)
            await three.wait()
            await trio.to_thread.run_sync(producer.kill)  # SIGKILL, reaped
    assert len(errors) == 1, "exactly one typed error"
    (error,) = errors
    assert error.code is ErrorCode.OUTCOME_UNKNOWN, error
    said = CHUNKS_SAID.search(str(error))
    assert said, f"the error does not say how many chunks arrived: {error}"
    assert int(said[1]) == len(got) >= 3, (str(error), len(got))
    assert [c.seq for c in got] == list(range(len(got)))  # none lost on the way


# --- chaos: peers killed under a steady load -----------------------------------------


LOAD_S = 15.0
SUBMITTERS = 8
JOB_DEADLINE_S = 10.0
# Node i serves these. n0 and n1 are the entries and never die; any two of n2..n4 may,
# and each model is still served by at least one node, first by two or more.
SPREAD = (("m0", "m1"), ("m1", "m2"), ("m0", "m2"), ("m0", "m1"), ("m1", "m2"))
# JSON lines at DEBUG, where the service logs each job it finishes (node/jobs/service.py).
LOG_CONFIG = '[node]\nlog_level = "DEBUG"\nlog_format = "json"\n'
FINISHED = re.compile(r"\S+ (ok|[A-Z_]+) in [0-9.]+ ms, ran on (\S+)")


@dataclass
class Job:
    """One job as its caller saw it: what it asked for, and the chunks that came."""

    rid: str
    model: str
    stream: bool
    entry: str  # the peer id of the node it was submitted to
    expected: list[dict[str, Any]]  # what the fake model answers it (chunks, or the result)
    chunks: list[Chunk] = field(default_factory=list)


Outcome = Result | RemoteError | str  # an answer, a typed error, or what must not happen


@dataclass(frozen=True)
class Finished:
    """A daemon's line for a job it finished: ``ok`` or the error code, and where it ran."""

    rid: str
    outcome: str
    ran_on: str  # a peer id, or "None" when it ran nowhere


@dataclass
class JobLog:
    """The job lines of one daemon's log."""

    finished: list[Finished] = field(default_factory=list)
    gave_up: list[tuple[str, str]] = field(default_factory=list)  # (rid, message) per attempt


@dataclass(frozen=True)
class Counters:
    """A surviving daemon's own counts, from its status record."""

    served: int
    failed: int
    failovers: int


@dataclass
class Run:
    jobs: list[Job]  # in the order they were sent
    outcomes: list[tuple[str, Outcome]]  # (rid, outcome), one appended per job that ended
    counters: dict[str, Counters]  # by peer id, for the survivors


def start_logged(daemons: Daemons, name: str, *args: str) -> Daemon:
    """A daemon that logs JSON lines at DEBUG to its stderr file."""
    data_dir = daemons.root / name
    data_dir.mkdir(parents=True)
    (data_dir / "config.toml").write_text(LOG_CONFIG)
    return daemons.start(name, *args)


def read_job_log(daemon: Daemon) -> JobLog:
    log = JobLog()
    for line in daemon.stderr().splitlines():
        if not line.startswith("{"):
            continue  # hypercorn prints one plain line as it starts
        entry = json.loads(line)
        rid = entry.get("request_id")
        if rid is None:
            continue
        if entry["logger"] == "node.jobs.service":
            said = FINISHED.fullmatch(entry["message"])
            assert said, f"{daemon.data_dir.name}: a job line this test cannot read: {entry}"
            log.finished.append(Finished(rid, said[1], said[2]))
        elif entry["logger"] == "node.jobs.dispatch" and "trying another" in entry["message"]:
            log.gave_up.append((rid, entry["message"]))
    return log


def plain(outputs: Mapping[str, Value]) -> dict[str, Any]:
    """Outputs as plain data to compare: a tensor as its dtype, shape and bytes."""
    return {
        k: (v.dtype, tuple(v.shape), bytes(v.data)) if isinstance(v, Tensor) else v
        for k, v in outputs.items()
    }


async def expected_outputs(model: str, rid: str, stream: bool) -> list[dict[str, Any]]:
    """The fake model's answer to ``rid``, which depends on its inputs alone."""
    runner, inputs = FakeRunner(model), {"text": rid}  # no latency
    if stream:
        return [plain(chunk) async for chunk in runner.stream(inputs, {})]
    return [plain(await runner.infer(inputs, {}))]


def test_killing_two_serving_peers_under_load_loses_no_job(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    with daemons_under(tmp_path) as daemons:
        nodes: list[Daemon] = []
        for i, models in enumerate(SPREAD):
            specs = [a for m in models for a in ("--model", f"fake:{m}:30")]
            peers = [a for n in nodes[:2] for a in ("--peer", n.addr)]
            nodes.append(start_logged(daemons, f"n{i}", *specs, *peers, *FAST))
            if i < 2:  # the entries, whose addresses the others dial
                nodes[-1].wait_ready()
        for node in nodes[2:]:  # these three start side by side
            node.wait_ready()
        servers: dict[str, set[str]] = {}
        for node, models in zip(nodes, SPREAD, strict=True):
            for model in models:
                servers.setdefault(model, set()).add(node.peer_id)
        victims = rng.sample(nodes[2:], 2)
        survivors = [n for n in nodes if n not in victims]
        started = time.monotonic()
        run = trio.run(load_and_kill, nodes[:2], survivors, servers, victims, rng, seed)
        took = time.monotonic() - started
        logs = {n.peer_id: read_job_log(n) for n in nodes}
        dead = {n.data_dir.name for n in nodes if n.proc.poll() is not None}
    names = {n.peer_id: n.data_dir.name for n in nodes}
    print_summary(run, logs, names, victims, took, seed)
    assert dead == {v.data_dir.name for v in victims}, f"dead at the end: {sorted(dead)}"
    check_callers(run, {v.peer_id for v in victims})
    check_servers(run, logs, {v.peer_id for v in victims})


async def load_and_kill(
    entries: list[Daemon],
    survivors: list[Daemon],
    servers: dict[str, set[str]],
    victims: list[Daemon],
    rng: random.Random,
    seed: int,
) -> Run:
    for entry in entries:
        await wait_serving(entry, servers)
    run = Run([], [], {})
    models = sorted(servers)
    stop_at = trio.current_time() + LOAD_S

    async def submitter(k: int) -> None:
        entry = entries[k % len(entries)]
        async with SwarmClient.connect(entry.addr) as client:
            n = 0
            while trio.current_time() < stop_at:
                rid = f"chaos-{k}-{n}"
                stream = n % 4 == 3  # a quarter of the jobs stream
                n += 1
                # Each job's model from the seed and its id, whatever order jobs run in.
                model = random.Random(f"{seed}:{rid}").choice(models)
                job = Job(
                    rid, model, stream, entry.peer_id, await expected_outputs(model, rid, stream)
                )
                run.jobs.append(job)  # sent, so it must end

                async def on_chunk(chunk: Chunk, job: Job = job) -> None:
                    job.chunks.append(chunk)

                outcome: Outcome
                try:
                    # The node's deadline ends every job; this bound only catches a hang.
                    with trio.fail_after(JOB_DEADLINE_S + 10):
                        outcome = await client.infer(
                            model,
                            {"text": rid},
                            request_id=rid,
                            deadline_s=JOB_DEADLINE_S,
                            on_chunk=on_chunk if stream else None,
                        )
                except RemoteError as exc:
                    outcome = exc
                except Exception as exc:  # a hang or an untyped failure: what must not happen
                    outcome = f"{type(exc).__name__}: {exc}"
                run.outcomes.append((rid, outcome))

    async def killer() -> None:
        for victim in victims:
            await trio.sleep(rng.uniform(2.0, LOAD_S / 2 - 1))  # paces the kills
            await trio.to_thread.run_sync(victim.kill)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(killer)
        for k in range(SUBMITTERS):
            nursery.start_soon(submitter, k)
    for node in survivors:
        run.counters[node.peer_id] = await read_counters(node)
    return run


async def read_counters(node: Daemon, timeout_s: float = 30) -> Counters:
    """A survivor's own counts, once it has no job in flight."""
    with trio.fail_after(timeout_s):
        async with SwarmClient.connect(node.addr) as client:
            while True:
                body = (await client.record()).body
                if not body["load"]["in_flight"]:
                    break
                await trio.sleep(0.1)
    stats, routing = body["view"]["stats"], body["view"]["routing"]
    return Counters(int(stats["served"]), int(stats["failed"]), int(routing["failovers"]))


def check_callers(run: Run, victims: set[str]) -> None:
    """Each job ended once, typed, with its own answer, or a stream cut off by a kill."""
    jobs = {job.rid: job for job in run.jobs}
    assert len(jobs) == len(run.jobs), "a request id was sent twice"
    assert len(jobs) >= 100, "too few jobs to judge"
    ended = Counter(rid for rid, _ in run.outcomes)
    assert not [r for r, n in ended.items() if n > 1], "a job ended twice"
    assert ended.keys() == jobs.keys(), f"never ended: {sorted(jobs.keys() - ended.keys())[:5]}"
    untyped = [f"{rid}: {got}" for rid, got in run.outcomes if isinstance(got, str)]
    assert not untyped, untyped[:5]
    wrong: list[str] = []
    for rid, got in run.outcomes:
        job = jobs[rid]
        seqs = [c.seq for c in job.chunks]
        chunks = [plain(c.outputs) for c in job.chunks]
        if isinstance(got, Result):
            if job.stream:
                answer = chunks == job.expected and got.meta.get("chunks") == len(seqs)
                answer = answer and not got.outputs and seqs == list(range(len(seqs)))
            else:
                answer = [plain(got.outputs)] == job.expected and not job.chunks
            if got.id != rid or not answer:
                wrong.append(f"{rid}: not its answer: {got} after {len(seqs)} chunks")
        elif isinstance(got, RemoteError):
            # The one error allowed: a stream that a victim had begun, which no other
            # node may finish (the caller holds part of its answer already).
            said = BROKEN_BY.search(got.message)
            cut = int(said[2]) if said else -1
            if not (
                job.stream
                and got.code is ErrorCode.OUTCOME_UNKNOWN
                and said
                and said[1] in victims
                and 1 <= cut == len(seqs)
                and seqs == list(range(cut))
                and chunks == job.expected[:cut]
            ):
                wrong.append(f"{rid} (stream {job.stream}, {len(seqs)} chunks): {got}")
    assert not wrong, f"{len(wrong)} jobs: {wrong[:5]}"


def check_servers(run: Run, logs: Mapping[str, JobLog], victims: set[str]) -> None:
    """What the daemons logged agrees with what the callers got, job by job."""
    jobs = {job.rid: job for job in run.jobs}
    outcomes = dict(run.outcomes)
    ran: dict[str, list[str]] = defaultdict(list)  # rid -> the nodes that ran it to the end
    decided: dict[str, list[Finished]] = defaultdict(list)  # rid -> its entry's lines
    gave_up: dict[str, list[str]] = defaultdict(list)  # rid -> its entry's failed attempts
    stray: list[str] = []
    for node, log in logs.items():
        for line in log.finished:
            job = jobs.get(line.rid)
            if job is None:
                if not line.rid.startswith("check-"):  # spot checks: the entries' own jobs
                    stray.append(f"{node}: {line}")
                continue
            if node == job.entry:
                decided[line.rid].append(line)
            if line.outcome == "ok" and line.ran_on == node:
                ran[line.rid].append(node)
        for rid, message in log.gave_up:
            if rid not in jobs or jobs[rid].entry != node:  # only entries route
                stray.append(f"{node}: {rid}: {message}")
            gave_up[rid].append(message)
    assert not stray, f"lines for jobs nobody sent here: {stray[:5]}"
    twice = {rid: nodes for rid, nodes in ran.items() if len(set(nodes)) < len(nodes)}
    assert not twice, f"a node ran a job to the end twice: {twice}"
    not_once = {rid: decided[rid] for rid in jobs if len(decided[rid]) != 1}
    assert not not_once, (
        f"entries finished these jobs other than once: {list(not_once.items())[:5]}"
    )

    disagree: list[str] = []
    for rid in jobs:
        (line,) = decided[rid]
        got = outcomes[rid]
        if isinstance(got, Result):
            served_by = str(got.meta["served_by"])
            retries = int(got.meta["attempts"]) - 1  # type: ignore[arg-type]
            if (line.outcome, line.ran_on) != ("ok", served_by):
                disagree.append(f"{rid}: the caller got an answer from {served_by}; entry: {line}")
            if served_by not in ran[rid]:
                disagree.append(f"{rid}: answered as served by {served_by}, which logged no run")
            if set(ran[rid]) - {served_by} - victims:  # only a kill may eat a finished run
                disagree.append(f"{rid}: ran to the end on {ran[rid]}, answered by {served_by}")
            if len(gave_up[rid]) != retries:
                disagree.append(f"{rid}: {retries} failovers said, entry logged {gave_up[rid]}")
        else:
            assert isinstance(got, RemoteError)  # check_callers allowed no other
            if line.outcome != str(got.code):
                disagree.append(f"{rid}: the caller got {got.code}; entry: {line}")
            if set(ran[rid]) - victims:
                disagree.append(f"{rid}: ran to the end on {ran[rid]}, yet the caller got {got}")
    assert not disagree, f"{len(disagree)}: {disagree[:5]}"
    elsewhere = [m for ms in gave_up.values() for m in ms if not any(v in m for v in victims)]
    assert not elsewhere, f"attempts failed at peers never killed: {elsewhere[:5]}"
    assert sum(map(len, gave_up.values())) >= 1, "no job was failed over: the kills hit none"

    for node, counters in run.counters.items():
        lines = logs[node].finished
        counted = Counters(
            served=sum(line.outcome == "ok" and line.ran_on == node for line in lines),
            failed=sum(line.outcome != "ok" for line in lines),
            failovers=len(logs[node].gave_up),
        )
        assert counters == counted, f"{node}: its status says {counters}, its log {counted}"
    ran_on = Counter(node for nodes in ran.values() for node in set(nodes))
    assert all(ran_on[v] for v in victims), f"a victim never served: {ran_on}"


def print_summary(
    run: Run,
    logs: Mapping[str, JobLog],
    names: Mapping[str, str],
    victims: Sequence[Daemon],
    took: float,
    seed: int,
) -> None:
    results = [got for _, got in run.outcomes if isinstance(got, Result)]
    errors = [got for _, got in run.outcomes if isinstance(got, RemoteError)]
    served = Counter(names.get(str(r.meta["served_by"]), "?") for r in results)
    ran = {
        names[node]: sum(f.outcome == "ok" and f.ran_on == node for f in log.finished)
        for node, log in logs.items()
    }
    failovers = sum(len(log.gave_up) for log in logs.values())
    print(
        f"\nchaos (seed {seed}): {len(run.jobs)} jobs in {took:.1f} s: {len(results)} answers, "
        f"typed errors {dict(Counter(str(e.code) for e in errors))}, "
        f"untyped {sum(isinstance(got, str) for _, got in run.outcomes)}; "
        f"{failovers} failed attempts moved on; killed {[v.data_dir.name for v in victims]}; "
        f"answers by {dict(sorted(served.items()))}; runs logged {ran}"
    )
    for error in errors[:10]:
        print(f"  {error}")
