"""Reachability across NAT routers, with real ``swarm daemon`` processes in network
namespaces (scripts/netns.nat_topology, ../shared/design/NAT_TESTBED.md).

The swarm: two public nodes on the bridge (R 10.88.0.1, the bootstrap, and P
10.88.0.2), A in home 1 (192.168.1.2) and B in home 2 (192.168.2.2), each home
behind a MASQUERADE router that lets in replies only and drops unsolicited SYNs
silently. Every node listens on 0.0.0.0 (the default), starts with
``--bootstrap R`` and nothing else; no relay runs (``--relay-service off`` where
that flag exists).

- P learns from dial-backs that it is public, announces its bridge address and
  is dialled directly by A.
- A and B learn they are private (the dial-back to their router's address is
  dropped) and announce no address: the bootstrap lists them at none, never at
  a 192.168.x one.
- A's job for the model only B serves is answered through a peer that links B
  (R or P: one more hop), and A's ``swarm status`` says why.

The daemons are shared by the tests of this module (~3 s each to start); CLI
calls reach them through each data dir's local socket, which no network
namespace hides. Every wait is bounded; processes and namespaces go in a
``finally``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from netns import NatTopology, nat_topology, remove_stale_namespaces, why_nat_cannot_be_made

from node.cli import parser as cli_parser

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
PREFIX = "swr"  # namespaces swr<pid>-... (the shared swarm's)
PREFIX_3 = "swq"  # the three-node test's (it runs first, alone)
PORT = 7420
READY_BOUND_S = 40.0  # four interpreters importing libp2p at once on two cores
VERDICT_BOUND_S = 20.0  # a NATed node's dial-back waits out a dropped SYN (4 s)
LINK_BOUND_S = 45.0  # A links P from R's peer sample (pulled when R's record changes)
CLI_TIMEOUT_S = 30.0


def relay_off() -> list[str]:
    """``--relay-service off`` once the relay work adds it: no relay in this swarm."""
    parser = cli_parser.build()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    flags = {o for a in sub.choices["daemon"]._actions for o in a.option_strings}
    return ["--relay-service", "off"] if "--relay-service" in flags else []


@dataclass
class Daemon:
    name: str
    namespace: str
    data_dir: Path
    proc: subprocess.Popen[str]
    peer_id: str = ""

    def log(self) -> str:
        with suppress(OSError):
            return (self.data_dir.parent / f"{self.name}.log").read_text()[-4000:]
        return ""


def env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}


def start(root: Path, name: str, namespace: str, *args: str) -> Daemon:
    data_dir = root / name
    data_dir.mkdir(parents=True)
    command = ["ip", "netns", "exec", namespace, sys.executable, "-m", "node.cli"]
    command += ["daemon", "--data-dir", str(data_dir), "--no-cuda-probe", "--no-mdns"]
    command += ["--http", "off", "--heartbeat", "1", "--dead-after", "6", *relay_off(), *args]
    log = open(root / f"{name}.log", "w")  # noqa: SIM115 (the child holds it; closed below)
    proc = subprocess.Popen(
        command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
        text=True, cwd=REPO, env=env(), start_new_session=True,
    )  # fmt: skip
    log.close()
    return Daemon(name, namespace, data_dir, proc)


def swarm(daemon: Daemon, *args: str) -> Any:
    """``swarm ARGS --json --data-dir D`` from here (the daemon's local socket)."""
    done = subprocess.run(
        [sys.executable, "-m", "node.cli", *args, "--json", "--data-dir", str(daemon.data_dir)],
        capture_output=True, text=True, timeout=CLI_TIMEOUT_S, cwd=REPO, env=env(), check=False,
    )  # fmt: skip
    assert done.returncode == 0, f"swarm {args} on {daemon.name}: {done.stdout}{done.stderr}"
    return json.loads(done.stdout)


def wait_for(what: str, check: Callable[[], Any], bound_s: float, daemons: list[Daemon]) -> Any:
    deadline = time.monotonic() + bound_s
    last: Any = None
    while time.monotonic() < deadline:
        for d in daemons:
            if d.proc.poll() is not None:
                pytest.fail(f"{d.name} exited {d.proc.returncode}:\n{d.log()}")
        with suppress(AssertionError, subprocess.TimeoutExpired, json.JSONDecodeError):
            last = check()
            if last:
                return last
        time.sleep(0.3)
    logs = "\n".join(f"--- {d.name}\n{d.log()}" for d in daemons)
    pytest.fail(f"{what} not within {bound_s} s (last: {last}):\n{logs}")


@dataclass
class Swarm:
    top: NatTopology
    r: Daemon
    p: Daemon
    a: Daemon
    b: Daemon
    started: float  # when the last node was started (time.monotonic)

    @property
    def all(self) -> list[Daemon]:
        return [self.r, self.p, self.a, self.b]


def ready(daemon: Daemon) -> Callable[[], str]:
    """Its peer id once it is ready (daemon.json is written then), else ""."""

    def peer_id() -> str:
        state = daemon.data_dir / "daemon.json"
        return str(json.loads(state.read_text())["peer_id"]) if state.exists() else ""

    return peer_id


def verdict_is(daemon: Daemon, want: str) -> Callable[[], dict[str, Any]]:
    def check() -> dict[str, Any]:
        view = reach(daemon)
        return view if view["reach"] == want else {}

    return check


@contextmanager
def daemons_in(
    top: NatTopology,
    root: Path,
    first: tuple[str, str, list[str]],
    *rest: tuple[str, str, list[str]],
) -> Iterator[tuple[dict[str, Daemon], float]]:
    """``first`` (name, namespace, flags) started and ready, then the ``rest`` with
    ``--bootstrap`` it; yields them by name and when the last ones were started."""
    daemons: list[Daemon] = []
    try:
        name, ns, args = first
        boot = start(root, name, ns, *args)
        daemons.append(boot)
        boot.peer_id = wait_for(f"{name} ready", ready(boot), READY_BOUND_S, daemons)
        flag = ["--bootstrap", f"/ip4/{top.ip_of(ns)}/tcp/{PORT}/p2p/{boot.peer_id}"]
        daemons += [start(root, name, ns, *args, *flag) for name, ns, args in rest]
        started = time.monotonic()
        for d in daemons[1:]:
            d.peer_id = wait_for(f"{d.name} ready", ready(d), READY_BOUND_S, daemons)
        yield {d.name: d for d in daemons}, started
    finally:
        for d in daemons:
            if d.proc.poll() is None:
                with suppress(ProcessLookupError):
                    os.killpg(d.proc.pid, signal.SIGTERM)
        for d in daemons:
            try:
                d.proc.wait(10)
            except subprocess.TimeoutExpired:
                with suppress(ProcessLookupError):
                    os.killpg(d.proc.pid, signal.SIGKILL)
                d.proc.wait(5)


def skip_without_nat(prefix: str) -> None:
    if why := why_nat_cannot_be_made(prefix):
        pytest.skip(why)
    remove_stale_namespaces(prefix)


@pytest.fixture(scope="module")
def natted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Swarm]:
    skip_without_nat(PREFIX)
    root = tmp_path_factory.mktemp("natted")
    with nat_topology(prefix=PREFIX, public_hosts=2, homes=(1, 1)) as top:
        (r_ns, p_ns), (a_ns, b_ns) = top.public, (top.homes[0][0], top.homes[1][0])
        with daemons_in(
            top,
            root,
            ("r", r_ns, ["--no-models"]),
            ("p", p_ns, ["--model", "fake:pub"]),
            ("a", a_ns, ["--no-models"]),
            ("b", b_ns, ["--model", "fake:echo"]),
        ) as (d, started):
            yield Swarm(top, d["r"], d["p"], d["a"], d["b"], started)


