"""Real daemon processes dying under load: a stream cut off mid-way, and peers
SIGKILLed while jobs flow through the swarm.

What must hold whatever dies: every job ends in exactly one answer or exactly
one typed error, no job hangs, and jobs that can be run elsewhere are.
"""

from __future__ import annotations

import json
import random
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio
from test_daemon_processes import Daemon, cli, daemons_under

from node.client import SwarmClient
from protocols import Chunk, ErrorCode, RemoteError

pytestmark = pytest.mark.slow

FAST = ("--heartbeat", "0.5", "--dead-after", "2", "--no-dht")
ROUND_ROBIN = ("--strategy", "round-robin")
CHUNKS_SAID = re.compile(r"after (\d+) chunk")


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


@dataclass
class Tally:
    answers: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    untyped: list[str] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)  # the typed errors' messages
    miscounted: list[str] = field(default_factory=list)  # broken streams, wrong count said
    failovers: dict[str, int] = field(default_factory=dict)  # each entry's, from its status
    ids: Counter[str] = field(default_factory=Counter)  # answers per request id
    served_by: Counter[str] = field(default_factory=Counter)
    failed_over: int = 0  # answers that took more than one attempt
    streams: int = 0  # answers that streamed

    @property
    def total(self) -> int:
        return self.answers + sum(self.errors.values()) + len(self.untyped)


LOAD_S = 15.0
SUBMITTERS = 8
JOB_DEADLINE_S = 10.0
# Node i serves these. n0 and n1 are the entries and never die; any two of n2..n4 may,
# and each model is still served by at least one node, first by two or more.
SPREAD = (("m0", "m1"), ("m1", "m2"), ("m0", "m2"), ("m0", "m1"), ("m1", "m2"))


def test_killing_two_serving_peers_under_load_loses_no_job(tmp_path: Path) -> None:
    rng = random.Random()
    with daemons_under(tmp_path) as daemons:
        nodes: list[Daemon] = []
        for i, models in enumerate(SPREAD):
            specs = [a for m in models for a in ("--model", f"fake:{m}:30")]
            peers = [a for n in nodes[:2] for a in ("--peer", n.addr)]
            nodes.append(daemons.start(f"n{i}", *specs, *peers, *FAST))
            if i < 2:  # the entries, whose addresses the others dial
                nodes[-1].wait_ready()
        for node in nodes[2:]:  # these three start side by side
            node.wait_ready()
        servers: dict[str, set[str]] = {}
        for node, models in zip(nodes, SPREAD, strict=True):
            for model in models:
                servers.setdefault(model, set()).add(node.peer_id)
        victims = rng.sample(nodes[2:], 2)
        started = time.monotonic()
        tally = trio.run(load_and_kill, nodes[:2], servers, victims, rng)
        took = time.monotonic() - started
        print(
            f"\nchaos: {tally.total} jobs in {took:.1f} s, {tally.answers} answers, "
            f"typed errors {dict(tally.errors)}, untyped {len(tally.untyped)}, "
            f"{tally.failed_over} answers after a failover, {tally.streams} streamed; "
            f"entries' failovers {tally.failovers}; "
            f"killed {[n.data_dir.name for n in victims]}; served by "
            f"{ {n.data_dir.name: tally.served_by[n.peer_id] for n in nodes} }"
        )
        for message in tally.messages[:10]:
            print(f"  {message}")
        assert all(tally.served_by[v.peer_id] for v in victims), "a victim never served"
        assert all(v.proc.poll() is not None for v in victims)
        assert all(n.proc.poll() is None for n in nodes[:2]), "an entry node died"
    assert not tally.untyped, tally.untyped[:5]
    assert not tally.miscounted, tally.miscounted[:5]
    assert max(tally.ids.values()) == 1, "a job got two answers"
    assert tally.answers == sum(tally.ids.values())
    assert tally.total >= 100, "too few jobs to judge"
    assert tally.answers >= 0.99 * tally.total, tally


async def load_and_kill(
    entries: list[Daemon], servers: dict[str, set[str]], victims: list[Daemon], rng: random.Random
) -> Tally:
    for entry in entries:
        await wait_serving(entry, servers)
    tally = Tally()
    models = sorted(servers)
    stop_at = trio.current_time() + LOAD_S

    async def submitter(k: int) -> None:
        async with SwarmClient.connect(entries[k % len(entries)].addr) as client:
            n = 0
            while trio.current_time() < stop_at:
                rid = f"chaos-{k}-{n}"
                n += 1
                chunks: list[Chunk] = []

                async def on_chunk(chunk: Chunk, chunks: list[Chunk] = chunks) -> None:
                    chunks.append(chunk)

                stream = n % 4 == 0  # a quarter of the jobs stream
                try:
                    # The node's deadline ends every job; this bound only catches a hang.
                    with trio.fail_after(JOB_DEADLINE_S + 10):
                        result = await client.infer(
                            rng.choice(models),
                            {"text": rid},
                            request_id=rid,
                            deadline_s=JOB_DEADLINE_S,
                            on_chunk=on_chunk if stream else None,
                        )
                except RemoteError as exc:
                    tally.errors[exc.code.name + (" (stream)" if stream else "")] += 1
                    tally.messages.append(f"{rid}: {exc}")
                    said = CHUNKS_SAID.search(str(exc))
                    if stream and said and int(said[1]) != len(chunks):
                        tally.miscounted.append(f"{rid}: got {len(chunks)}: {exc}")
                except Exception as exc:  # a hang or an untyped failure: what must not happen
                    tally.untyped.append(f"{rid}: {type(exc).__name__}: {exc}")
                else:
                    assert result.id == rid
                    if stream:
                        assert result.meta["chunks"] == len(chunks) == 3, (result.meta, chunks)
                        tally.streams += 1
                    tally.answers += 1
                    tally.ids[result.id] += 1
                    tally.served_by[str(result.meta["served_by"])] += 1
                    tally.failed_over += int(result.meta["attempts"]) > 1  # type: ignore[arg-type]

    async def killer() -> None:
        for victim in victims:
            await trio.sleep(rng.uniform(2.0, LOAD_S / 2 - 1))
            await trio.to_thread.run_sync(victim.kill)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(killer)
        for k in range(SUBMITTERS):
            nursery.start_soon(submitter, k)
    for entry in entries:
        with trio.fail_after(30):
            async with SwarmClient.connect(entry.addr) as client:
                view = (await client.record()).body["view"]
        tally.failovers[entry.data_dir.name] = int(view["routing"]["failovers"])
    return tally
