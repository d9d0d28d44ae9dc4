"""Benchmark swarm discovery: time to a full view, time to drop a dead peer, traffic at rest.

Four measurements, each against the target of issue 3 where it has one:

1. Bootstrap + DHT on loopback: N in-process nodes in this one trio process
   (N = 3, 10, 30 by default). Node 0 starts first (its address is needed);
   the others start together with ``bootstrap=(node 0,)``, DHT on, mDNS off.
   Timed from their launch until every node's ``live_peers`` (peers with a
   verified record) holds every other node.
2. mDNS in network namespaces: N processes (3 and 10), each a full node in its
   own namespace on one bridge (10.77.1.0/24, only inside namespaces made
   here), started with no address of anyone. Each prints its linked peers as
   they change; timed until every node links every other. Needs root and ``ip``;
   skipped with the reason otherwise. mDNS never runs in the root namespace.
3. A dead peer: a small loopback swarm with heartbeat 1 s, dead after 5 s, and
   one more node as a separate ``swarm daemon`` process, SIGKILLed once every
   node links it. Per node: time until it leaves ``live_peers`` and until it
   leaves the table (the drop), against dead_after + heartbeat.
4. Membership traffic at rest: after the 10-node loopback swarm has a full view
   and has settled, the ``lo`` rx byte delta (each loopback byte counted once)
   over a window, per node per second. As root, sections 1, 3 and 4 run in a
   child process inside a namespace of their own, whose ``lo`` nothing else
   touches; otherwise on the machine's ``lo``, which must then be quiet (its
   rate before the swarms is printed). For the 10-node mDNS swarm: bytes sent
   on each namespace's veth.

Every wait is bounded; every node is stopped, every process killed and every
namespace deleted on the way out, Ctrl-C included.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import queue
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
from netns import (  # scripts/netns.py, beside this script
    bridged_namespaces,
    delete_namespaces,
    ip,
    remove_stale_namespaces,
    why_namespaces_cannot_be_made,
)

from bootstrap.table import live_peers
from node import logs
from node.daemon import Node, NodeConfig
from node.membership import MembershipConfig

REPO = Path(__file__).resolve().parents[1]
LOOPBACK = "/ip4/127.0.0.1/tcp/0"
POLL_S = 0.05
START_BOUND_S = 60.0  # one node, from run() to started
FULL_VIEW_BOUND_S = 60.0
STOP_BOUND_S = 30.0
SETTLE_S = 45.0  # after the full view: past the joining burst of DHT roster lookups
BASELINE_S = 5.0  # lo traffic before any swarm runs
FAST = MembershipConfig(heartbeat_s=1.0, dead_after_s=5.0)
DEAD_SWARM = 5  # in-process nodes beside the victim process
VICTIM_READY_S = 30.0
VICTIM_LINKED_S = 30.0
WATCH_AFTER_KILL_S = 20.0  # also long enough to see a DHT roster lookup re-add the dead peer
TARGET_VIEW_S = 5.0
TARGET_BYTES_S = 2000.0  # 2 KB/s
SUBNET = "10.77.1"  # host i gets SUBNET.(i + 2)/24, inside its own namespace only
PREFIX = "swb"  # namespaces swb<pid>-br, swb<pid>-h0, ...
BRIDGE = "br-swarmbench"
PROC_READY_S = 60.0
PROC_STOP_S = 10.0
LOOPBACK_BOUND_S = 480.0  # sections 1, 3 and 4 together
LISTENING = re.compile(rb"swarm node (\S+) ready\n\s+listening on (\S+)\n")

# --------------------------------------------------------------------------- shared


class WarningLog(logging.Handler):
    """Keeps the node's warnings (counted by message template) for the report."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, str] = {}

    def emit(self, record: logging.LogRecord) -> None:
        key = f"{record.levelname} {record.name}: {record.msg}"
        self.counts[key] += 1
        self.examples.setdefault(key, record.getMessage()[:300])

    def lines(self) -> list[str]:
        return [f"{n:>5} x {self.examples[key]}" for key, n in self.counts.most_common(8)]

    @classmethod
    def install(cls) -> WarningLog:
        logs.configure("WARNING")
        handler = cls()
        logging.getLogger().handlers[:] = [handler]
        logging.getLogger("libp2p").handlers[:] = [handler]
        return handler


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def node_config(root: Path, i: int, *, listen: str = LOOPBACK, **overrides: Any) -> NodeConfig:
    settings: dict[str, Any] = {
        "data_dir": root / f"n{i}",
        "listen": (listen,),
        "models": (f"fake:m{i % 3}",),
        "probe_cuda": False,
        "shutdown_grace_s": 2.0,
        "mdns": False,
        "dht": True,
    }
    return NodeConfig(**{**settings, **overrides})