def reach(daemon: Daemon) -> dict[str, Any]:
    found: dict[str, Any] = swarm(daemon, "status")["view"]["reach"]
    return found


def test_three_nodes_a_job_reaches_the_provider_through_the_one_peer_that_can(
    tmp_path: Path,
) -> None:
    """Only R (public, no relay, no models) links B; A's job for B's model takes the
    hops A -> R -> B, and R is the peer A's status names."""
    skip_without_nat(PREFIX_3)
    with nat_topology(prefix=PREFIX_3, public_hosts=1, homes=(1, 1)) as top:
        (r_ns,), (a_ns, b_ns) = top.public, (top.homes[0][0], top.homes[1][0])
        with daemons_in(
            top,
            tmp_path,
            ("r", r_ns, ["--no-models"]),
            ("a", a_ns, ["--no-models"]),
            ("b", b_ns, ["--model", "fake:echo"]),
        ) as (d, started):
            r, a, b = d["r"], d["a"], d["b"]

            def through_r() -> dict[str, Any]:
                found: dict[str, Any] = reach(a)["forwarding"].get("echo", {})
                return found

            entry = wait_for("A knows echo through R", through_r, LINK_BOUND_S, [r, a, b])
            known = time.monotonic() - started
            result = swarm(a, "submit", "echo", "two hops")
            assert entry["via"] == [r.peer_id]
            assert result["meta"]["served_by"] == b.peer_id
            assert result["meta"]["via"] == r.peer_id
            print(f"three nodes: A knew echo through R {known:.1f} s after the start")


