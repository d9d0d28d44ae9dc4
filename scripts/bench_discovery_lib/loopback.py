"""Sections 1, 3 and 4: in-process swarms on loopback, the dead peer, traffic at rest."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
from netns import (  # scripts/netns.py
    delete_namespaces,
    ip,
    remove_stale_namespaces,
    why_namespaces_cannot_be_made,
)

from node.daemon import Node
from node.membership.config import MembershipConfig

from .common import (
    BASELINE_S,
    DEAD_SWARM,
    FAST,
    FULL_VIEW_BOUND_S,
    LISTENING,
    LOOPBACK,
    LOOPBACK_BOUND_S,
    POLL_S,
    PREFIX,
    PROC_STOP_S,
    REPO,
    SCRIPT,
    SETTLE_S,
    START_BOUND_S,
    STOP_BOUND_S,
    VICTIM_LINKED_S,
    VICTIM_READY_S,
    WATCH_AFTER_KILL_S,
    WarningLog,
    describe,
    linked,
    net_counter,
    node_config,
    progress,
    sizes_of,
    spread,
)

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
        return sum(n.services.membership.table.refusals for n in self.nodes if n.serving)

    def tables(self) -> str:
        """Entries of all the nodes' tables, by status."""
        counts = Counter(
            str(p.status)
            for n in self.nodes
            if n.serving
            for p in n.services.membership.table.peers.values()
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
    command += ["--dead-after", "5", "--data-dir", str(root / "victim"), "--http", "off"]
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
                peer = node.services.membership.table.peers.get(victim)
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
    peer = node.services.membership.table.peers.get(peer_id) if node.serving else None
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
        command = ["ip", "netns", "exec", ns, sys.executable, str(SCRIPT)]
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