def linked(node: Node) -> set[str]:
    return (
        set() if node.membership is None else {p.peer_id for p in live_peers(node.membership.table)}
    )


def net_counter(text: str | None = None, interface: str = "lo", column: int = 0) -> int:
    """A counter from /proc/net/dev (column 0: rx bytes, 8: tx bytes)."""
    if text is None:
        text = Path("/proc/net/dev").read_text()
    for line in text.splitlines():
        name, sep, rest = line.partition(":")
        if sep and name.strip() == interface:
            return int(rest.split()[column])
    raise RuntimeError(f"no {interface} in /proc/net/dev")


def describe(exc: BaseException) -> str:
    """An error, or the distinct leaves of an exception group, in one line."""
    if isinstance(exc, BaseExceptionGroup):
        leaves = {describe(e) for e in exc.exceptions}
        return "; ".join(sorted(leaves))
    return f"{type(exc).__name__}: {exc}"[:300]


def spread(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


# --------------------------------------------------------------------------- in-process swarms


@dataclass
class Swarm:
    nodes: list[Node]
    launched_at: float = 0.0
    started_s: dict[int, float] = field(default_factory=dict)
    stop_s: float | None = None
    stopped_cleanly: bool = False
    stopping: bool = False
    crashes: list[str] = field(default_factory=list)  # node errors, reported, not raised

    def whole(self) -> int:
        """How many nodes hold every other node in live_peers."""
        ids = {n.peer_id for n in self.nodes}
        return 0 if "" in ids else sum(linked(n) >= ids - {n.peer_id} for n in self.nodes)

    def full_view(self) -> bool:
        return self.whole() == len(self.nodes)

    def refusals(self) -> int:
        return sum(n.membership.table.refusals for n in self.nodes if n.membership)

    def tables(self) -> str:
        """Entries of all the nodes' tables, by status."""
        counts = Counter(
            str(p.status)
            for n in self.nodes
            if n.membership
            for p in n.membership.table.peers.values()
        )
        return ", ".join(f"{c} {s}" for s, c in counts.most_common()) or "empty"


async def _run_node(swarm: Swarm, i: int, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """A node of the swarm; an error that ends it is recorded for the report."""
    try:
        await swarm.nodes[i].run(task_status=task_status)
    except Exception as exc:
        when = "while stopping" if swarm.stopping else "while running"
        swarm.crashes.append(f"node {i} failed {when}: {describe(exc)}")


async def _start(nursery: trio.Nursery, swarm: Swarm, i: int) -> None:
    try:
        await nursery.start(_run_node, swarm, i)
    except RuntimeError:  # it ended before it started: recorded in swarm.crashes
        return
    swarm.started_s[i] = trio.current_time() - swarm.launched_at


@asynccontextmanager
async def running_swarm(
    n: int, root: Path, membership: MembershipConfig | None = None
) -> AsyncIterator[Swarm]:
    """Node 0 started, then nodes 1..n-1 launched together (not waited for)."""
    extra: dict[str, Any] = {} if membership is None else {"membership": membership}
    swarm = Swarm([Node(node_config(root, 0, **extra))])
    async with trio.open_nursery() as nursery:
        stopping = 0.0
        try:
            with trio.fail_after(START_BOUND_S):
                await nursery.start(_run_node, swarm, 0)
            boot = (swarm.nodes[0].addrs[0],)
            swarm.launched_at = trio.current_time()
            for i in range(1, n):
                swarm.nodes.append(Node(node_config(root, i, bootstrap=boot, **extra)))
                nursery.start_soon(_start, nursery, swarm, i)
            yield swarm
        finally:
            stopping = trio.current_time()
            swarm.stopping = True
            for node in swarm.nodes:
                node.stop()
            nursery.cancel_scope.deadline = stopping + STOP_BOUND_S
    swarm.stop_s = trio.current_time() - stopping
    swarm.stopped_cleanly = not nursery.cancel_scope.cancelled_caught


async def wait_for(done: Callable[[], bool], bound_s: float) -> float | None:
    """Seconds until ``done()`` holds, or None if it did not within ``bound_s``."""
    start = trio.current_time()
    with trio.move_on_after(bound_s):
        while not done():  # noqa: ASYNC110 (polling node state from outside is the point)
            await trio.sleep(POLL_S)
        return trio.current_time() - start
    return None


async def loopback_run(n: int, window_s: float, traffic: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"n": n}
    with tempfile.TemporaryDirectory(prefix="bench-discovery-") as tmp:
        async with running_swarm(n, Path(tmp)) as swarm:
            best = 0

            def done() -> bool:
                nonlocal best
                best = max(best, swarm.whole())
                return best == n

            out["full_view_s"] = took = await wait_for(done, FULL_VIEW_BOUND_S)
            out["most_with_full_view"] = best
            out["tables"] = swarm.tables()
            out["refused"] = swarm.refusals()
            started = list(swarm.started_s.values())
            out["all_started_s"] = max(started) if len(started) == n - 1 else None
            if traffic and took is not None:
                await trio.sleep(SETTLE_S)
                refused = swarm.refusals()
                before, t0 = net_counter(), trio.current_time()
                await trio.sleep(window_s)
                after, elapsed = net_counter(), trio.current_time() - t0
                out["traffic"] = {
                    "bytes": after - before,
                    "window_s": elapsed,
                    "per_node_bytes_s": (after - before) / n / elapsed,
                    "full_view_kept": swarm.full_view(),
                    "with_full_view_at_end": swarm.whole(),
                    "refused_in_window": swarm.refusals() - refused,
                    "tables_at_end": swarm.tables(),
                }
    out["stop_s"], out["stopped_cleanly"] = swarm.stop_s, swarm.stopped_cleanly
    out["crashes"] = swarm.crashes
    return out


async def read_banner(proc: trio.Process) -> tuple[str, str]:
    """The victim's peer id and address from its stdout banner."""
    assert proc.stdout is not None
    buf = b""
    with trio.fail_after(VICTIM_READY_S):
        while not (match := LISTENING.search(buf)):
            chunk = await proc.stdout.receive_some(4096)
            if not chunk:
                raise RuntimeError(f"the victim exited before it was ready: {buf!r}")
            buf += chunk
    return match[1].decode(), match[2].decode()


async def dead_peer_run() -> dict[str, Any]:
    bound = FAST.dead_after_s + FAST.heartbeat_s
    out: dict[str, Any] = {"swarm": DEAD_SWARM, "bound_s": bound}
    with tempfile.TemporaryDirectory(prefix="bench-discovery-") as tmp:
        async with running_swarm(DEAD_SWARM, Path(tmp), FAST) as swarm:
            await _kill_and_watch(out, swarm, Path(tmp))
    out["crashes"] = swarm.crashes
    return out


async def _kill_and_watch(out: dict[str, Any], swarm: Swarm, root: Path) -> None:
    """Start the victim, wait until every node links it, SIGKILL it, watch it go."""
    # Only the victim has to be seen by all: the swarm's own view may flap (see 1.)
    if await wait_for(lambda: len(swarm.started_s) == DEAD_SWARM - 1, START_BOUND_S) is None:
        out["error"] = f"not all started in {START_BOUND_S} s"
        return
    command = [sys.executable, "-m", "node.cli", "daemon", "--listen", LOOPBACK]
    command += ["--no-cuda-probe", "--no-mdns", "--model", "fake:victim"]
    command += ["--bootstrap", swarm.nodes[0].addrs[0], "--heartbeat", "1"]
    command += ["--dead-after", "5", "--data-dir", str(root / "victim")]
    with (root / "victim.stderr").open("wb") as stderr:
        proc = await trio.lowlevel.open_process(
            command, stdout=subprocess.PIPE, stderr=stderr, cwd=REPO
        )
    try:
        victim, _addr = await read_banner(proc)
        seen = await wait_for(
            lambda: all(victim in linked(n) for n in swarm.nodes), VICTIM_LINKED_S
        )
        watchers = [i for i, n in enumerate(swarm.nodes) if victim in linked(n)]
        out["victim_linked_by_all_s"] = seen
        out["victim_linked_by"] = f"{len(watchers)}/{len(swarm.nodes)}"
        out["victim_elsewhere"] = {
            i: _status_of(swarm.nodes[i], victim)
            for i in range(len(swarm.nodes))
            if i not in watchers
        }
        if not watchers:
            out["error"] = f"no node linked the victim in {VICTIM_LINKED_S} s"
            return
        proc.kill()  # SIGKILL: no goodbye
        killed = trio.current_time()
        unlinked: dict[int, float] = {}
        dropped: dict[int, float] = {}
        back: dict[int, str] = {}
        later: dict[int, float] = {}
        how: Counter[str] = Counter()  # its status when it left live_peers
        while (now := trio.current_time()) - killed < WATCH_AFTER_KILL_S:
            for i in watchers:  # the nodes that linked it
                node = swarm.nodes[i]
                assert node.membership is not None
                peer = node.membership.table.peers.get(victim)
                if i not in unlinked and victim not in linked(node):
                    unlinked[i] = now - killed
                    how[str(peer.status) if peer else "dropped"] += 1
                if i not in dropped and peer is None:
                    dropped[i] = now - killed
                elif i not in dropped and peer is not None and peer.last_seen > killed:
                    # A dead peer sends nothing: only a Discovered hint moves this.
                    later[i] = max(later.get(i, 0.0), peer.last_seen - killed)
                elif i in dropped and peer is not None and i not in back:
                    found = ",".join(sorted(str(s) for s in peer.sources))
                    back[i] = f"{now - killed:.1f} s ({peer.status}, found by {found})"
            await trio.sleep(POLL_S)
        out["unlinked_s"] = spread(list(unlinked.values())) if unlinked else None
        out["dropped_s"] = spread(list(dropped.values())) if dropped else None
        out["dropped_by"] = f"{len(dropped)}/{len(watchers)}"
        out["back_in_table"] = back
        out["seen_after_kill_s"] = later
        out["left_live_peers_as"] = dict(how)
    finally:
        if proc.returncode is None:
            proc.kill()
        with trio.move_on_after(5) as scope:
            scope.shield = True
            await proc.wait()


def _status_of(node: Node, peer_id: str) -> str:
    peer = None if node.membership is None else node.membership.table.peers.get(peer_id)
    if peer is None:
        return "not in its table"
    return str(peer.status) + (f" ({peer.reason[:120]})" if peer.reason else "")


async def in_process(sizes: list[int], window_s: float, dead: bool) -> dict[str, Any]:
    """Sections 1, 3 and 4 (loopback); Ctrl-C or SIGTERM cancels them all.

    Trio would raise KeyboardInterrupt wherever the code happens to be, py-libp2p's
    ``except BaseException`` blocks included: a signal receiver turns the signal
    into one cancellation, always seen here.
    """
    results: dict[str, Any] = {}
    interrupted = False

    async def watch(signals: Any, scope: trio.CancelScope) -> None:
        nonlocal interrupted
        async for _ in signals:
            interrupted = True
            scope.cancel()
            return

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch, signals, nursery.cancel_scope)
            await _in_process(results, sizes, window_s, dead)
            nursery.cancel_scope.cancel()
    if interrupted:
        raise KeyboardInterrupt
    return results


async def _in_process(
    results: dict[str, Any], sizes: list[int], window_s: float, dead: bool
) -> None:
    baseline = net_counter()
    await trio.sleep(BASELINE_S)
    results["lo_baseline_bytes_s"] = (net_counter() - baseline) / BASELINE_S
    results["loopback"] = []
    for n in sizes:
        progress(f"... bootstrap + DHT, {n} in-process nodes")
        try:
            results["loopback"].append(await loopback_run(n, window_s, traffic=n == 10))
        except Exception as exc:
            results["loopback"].append({"n": n, "error": describe(exc)})
    if dead:
        progress("... dead peer drop")
        try:
            results["dead_peer"] = await dead_peer_run()
        except Exception as exc:
            results["dead_peer"] = {"error": describe(exc)}


# --------------------------------------------------------------------------- mDNS in namespaces


@contextmanager
def private_namespace() -> Iterator[str]:
    """A namespace with only ``lo`` (up): its counters see nothing but what runs in it."""
    ns = f"{PREFIX}{os.getpid()}-lo"
    try:
        ip("netns", "add", ns)
        ip("-n", ns, "link", "set", "lo", "up")
        yield ns
    finally:
        delete_namespaces([ns])


def loopback_sections(args: argparse.Namespace) -> dict[str, Any]:
    """Sections 1, 3 and 4 (loopback), in a namespace of their own when one can be made.

    The in-process swarms and the victim then share a ``lo`` that nothing else on
    the machine touches, so its byte counter is theirs alone.
    """
    if reason := why_namespaces_cannot_be_made(PREFIX):
        warnings = WarningLog.install()
        here = trio.run(in_process, sizes_of(args.sizes), args.window, not args.no_dead)
        here["warnings"] = warnings.lines()
        here["isolation"] = f"none ({reason}): lo is the machine's, which must be quiet"
        return here
    remove_stale_namespaces(PREFIX)
    with private_namespace() as ns:
        command = ["ip", "netns", "exec", ns, sys.executable, str(Path(__file__).resolve())]
        command += ["--loopback-child", "--sizes", args.sizes, "--window", str(args.window)]
        command += ["--no-dead"] if args.no_dead else []
        proc = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True, cwd=REPO
        )
        try:
            out, _ = proc.communicate(timeout=LOOPBACK_BOUND_S)
        except subprocess.TimeoutExpired:
            return {"error": f"the loopback sections did not end in {LOOPBACK_BOUND_S:.0f} s"}
        finally:
            if proc.poll() is None:  # interrupted or timed out: it stops on SIGINT
                proc.send_signal(signal.SIGINT)
                with suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=PROC_STOP_S)
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=5)
    if proc.returncode == 130:
        raise KeyboardInterrupt
    if proc.returncode != 0 or not out.strip():
        return {"error": f"the loopback sections exited {proc.returncode} (stderr above)"}
    results: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    results["isolation"] = f"a network namespace of its own ({ns}): lo carries only the swarm"
    return results