def test_natted_nodes_learn_they_are_private_and_announce_no_private_address(
    natted: Swarm,
) -> None:
    wans = natted.top.router_wan_ips
    for node, wan in ((natted.a, wans[0]), (natted.b, wans[1])):
        view = wait_for(
            f"{node.name} private", verdict_is(node, "private"), VERDICT_BOUND_S, natted.all
        )
        assert view["why"].startswith("behind a NAT: ") and f"sees us at {wan}" in view["why"]
        assert view["announced"] == [] and view["refuted"] == [f"/ip4/{wan}/tcp/{PORT}"]
        assert wan in view["observed"]
        body = swarm(node, "status")
        assert body["addrs"] == [] and body["reach"] == "private" and "relay" not in body
    print(f"private verdicts within {time.monotonic() - natted.started:.1f} s of the start")

    def listed() -> dict[str, Any]:
        rows = {r["peer_id"]: r for r in swarm(natted.r, "peers")["peers"]}
        both = all(rows.get(n.peer_id, {}).get("status") == "linked" for n in (natted.a, natted.b))
        return rows if both else {}

    rows = wait_for("R links A and B", listed, VERDICT_BOUND_S, natted.all)
    for node in (natted.a, natted.b):
        addrs = rows[node.peer_id]["addrs"]
        assert not [a for a in addrs if "/192.168." in a], addrs
        assert addrs == []  # nothing to dial: no private address, no relay


def test_a_public_node_learns_it_is_public_and_is_dialled_directly(natted: Swarm) -> None:
    p_ip = natted.top.public_ips[1]
    mine = f"/ip4/{p_ip}/tcp/{PORT}/p2p/{natted.p.peer_id}"
    view = wait_for("P public", verdict_is(natted.p, "public"), VERDICT_BOUND_S, natted.all)
    assert view["announced"] == [mine] and "over fresh connections" in view["why"]
    assert view["relays_held"] == []
    print(f"P public within {time.monotonic() - natted.started:.1f} s of the start")
    assert reach(natted.r)["reach"] == "public"

    def linked_p() -> dict[str, Any]:
        rows = {r["peer_id"]: r for r in swarm(natted.a, "peers")["peers"]}
        row = rows.get(natted.p.peer_id, {})
        return row if row.get("status") == "linked" else {}

    row = wait_for("A links P", linked_p, LINK_BOUND_S, natted.all)
    assert row["addrs"][0] == f"/ip4/{p_ip}/tcp/{PORT}"
    result = swarm(natted.a, "submit", "pub", "hello")
    assert result["meta"]["served_by"] == natted.p.peer_id and "via" not in result["meta"]


def test_a_job_reaches_a_natted_provider_through_a_peer_that_links_it(natted: Swarm) -> None:
    """No relay, and B cannot be dialled: A's job goes through R or P, which B dialled."""
    a, b = natted.a, natted.b

    def forwarding() -> dict[str, Any]:
        found: dict[str, Any] = reach(a)["forwarding"]
        return found if "echo" in found else {}

    entry = wait_for("A knows echo through a peer", forwarding, LINK_BOUND_S, natted.all)["echo"]
    assert set(entry["via"]) <= {natted.r.peer_id, natted.p.peer_id}
    assert "none can be dialled from this node" in entry["why"]
    started = time.monotonic()
    result = swarm(a, "submit", "echo", "across two NATs")
    took = time.monotonic() - started
    meta = result["meta"]
    assert meta["served_by"] == b.peer_id and meta["via"] in entry["via"]
    assert result["outputs"]
    print(f"echo across the NATs through {meta['via'][-8:]} in {took:.2f} s (CLI included)")
    text = subprocess.run(
        [sys.executable, "-m", "node.cli", "status", "--data-dir", str(a.data_dir)],
        capture_output=True, text=True, timeout=CLI_TIMEOUT_S, cwd=REPO, env=env(), check=True,
    ).stdout  # fmt: skip
    assert all(len(line) <= 80 for line in text.splitlines())
    flat = " ".join(" ".join(line.split()) for line in text.splitlines())
    assert "reach private: behind a NAT" in flat and "indirect echo via" in flat
    assert "1 job(s) answered through another peer" in flat
