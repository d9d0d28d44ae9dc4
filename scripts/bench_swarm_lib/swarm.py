"""The swarm that scripts/bench_swarm.py measures: daemon processes on loopback.

An entry node (``--no-models``: it only routes) and workers that join through
it, each a real ``swarm daemon`` process (no mDNS, no DHT), started together and
stopped (SIGTERM, then SIGKILL) on the way out; plus the CPU accounting of those
processes and of the machine, read from /proc. A package: the name bench_swarm
is the shell wrapper's.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import trio

from node.client import SwarmClient

REPO = Path(__file__).resolve().parents[2]
LOOPBACK = "/ip4/127.0.0.1/tcp/0"
SIZES = (1, 2, 4, 8)  # worker i serves s<N> for every N here with i < N
SLOW_WORKER = 7  # h8 ("one slow") runs SLOW_FACTOR times slower there than on the others
SLOW_FACTOR = 5
START_BOUND_S = 180.0  # one process, to its banner (nine import libp2p at once on 2 busy cores)
LINKED_BOUND_S = 60.0  # the entry node links every worker
STOP_BOUND_S = 5.0
POLL_S = 0.1
BANNER = re.compile(rb"swarm node (\S+) ready\n\s+listening on (\S+)\n")
CLOCK_TICK = os.sysconf("SC_CLK_TCK")


@dataclass
class NodeProc:
    name: str
    proc: trio.Process
    log: Path
    peer_id: str = ""
    addr: str = ""

    def cpu_s(self) -> float:
        """User + system CPU seconds so far (0 once it is gone)."""
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICK

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-1200:]


def worker_models(i: int, service_ms: float) -> list[str]:
    models = [f"fake:s{n}:{service_ms:g}" for n in SIZES if i < n]
    slow = service_ms * (SLOW_FACTOR if i == SLOW_WORKER else 1)
    return models + [f"fake:h{max(SIZES)}:{slow:g}"] + (["fake:z1:0"] if i == 0 else [])


async def start_node(root: Path, name: str, args: list[str]) -> NodeProc:
    command = [sys.executable, "-m", "node.cli", "--log-level", "WARNING", "daemon"]
    command += ["--listen", LOOPBACK, "--no-cuda-probe", "--no-mdns", "--no-dht"]
    command += ["--data-dir", str(root / name), *args]
    if "--http" not in args:  # a gateway only where one is measured: as before it was default
        command += ["--http", "off"]
    if "--grpc" not in args:  # the same for the gRPC port (nine of them would fight for 8471)
        command += ["--grpc", "off"]
    log = root / f"{name}.stderr"
    with log.open("wb") as stderr:
        proc = await trio.lowlevel.open_process(
            command, stdout=subprocess.PIPE, stderr=stderr, cwd=REPO
        )
    node = NodeProc(name, proc, log)
    assert proc.stdout is not None
    buf = b""
    try:
        with trio.fail_after(START_BOUND_S):
            while not (match := BANNER.search(buf)):
                chunk = await proc.stdout.receive_some(4096)
                if not chunk:
                    raise RuntimeError(f"{name} exited before it was ready: {node.log_tail()}")
                buf += chunk
    except BaseException:
        proc.kill()
        raise
    node.peer_id, node.addr = match[1].decode(), match[2].decode()
    return node


async def stop_all(nodes: list[NodeProc]) -> None:
    """SIGTERM, a bounded wait, then SIGKILL for any left; shielded (runs in finally)."""
    with trio.CancelScope(shield=True):
        for n in nodes:
            if n.proc.returncode is None:
                with suppress(OSError):
                    n.proc.send_signal(signal.SIGTERM)
        with trio.move_on_after(STOP_BOUND_S):
            for n in nodes:
                await n.proc.wait()
        for n in nodes:
            if n.proc.returncode is None:
                n.proc.kill()
        with trio.move_on_after(STOP_BOUND_S):
            for n in nodes:
                await n.proc.wait()


@dataclass
class Swarm:
    entry: NodeProc
    workers: list[NodeProc]
    client: SwarmClient
    started_s: float
    linked_s: float

    def name_of(self, peer_id: str) -> str:
        return next((w.name for w in self.workers if w.peer_id == peer_id), peer_id[-6:])


@asynccontextmanager
async def running_swarm(
    root: Path, workers: int, service_ms: float, common: list[str]
) -> AsyncIterator[Swarm]:
    nodes: list[NodeProc] = []
    t0 = trio.current_time()
    try:
        entry = await start_node(root, "entry", ["--no-models", *common])
        nodes.append(entry)
        async with trio.open_nursery() as nursery:

            async def one(i: int) -> None:
                args = ["--bootstrap", entry.addr, *common]
                for model in worker_models(i, service_ms):
                    args += ["--model", model]
                nodes.append(await start_node(root, f"w{i}", args))

            for i in range(workers):
                nursery.start_soon(one, i)
        started = trio.current_time() - t0
        by_name = sorted(nodes[1:], key=lambda n: int(n.name[1:]))
        async with SwarmClient.connect(entry.addr) as client:
            await wait_linked(client, {w.peer_id for w in by_name})
            yield Swarm(entry, by_name, client, started, trio.current_time() - t0)
    finally:
        await stop_all(nodes)


async def wait_linked(client: SwarmClient, wanted: set[str]) -> None:
    """Until the entry node holds every worker as linked, with its models."""
    seen: set[str] = set()
    with trio.move_on_after(LINKED_BOUND_S):
        while True:
            record = await client.record()
            rows = record.body.get("view", {}).get("peers", [])
            seen = {r["peer_id"] for r in rows if r["status"] == "linked" and r["models"]}
            if wanted <= seen:
                return
            await trio.sleep(POLL_S)
    raise RuntimeError(f"the entry node linked {len(seen & wanted)} of {len(wanted)} workers")


def machine_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, from /proc/stat."""
    ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = ticks[3] + ticks[4]  # idle + iowait
    return (sum(ticks) - idle) / CLOCK_TICK, sum(ticks) / CLOCK_TICK


@dataclass
class CpuSnapshot:
    entry: float
    workers: float
    load_generator: float
    machine: tuple[float, float]

    @classmethod
    def take(cls, swarm: Swarm) -> CpuSnapshot:
        return cls(
            swarm.entry.cpu_s(),
            sum(w.cpu_s() for w in swarm.workers),
            time.process_time(),
            machine_busy(),
        )


def cpu_per_job(a: CpuSnapshot, b: CpuSnapshot, jobs: int, window_s: float) -> dict[str, float]:
    per = 1000 / max(1, jobs)
    busy, total = b.machine[0] - a.machine[0], b.machine[1] - a.machine[1]
    ours = (b.entry - a.entry) + (b.workers - a.workers) + (b.load_generator - a.load_generator)
    return {
        "entry_ms": (b.entry - a.entry) * per,
        "workers_ms": (b.workers - a.workers) * per,
        "load_generator_ms": (b.load_generator - a.load_generator) * per,
        "ours_cores": ours / window_s,
        "machine_busy_cores": busy / total * (os.cpu_count() or 1) if total else 0.0,
    }


def warnings(root: Path) -> list[str]:
    """The nodes' WARNING/ERROR lines, counted, without time stamps."""
    counts: Counter[str] = Counter()
    for log in sorted(root.glob("*.stderr")):
        for line in log.read_text(errors="replace").splitlines():
            if " WARNING " in line or " ERROR " in line:
                counts[f"{log.stem}: {line.split(' ', 2)[-1][:160]}"] += 1
    return [f"{c:>4} x {text}" for text, c in counts.most_common(10)]