@dataclass
class NodeProcess:
    index: int
    namespace: str
    proc: subprocess.Popen[str]
    log: Path
    lines: queue.Queue[tuple[float, dict[str, Any]] | None] = field(default_factory=queue.Queue)
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
            command = ["ip", "netns", "exec", ns, sys.executable, str(Path(__file__).resolve())]
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
            assert node.membership is not None
            table = node.membership.table
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


# --------------------------------------------------------------------------- report


def fmt_s(value: float | None) -> str:
    return "not reached" if value is None else f"{value:6.2f} s"


def spread_text(s: dict[str, float] | None) -> str:
    return (
        "never"
        if s is None
        else f"min {s['min']:.2f} s, median {s['median']:.2f} s, max {s['max']:.2f} s"
    )


class Summary(list[dict[str, str]]):
    def add(self, figure: str, value: str, target: str, ok: bool) -> None:
        self.append(
            {
                "figure": figure,
                "value": value,
                "target": target,
                "verdict": "met" if ok else "NOT met",
            }
        )


def report_loopback(r: dict[str, Any], summary: Summary) -> None:
    print("1. Bootstrap + DHT on loopback, in-process nodes (one trio process)")
    print(f"   {'N':>4} {'all started':>12} {'full view':>12} {'most whole':>11}  {'stop':>8}")
    for run in r.get("loopback", []):
        if "error" in run:
            print(f"   {run['n']:>4}  failed: {run['error']}")
            continue
        took, stop = run["full_view_s"], "clean" if run["stopped_cleanly"] else "cut off"
        print(
            f"   {run['n']:>4} {fmt_s(run['all_started_s']):>12} {fmt_s(took):>12}"
            f" {run['most_with_full_view']:>5}/{run['n']:<5} {run['stop_s']:6.1f} s {stop}"
        )
        print(f"        tables then: {run['tables']}; records refused so far: {run['refused']}")
        for crash in run["crashes"]:
            print(f"        {crash}")
        if run["n"] == 10:
            ok = took is not None and took < TARGET_VIEW_S
            summary.add("full view, 10 nodes, bootstrap + DHT", fmt_s(took), "< 5 s", ok)
    print("   (full view: every node's live_peers holds every other, each with a verified")
    print("   record; timed from the launch of nodes 1..N-1, node 0 already up, bounded at")
    print(f"   {FULL_VIEW_BOUND_S:.0f} s. most whole: most nodes seen at once with a full view)")


