"""Section 2: one node process per network namespace, found by mDNS alone."""

from __future__ import annotations

import argparse
import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
from netns import (  # scripts/netns.py
    bridged_namespaces,
    ip,
    remove_stale_namespaces,
    why_namespaces_cannot_be_made,
)

from node.daemon import Node

from .common import (
    BRIDGE,
    FULL_VIEW_BOUND_S,
    POLL_S,
    PREFIX,
    PROC_READY_S,
    PROC_STOP_S,
    REPO,
    SCRIPT,
    SETTLE_S,
    SUBNET,
    describe,
    linked,
    net_counter,
    node_config,
    progress,
)

# Lines read from a child process and not yet taken; past this the reader thread
# waits (and the child with it) rather than holding an ever-growing backlog.
LINES_BUFFERED = 10_000


def _lines_queue() -> queue.Queue[Any]:
    return queue.Queue(LINES_BUFFERED)


@dataclass
class NodeProcess:
    index: int
    namespace: str
    proc: subprocess.Popen[str]
    log: Path
    lines: queue.Queue[tuple[float, dict[str, Any]] | None] = field(default_factory=_lines_queue)
    events: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    exited: bool = False

    def start_reader(self) -> None:
        def read() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                with suppress(ValueError):
                    self.lines.put((time.monotonic(), json.loads(line)))
            self.lines.put(None)

        threading.Thread(target=read, daemon=True).start()

    def drain(self) -> None:
        while True:
            try:
                item = self.lines.get_nowait()
            except queue.Empty:
                return
            if item is None:
                self.exited = True
            else:
                self.events.append(item)

    def of(self, kind: str) -> list[tuple[float, dict[str, Any]]]:
        return [(t, e) for t, e in self.events if e["event"] == kind]

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-1500:]


@contextmanager
def node_processes(nss: list[str], root: Path) -> Iterator[list[NodeProcess]]:
    procs: list[NodeProcess] = []
    try:
        for i, ns in enumerate(nss):
            command = ["ip", "netns", "exec", ns, sys.executable, str(SCRIPT)]
            command += ["--node", f"/ip4/{SUBNET}.{i + 2}/tcp/0", "--index", str(i)]
            command += ["--data-dir", str(root / f"n{i}")]
            log = root / f"n{i}.stderr"
            with log.open("wb") as stderr:
                proc = subprocess.Popen(
                    command,
                    stdin=subprocess.PIPE,  # the node stops when this closes (or we die)
                    stdout=subprocess.PIPE,
                    stderr=stderr,
                    text=True,
                    cwd=REPO,
                    env={**os.environ, "PYTHONUNBUFFERED": "1"},
                )
            procs.append(NodeProcess(i, ns, proc, log))
            procs[-1].start_reader()
        yield procs
    finally:
        for p in procs:  # closing stdin asks each node to stop cleanly
            with suppress(OSError):
                if p.proc.stdin is not None:
                    p.proc.stdin.close()
        deadline = time.monotonic() + PROC_STOP_S
        for p in procs:
            with suppress(subprocess.TimeoutExpired):
                p.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        for p in procs:
            if p.proc.poll() is None:
                print(f"WARNING: mDNS node {p.index} did not stop; SIGTERM", file=sys.stderr)
                p.proc.send_signal(signal.SIGTERM)
                with suppress(subprocess.TimeoutExpired):
                    p.proc.wait(timeout=3)
            if p.proc.poll() is None:
                p.proc.kill()
                with suppress(subprocess.TimeoutExpired):
                    p.proc.wait(timeout=5)


def _whole_at(procs: list[NodeProcess], at: float) -> int:
    """How many nodes linked every other, going by what they had printed by ``at``."""
    ids = [p.of("ready")[-1][1]["peer_id"] if p.of("ready") else None for p in procs]
    if None in ids:
        return 0
    whole = 0
    for p in procs:
        said = [e for t, e in p.of("linked") if t <= at]
        whole += bool(said) and set(said[-1]["ids"]) >= set(ids) - {ids[p.index]}
    return whole


def _full_view_at(procs: list[NodeProcess]) -> float | None:
    """The first time (monotonic) at which every node linked every other, if any."""
    times = sorted(t for p in procs for t, _ in p.of("linked"))
    return next((t for t in times if _whole_at(procs, t) == len(procs)), None)


def _tables(procs: list[NodeProcess]) -> str:
    """Entries of all the nodes' tables, by status, as they last printed them."""
    counts: Counter[str] = Counter()
    for p in procs:
        if said := p.of("linked"):
            counts.update(said[-1][1]["tables"])
    return ", ".join(f"{c} {s}" for s, c in counts.most_common()) or "empty"


def veth_counters(nss: list[str]) -> tuple[int, int]:
    """Bytes sent on the veths of ``nss``, and UDP datagrams sent there (mDNS is the only UDP)."""
    sent = udp = 0
    for ns in nss:
        dev = ip("netns", "exec", ns, "cat", "/proc/net/dev", "/proc/net/snmp").stdout
        sent += net_counter(dev, "eth0", column=8)
        header, values = [ln.split()[1:] for ln in dev.splitlines() if ln.startswith("Udp:")]
        udp += int(values[header.index("OutDatagrams")])
    return sent, udp


