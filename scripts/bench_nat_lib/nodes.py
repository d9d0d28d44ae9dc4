"""The swarm scripts/bench_nat.py measures: real ``swarm daemon`` processes in the
network namespaces of scripts/netns.nat_topology.

One public node R (10.88.0.1: the bootstrap, a relay) and three homes, each
behind its own MASQUERADE router that lets in replies only and drops unsolicited
SYNs silently: A (192.168.1.2) and B (192.168.2.2) behind routers that keep
ports (a hole punch works there), C (192.168.3.2) behind one that picks a new
random port per connection (``--random-fully``: the punch fails, the relay
carries A-C). Each node serves one fake model of its own name (``fake:echo-r``,
``-a``, ``-b``, ``-c``: no latency), so a job's model says where it runs.

Every daemon is started with ``ip netns exec`` as a process of its own group
and asked on its local socket (a Unix socket: no network namespace between us),
both for jobs (``LocalClient``: the CLI's client, without a CLI process) and for
its status view. Each node reads a config file that turns spot checks off
(``[verify] rate = 0``), so the jobs a server ran are exactly the ones we sent.
Every wait is bounded; the processes are killed, and the namespaces deleted, on
the way out.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
from netns import NatTopology, nat_topology, remove_stale_namespaces, why_nat_cannot_be_made

from node.cli.local_client import LocalClient
from node.data_dir import SOCKET_FILE

REPO = Path(__file__).resolve().parents[2]
PREFIX = "sbn"  # namespaces sbn<pid>-pub, -r0, -n1, -h1x0, ...
PORT = 7420
READY_BOUND_S = 60.0  # one interpreter importing libp2p among four on two shared cores
STOP_BOUND_S = 10.0
VIEW_TIMEOUT_S = 10.0
CLOCK_TICK = os.sysconf("SC_CLK_TCK")


def child_env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}


@dataclass
class Daemon:
    """One node: its namespace, address, data dir and flags; its process once started."""

    name: str
    ns: str
    ip: str
    data_dir: Path
    args: tuple[str, ...]
    model: str  # the fake model it serves (its name: "echo-" + this node's)
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0  # trio.current_time() at the Popen
    ready_at: float = 0.0  # when its banner was seen (polled every 50 ms)
    peer_id: str = ""
    addr: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def log(self) -> Path:
        return self.data_dir.with_name(f"{self.name}.log")

    @property
    def socket(self) -> Path:
        return self.data_dir / SOCKET_FILE

    def start(self) -> None:
        command = ["ip", "netns", "exec", self.ns, sys.executable, "-m", "node.cli"]
        command += ["--log-level", "INFO", "daemon", "--listen", f"/ip4/{self.ip}/tcp/{PORT}"]
        command += ["--no-cuda-probe", "--no-mdns", "--http", "off"]
        command += ["--data-dir", str(self.data_dir), "--model", f"fake:{self.model}", *self.args]
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                env=child_env(),
                start_new_session=True,  # its own group: killpg reaches it alone
            )
        self.started_at = trio.current_time()

    async def wait_ready(self, bound_s: float = READY_BOUND_S) -> Daemon:
        with trio.move_on_after(bound_s):
            while True:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.name} exited {self.proc.returncode}:\n{self.tail()}")
                text = self.log.read_text(errors="replace")
                if "  serving " in text:
                    for line in text.splitlines():
                        if line.startswith("swarm node ") and line.endswith(" ready"):
                            self.peer_id = line.split()[2]
                        elif line.startswith("  listening on "):
                            self.addr = line.removeprefix("  listening on ").strip()
                    self.ready_at = trio.current_time()
                    return self
                await trio.sleep(0.05)
        raise RuntimeError(f"{self.name} not ready within {bound_s} s:\n{self.tail()}")

    def tail(self, n: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else "(no log)"

    def cpu_s(self) -> float:
        """User + system CPU seconds so far (``ip netns exec`` execs the daemon: same pid)."""
        if self.proc is None:
            return 0.0
        try:
            stat = Path(f"/proc/{self.proc.pid}/stat").read_text()
        except OSError:
            return 0.0
        fields = stat.rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICK

    async def view(self) -> dict[str, Any]:
        async with LocalClient.connect(self.socket, peer_id=self.name) as client:
            with trio.fail_after(VIEW_TIMEOUT_S):
                record = await client.record()
        return dict(record.body["view"])

    async def reach(self) -> dict[str, Any]:
        return dict((await self.view())["reach"])

    async def kind_of(self, other: Daemon) -> str | None:
        kind = (await self.reach())["connections"].get(other.peer_id)
        return None if kind is None else str(kind)

    def stop(self) -> None:
        """SIGTERM its group, a bounded wait, then SIGKILL."""
        if self.proc is None or self.proc.poll() is not None:
            return
        with suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(STOP_BOUND_S)
        except subprocess.TimeoutExpired:
            with suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            with suppress(subprocess.TimeoutExpired):
                self.proc.wait(STOP_BOUND_S)


@dataclass
class NatSwarm:
    top: NatTopology
    r: Daemon
    a: Daemon
    b: Daemon
    c: Daemon

    @property
    def all(self) -> list[Daemon]:
        return [self.r, self.a, self.b, self.c]

    def name_of(self, peer_id: str) -> str:
        return next((d.name for d in self.all if d.peer_id == peer_id), peer_id[-6:])


def why_not() -> str | None:
    """None when this machine can make the NAT testbed (root, ip, iptables)."""
    return why_nat_cannot_be_made(PREFIX)


@asynccontextmanager
async def nat_swarm(
    root: Path, *, said: bool, relay_bandwidth: int | None
) -> AsyncIterator[NatSwarm]:
    """The topology and its four daemons, none started yet (the caller starts them and
    times it); every one stopped, then the namespaces deleted, on the way out.

    ``said``: R runs ``--reachability public`` and the homes ``private``; else every
    node learns its reachability from dial-backs (the default, as a user starts it).
    ``relay_bandwidth``: R's ``[relay] circuit_bandwidth`` (bytes/s, 0 unlimited;
    None: the daemon's default)."""
    remove_stale_namespaces(PREFIX)
    common = "[verify]\nrate = 0\n"
    relay = common
    if relay_bandwidth is not None:
        relay += f"\n[relay]\ncircuit_bandwidth = {relay_bandwidth}\n"
    with nat_topology(
        prefix=PREFIX,
        public_hosts=1,
        homes=(1, 1, 1),
        random_ports=(False, False, True),
        silent_drop=True,
    ) as top:
        nodes: list[Daemon] = []

        def node(name: str, ns: str, ip: str, config: str, reach: str) -> Daemon:
            path = root / f"{name}.toml"
            path.write_text(config)
            args = ("--config", str(path), *(("--reachability", reach) if said else ()))
            made = Daemon(name, ns, ip, root / name, args, f"echo-{name}")
            nodes.append(made)
            return made

        try:
            swarm = NatSwarm(
                top,
                node("r", top.public[0], top.public_ips[0], relay, "public"),
                node("a", top.homes[0][0], top.home_ips[0][0], common, "private"),
                node("b", top.homes[1][0], top.home_ips[1][0], common, "private"),
                node("c", top.homes[2][0], top.home_ips[2][0], common, "private"),
            )
            yield swarm
        finally:
            for d in nodes:
                if d.proc is not None and d.proc.poll() is None:
                    with suppress(ProcessLookupError):
                        os.killpg(d.proc.pid, signal.SIGTERM)
            for d in nodes:
                d.stop()


def warnings(swarm: NatSwarm) -> list[str]:
    """The nodes' WARNING/ERROR lines, counted, without time stamps."""
    counts: Counter[str] = Counter()
    for d in swarm.all:
        if not d.log.exists():
            continue
        for line in d.log.read_text(errors="replace").splitlines():
            if " WARNING " in line or " ERROR " in line:
                counts[f"{d.name}: {line.split(' ', 2)[-1][:160]}"] += 1
    return [f"{c:>4} x {text}" for text, c in counts.most_common(12)]