def report_mdns(mdns: dict[str, Any], summary: Summary) -> None:
    print("2. mDNS, one process per network namespace on one bridge")
    if "skipped" in mdns:
        print(f"   skipped: {mdns['skipped']}")
        return
    print(f"   {'N':>4} {'all ready':>12} {'full view':>12} {'from spawn':>12}  stop")
    for run in mdns["runs"]:
        if "full_view_from_ready_s" in run:
            print(
                f"   {run['n']:>4} {fmt_s(run['all_ready_s']):>12} "
                f"{fmt_s(run['full_view_from_ready_s']):>12} "
                f"{fmt_s(run['full_view_from_spawn_s']):>12}  "
                f"{'; '.join(run.get('stop_problems', [])) or 'clean'}"
            )
        elif "progress" in run:
            bound = PROC_READY_S + FULL_VIEW_BOUND_S
            print(f"   {run['n']:>4}  no full view in {bound:.0f} s: {run['progress']}")
        if "error" in run:
            print(f"   {run['n']:>4}  failed: {run['error']}")
        for line in run.get("warnings", []):
            print(f"        node log: {line}")
        if run["n"] == 10:
            took = run.get("full_view_from_ready_s")
            ok = took is not None and took < TARGET_VIEW_S
            summary.add("full view, 10 nodes, mDNS (from all ready)", fmt_s(took), "< 5 s", ok)
    print("   (full view timed from the last node ready, and from all processes spawned)")