def mdns_run(n: int, window_s: float, traffic: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"n": n}
    with tempfile.TemporaryDirectory(prefix="bench-discovery-") as tmp:
        with (
            bridged_namespaces(n, prefix=PREFIX, subnet=SUBNET, bridge=BRIDGE) as nss,
            node_processes(nss, Path(tmp)) as procs,
        ):
            _measure_mdns(out, nss, procs, window_s, traffic)
        # node_processes has asked them to stop (stdin closed), and reaped them
        out["stop_problems"] = _stop_problems(procs)
        out["warnings"] = sorted({w for p in procs for w in _warnings(p.log)})[:10]
    return out


def _measure_mdns(
    out: dict[str, Any], nss: list[str], procs: list[NodeProcess], window_s: float, traffic: bool
) -> None:
    n = len(procs)
    spawned = time.monotonic()
    full_at = None
    while time.monotonic() - spawned < PROC_READY_S + FULL_VIEW_BOUND_S:
        for p in procs:
            p.drain()
        if dead := [p for p in procs if p.exited]:
            out["error"] = f"node {dead[0].index} exited early: {dead[0].log_tail()}"
            return
        if (full_at := _full_view_at(procs)) is not None:
            break
        time.sleep(POLL_S)
    ready = [p.of("ready")[0][0] for p in procs if p.of("ready")]
    out["all_ready_s"] = max(ready) - spawned if len(ready) == n else None
    if full_at is None:
        linked_counts = [p.of("linked")[-1][1]["n"] if p.of("linked") else 0 for p in procs]
        out["progress"] = f"{len(ready)}/{n} ready, linked counts {linked_counts}"
        return
    out["full_view_from_spawn_s"] = full_at - spawned
    out["full_view_from_ready_s"] = full_at - max(ready)
    if traffic:
        time.sleep(SETTLE_S)
        (before, udp), t0 = veth_counters(nss), time.monotonic()
        time.sleep(window_s)
        (after, udp_after), elapsed = veth_counters(nss), time.monotonic() - t0
        for p in procs:
            p.drain()
        if gone := [p.index for p in procs if p.exited or p.proc.poll() is not None]:
            out["error"] = f"nodes {gone} exited during the traffic window"
            return
        out["traffic"] = {
            "bytes": after - before,
            "window_s": elapsed,
            "per_node_bytes_s": (after - before) / n / elapsed,
            "per_node_udp_datagrams_s": (udp_after - udp) / n / elapsed,
            "full_view_kept": _whole_at(procs, time.monotonic()) == n,
            "refused": sum(p.of("linked")[-1][1]["refused"] for p in procs),
            "tables_at_end": _tables(procs),
        }


def _stop_problems(procs: list[NodeProcess]) -> list[str]:
    """Nodes that did not say "stopped" or exit 0 (node_processes has ended them)."""
    problems = []
    for p in procs:
        deadline = time.monotonic() + 5
        while not p.exited and time.monotonic() < deadline:
            p.drain()
            time.sleep(POLL_S)
        if not p.of("stopped") or p.proc.returncode != 0:
            said = "said stopped" if p.of("stopped") else "never said stopped"
            lines = p.log.read_text(errors="replace").strip().splitlines()
            last = lines[-1][:200] if lines else "nothing on stderr"
            problems.append(f"node {p.index}: exit {p.proc.returncode}, {said} ({last})")
    return problems


def _warnings(log: Path) -> set[str]:
    """A process's WARNING/ERROR log lines, without the time stamp."""
    lines = log.read_text(errors="replace").splitlines()
    return {ln.split(" ", 1)[-1][:200] for ln in lines if " WARNING " in ln or " ERROR " in ln}


def mdns_section(sizes: list[int], window_s: float) -> dict[str, Any]:
    reason = why_namespaces_cannot_be_made(PREFIX)
    if reason:
        return {"skipped": reason}
    remove_stale_namespaces(PREFIX)
    runs = []
    for n in sizes:
        progress(f"... mDNS, {n} processes in network namespaces")
        try:
            runs.append(mdns_run(n, window_s, traffic=n == max(sizes)))
        except Exception as exc:
            runs.append({"n": n, "error": describe(exc)})
    return {"runs": runs}


# --------------------------------------------------------------------------- --node mode


def emit(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


async def serve_one(args: argparse.Namespace) -> None:
    """One mDNS node in this namespace; prints its linked peers as they change.

    Stops when stdin closes (the benchmark ends or dies) or on SIGTERM/SIGINT.
    """
    config = node_config(Path(args.data_dir), args.index, listen=args.node, mdns=True, dht=False)
    node = Node(config)
    stop = trio.Event()

    async def watch() -> None:
        last = None
        while True:
            table = node.services.membership.table
            statuses = dict(Counter(str(p.status) for p in table.peers.values()))
            now = (sorted(linked(node)), table.refusals, statuses)
            if now != last:
                emit(event="linked", n=len(now[0]), ids=now[0], refused=now[1], tables=now[2])
                last = now
            await trio.sleep(0.1)

    async def until_stdin_closes() -> None:
        # trio-typing's stubs (installed by libp2p) predate abandon_on_cancel
        await trio.to_thread.run_sync(sys.stdin.read, abandon_on_cancel=True)  # type: ignore[call-arg]
        stop.set()

    async def until_signal(signals: Any) -> None:
        async for _ in signals:
            stop.set()
            return

    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(node.run)
            emit(event="ready", peer_id=node.peer_id, addrs=node.addrs)
            async with trio.open_nursery() as helpers:
                helpers.start_soon(watch)
                helpers.start_soon(until_stdin_closes)
                helpers.start_soon(until_signal, signals)
                await stop.wait()
                helpers.cancel_scope.cancel()
            node.stop()
    emit(event="stopped")
