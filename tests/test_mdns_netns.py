"""mDNS between real processes, each in its own network namespace, over a bridge.

The test builds, as root, one namespace holding a Linux bridge and one
namespace per host, each joined to the bridge by a veth pair, with addresses
from 10.77.0.0/24 assigned only inside those namespaces (nothing is created
in, or routed to, the root namespace). Each host is a process
(tests/_mdns_host.py) started with ``ip netns exec``: a libp2p host, our mDNS
service and a caps handler. No address is given to anyone: every host must
find every other through mDNS, then fetch its capability record over libp2p.
Every wait is bounded; processes are killed and namespaces deleted in
``finally`` (deleting a namespace deletes its links and the bridge).
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from netns import bridged_namespaces, remove_stale_namespaces, why_namespaces_cannot_be_made

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
HELPER = REPO / "tests" / "_mdns_host.py"
HOSTS = 3
SUBNET = "10.77.0"  # host i gets SUBNET.(i + 2)/24, inside its namespace only
PREFIX = "swt"  # namespaces: swt<pid>-br, swt<pid>-h0, ...; <pid> is this test's
BRIDGE = "br-swarmtest"
READY_BOUND_S = 20.0  # interpreter and libp2p imports, in parallel
DISCOVERY_BOUND_S = 15.0  # all ready -> every host found every other and read its record
STOP_BOUND_S = 10.0


# Lines read from a child process and not yet taken; past this the reader thread
# waits (and the child with it) rather than holding an ever-growing backlog.
LINES_BUFFERED = 10_000


def _lines_queue() -> queue.Queue[Any]:
    return queue.Queue(LINES_BUFFERED)


@dataclass
class HostProcess:
    index: int
    namespace: str
    proc: subprocess.Popen[str]
    lines: queue.Queue[dict[str, Any] | None] = field(default_factory=_lines_queue)
    events: list[dict[str, Any]] = field(default_factory=list)
    exited: bool = False

    def start_reader(self) -> None:
        def read() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                with suppress(ValueError):
                    self.lines.put(json.loads(line))
            self.lines.put(None)

        threading.Thread(target=read, daemon=True).start()

    def drain(self) -> None:
        while True:
            try:
                event = self.lines.get_nowait()
            except queue.Empty:
                return
            if event is None:
                self.exited = True
            else:
                self.events.append(event)

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event"] == kind]

    def stderr_tail(self) -> str:
        with suppress(Exception):
            self.proc.kill()
            _, err = self.proc.communicate(timeout=5)
            return err[-3000:]
        return "(no stderr)"


@contextmanager
def host_processes(nss: list[str]) -> Iterator[list[HostProcess]]:
    hosts: list[HostProcess] = []
    try:
        for i, ns in enumerate(nss):
            command = ["ip", "netns", "exec", ns, sys.executable, str(HELPER)]
            command += ["--listen", f"/ip4/{SUBNET}.{i + 2}/tcp/0", "--name", f"h{i}"]
            proc = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                cwd=REPO,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
            hosts.append(HostProcess(i, ns, proc))
            hosts[-1].start_reader()
        yield hosts
    finally:
        for host in hosts:
            if host.proc.poll() is None:
                host.proc.kill()
        for host in hosts:
            with suppress(subprocess.TimeoutExpired):
                host.proc.communicate(timeout=5)


def wait_until(
    hosts: list[HostProcess], done: Any, bound_s: float, what: str, *, exiting: bool = False
) -> float:
    start = time.monotonic()
    while not done():
        for host in hosts:
            if host.exited and not exiting:
                pytest.fail(f"host {host.index} exited early: {host.stderr_tail()}")
        if time.monotonic() - start > bound_s:
            state = {h.index: h.events for h in hosts}
            pytest.fail(f"{what} not within {bound_s} s; events so far: {state}")
        time.sleep(0.05)
        for host in hosts:
            host.drain()
    return time.monotonic() - start


@pytest.fixture
def bridged() -> Iterator[list[str]]:
    reason = why_namespaces_cannot_be_made(PREFIX)
    if reason:
        pytest.skip(reason)
    remove_stale_namespaces(PREFIX)
    with bridged_namespaces(HOSTS, prefix=PREFIX, subnet=SUBNET, bridge=BRIDGE) as nss:
        yield nss


def test_hosts_in_separate_namespaces_find_each_other_and_read_records(
    bridged: list[str],
) -> None:
    with host_processes(bridged) as hosts:
        wait_until(hosts, lambda: all(h.of("ready") for h in hosts), READY_BOUND_S, "ready")
        ids = [h.of("ready")[0]["peer_id"] for h in hosts]
        for i, host in enumerate(hosts):
            (announced,) = host.of("ready")[0]["addrs"]  # its bridge address only, no loopback
            assert announced.startswith(f"/ip4/{SUBNET}.{i + 2}/tcp/"), announced
            assert announced.endswith(f"/p2p/{ids[i]}")

        def full_view() -> bool:
            return all(
                {e["peer_id"] for e in h.of("caps")} == set(ids) - {ids[h.index]}
                or any(h.of("caps_error"))
                for h in hosts
            )

        took = wait_until(hosts, full_view, DISCOVERY_BOUND_S, "full view with records")
        print(f"{HOSTS} hosts: every host found every other, records read, in {took:.2f} s")

        for host in hosts:
            assert not host.of("caps_error"), host.of("caps_error")
            assert not host.of("problem"), host.of("problem")
            found = {e["peer_id"]: e["addrs"] for e in host.of("discovered")}
            assert set(found) == set(ids) - {ids[host.index]}  # each once, never itself
            assert len(host.of("discovered")) == HOSTS - 1
            for j, other in enumerate(hosts):
                if j != host.index:
                    announced = other.of("ready")[0]["addrs"][0]
                    assert found[ids[j]] == [announced.split("/p2p/")[0]]
            bodies = {e["peer_id"]: e["body"] for e in host.of("caps")}
            names = {pid: body.get("name") for pid, body in bodies.items()}
            assert names == {ids[j]: f"h{j}" for j in range(HOSTS) if j != host.index}
            assert all(isinstance(b.get("version"), int) for b in bodies.values())

        for host in hosts:
            host.proc.send_signal(signal.SIGTERM)
        for host in hosts:
            try:
                host.proc.wait(timeout=STOP_BOUND_S)
            except subprocess.TimeoutExpired:
                pytest.fail(f"host {host.index} still running {STOP_BOUND_S} s after SIGTERM")
            assert host.proc.returncode == 0, host.stderr_tail()
        wait_until(hosts, lambda: all(h.of("stopped") for h in hosts), 5, "stopped", exiting=True)
        for host in hosts:
            assert host.of("stopped")[0]["threads"] == [], "threads left behind"