def report_dead(dead: dict[str, Any] | None, summary: Summary) -> None:
    print("3. Dead peer (SIGKILLed daemon process), heartbeat 1 s, dead after 5 s")
    if dead is None:
        print("   not measured (--no-dead)")
        return
    for crash in dead.get("crashes", []):
        print(f"   {crash}")
    if "error" in dead:
        print(f"   failed: {dead['error']}")
        for i, status in sorted(dead.get("victim_elsewhere", {}).items()):
            print(f"     node {i} had it as: {status}")
        summary.add("dead peer dropped", "failed", "within the configured bound", False)
        return
    if (took := dead["victim_linked_by_all_s"]) is not None:
        print(
            f"   {DEAD_SWARM} in-process nodes; all linked the victim {took:.1f} s after its banner"
        )
    else:
        print(
            f"   {DEAD_SWARM} in-process nodes; only {dead['victim_linked_by']} linked the victim "
            f"within {VICTIM_LINKED_S:.0f} s; measured on those. The others had it as:"
        )
        for i, status in sorted(dead["victim_elsewhere"].items()):
            print(f"     node {i}: {status}")
    print(f"   left live_peers      {spread_text(dead['unlinked_s'])}")
    how = ", ".join(f"{c} {st}" for st, c in dead["left_live_peers_as"].items())
    print(f"     (its status in the table when it left: {how})")
    print(f"   dropped from table   {spread_text(dead['dropped_s'])}")
    bound = dead["bound_s"]
    print(f"   dropped by {dead['dropped_by']} nodes; bound dead_after + heartbeat = {bound:.0f} s")
    if later := dead["seen_after_kill_s"]:
        print(
            f"   its last_seen moved past the kill on {len(later)} node(s), by up to "
            f"{max(later.values()):.1f} s: a dead peer sends nothing, so a discovery hint"
        )
        print("   (a DHT provider record, for one) was taken as evidence that it was alive")
    if back := dead["back_in_table"]:
        print(f"   back in the table of {len(back)} node(s) within {WATCH_AFTER_KILL_S:.0f} s:")
        for i, what in sorted(back.items()):
            print(f"     node {i}: at {what}")
    target = f"<= {bound:.0f} s (dead_after + heartbeat)"
    for figure, key in (
        ("dead peer out of live_peers (max)", "unlinked_s"),
        ("dead peer dropped from the table (max)", "dropped_s"),
    ):
        s = dead[key]
        dropped, watched = dead["dropped_by"].split("/")
        everywhere = key == "unlinked_s" or dropped == watched
        ok = s is not None and everywhere and s["max"] <= bound
        summary.add(figure, "never" if s is None else f"{s['max']:6.2f} s", target, ok)


def report_traffic(r: dict[str, Any], window_s: float, summary: Summary) -> None:
    print(f"4. Membership traffic at rest ({SETTLE_S:.0f} s after the full view, {window_s:.0f} s)")
    target = f"< {TARGET_BYTES_S:.0f} B/s"
    lo = next((x.get("traffic") for x in r.get("loopback", []) if x.get("n") == 10), None)
    if lo is None:
        print("   loopback: not measured (no 10-node full view)")
    else:
        rate = lo["per_node_bytes_s"]
        print(
            f"   loopback, 10 nodes: {lo['bytes']} bytes on lo in {lo['window_s']:.1f} s = "
            f"{rate:.0f} B/s per node (lo before the swarms: {r['lo_baseline_bytes_s']:.0f} B/s)"
        )
        print(
            f"     at the end {lo['with_full_view_at_end']}/10 nodes had a full view; "
            f"records refused in the window: {lo['refused_in_window']}"
        )
        print(f"     tables at the end: {lo['tables_at_end']}")
        summary.add(
            "traffic per node at rest, bootstrap + DHT",
            f"{rate:6.0f} B/s",
            target,
            rate < TARGET_BYTES_S,
        )
    runs = [x for x in r["mdns"].get("runs", []) if x.get("traffic")]
    if not runs:
        print("   mDNS: not measured (" + r["mdns"].get("skipped", "no full view") + ")")
        return
    n, mt = runs[0]["n"], runs[0]["traffic"]
    rate = mt["per_node_bytes_s"]
    print(
        f"   mDNS, {n} nodes: {mt['bytes']} bytes sent on the veths in {mt['window_s']:.1f} s"
        f" = {rate:.0f} B/s per node"
    )
    print(
        f"     (mDNS itself: {mt['per_node_udp_datagrams_s']:.2f} UDP datagrams/s per node); "
        f"full view kept: {mt['full_view_kept']}; records refused: {mt['refused']}"
    )
    print(f"     tables at the end: {mt['tables_at_end']}")
    summary.add(
        f"traffic per node at rest, mDNS, {n} nodes",
        f"{rate:6.0f} B/s",
        target,
        rate < TARGET_BYTES_S,
    )


def report(r: dict[str, Any], window_s: float) -> Summary:
    summary = Summary()
    print(f"\nMachine: {os.cpu_count()} CPUs. Loopback runs isolated in: {r.get('isolation')}")
    if "error" in r:
        print(f"Loopback sections failed: {r['error']}")
    print()
    report_loopback(r, summary)
    print()
    report_mdns(r["mdns"], summary)
    print()
    report_dead(r.get("dead_peer"), summary)
    print()
    report_traffic(r, window_s, summary)
    print()
    if r.get("warnings"):
        print("Warnings the in-process nodes logged:")
        for line in r["warnings"]:
            print(f"   {line}")
        print()
    print("Summary (targets from issue 3)")
    width = max((len(row["figure"]) for row in summary), default=10)
    for row in summary:
        print(
            f"   {row['figure']:<{width}}  {row['value']:>11}  {row['target']:<32} {row['verdict']}"
        )
    return summary


def sizes_of(text: str) -> list[int]:
    return [int(n) for n in text.split(",") if n]


def interrupted(exc: BaseException) -> bool:
    """Ctrl-C, possibly inside a nursery's exception group."""
    if isinstance(exc, BaseExceptionGroup):
        return exc.split(KeyboardInterrupt)[0] is not None
    return isinstance(exc, KeyboardInterrupt)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--node", help=argparse.SUPPRESS)
    parser.add_argument("--index", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", help=argparse.SUPPRESS)
    parser.add_argument("--loopback-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--sizes", default="3,10,30", help="loopback swarm sizes")
    parser.add_argument("--mdns-sizes", default="3,10", help="mDNS swarm sizes")
    parser.add_argument("--window", type=float, default=20.0, help="traffic window, seconds")
    parser.add_argument("--no-dead", action="store_true", help="skip the dead-peer run")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    if args.node:  # one mDNS node, inside its namespace
        logs.configure("WARNING")
        trio.run(serve_one, args)
        return 0
    if args.loopback_child:  # sections 1, 3, 4 inside their namespace; JSON on stdout
        warnings = WarningLog.install()
        try:
            results = trio.run(in_process, sizes_of(args.sizes), args.window, not args.no_dead)
        except BaseException as exc:
            if interrupted(exc):
                return 130
            raise
        print(json.dumps({**results, "warnings": warnings.lines()}, default=str))
        return 0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks
    started = time.monotonic()
    try:
        results = loopback_sections(args)
        results["mdns"] = mdns_section(sizes_of(args.mdns_sizes), args.window)
    except BaseException as exc:
        if not interrupted(exc):
            raise
        print("interrupted: nodes stopped, processes killed, namespaces deleted", file=sys.stderr)
        return 130
    results["summary"] = report(results, args.window)
    print(f"\n(total {time.monotonic() - started:.0f} s)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
