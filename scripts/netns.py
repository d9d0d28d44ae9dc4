"""Network namespaces joined by a bridge, for tests and benchmarks (root, Linux).

Every link is made inside namespaces we create (the bridge lives in one of its
own), so nothing ever appears in, or routes out of, the root namespace. Names
carry the creating process's pid, so leftovers of a killed run can be swept.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

IP_TIMEOUT_S = 10.0


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        ["ip", *args], capture_output=True, text=True, timeout=IP_TIMEOUT_S, check=False
    )
    if check and done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done


def namespaces() -> list[str]:
    return [line.split()[0] for line in ip("netns", "list").stdout.splitlines() if line.strip()]


def why_namespaces_cannot_be_made(prefix: str) -> str | None:
    """None when we can make namespaces here, else the reason (for a skip)."""
    if not sys.platform.startswith("linux"):
        return "network namespaces are Linux only"
    if os.geteuid() != 0:
        return "making network namespaces needs root"
    if shutil.which("ip") is None:
        return "no `ip` command: install iproute2 (scripts/setup does)"
    probe = f"{prefix}{os.getpid()}-probe"
    made = ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"cannot make a network namespace here: {made.stderr.strip()}"
    ip("netns", "del", probe, check=False)
    return None


def remove_stale_namespaces(prefix: str) -> None:
    """Namespaces left by an earlier run (of the same prefix) that was killed outright."""
    for name in namespaces():
        pid = name[len(prefix) :].split("-", 1)[0]
        if name.startswith(prefix) and pid.isdigit() and not Path(f"/proc/{pid}").exists():
            ip("netns", "del", name, check=False)


def delete_namespaces(made: list[str]) -> list[str]:
    """Kill what still runs in them, delete them; return any that would not go."""
    for ns in reversed(made):
        for pid in ip("netns", "pids", ns, check=False).stdout.split():
            with suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        ip("netns", "del", ns, check=False)
    return [ns for ns in made if ns in namespaces()]


@contextmanager
def bridged_namespaces(count: int, *, prefix: str, subnet: str, bridge: str) -> Iterator[list[str]]:
    """``count`` namespaces on one bridge; host i has ``subnet``.(i + 2)/24 on eth0."""
    base = f"{prefix}{os.getpid()}"
    bridge_ns = f"{base}-br"
    made: list[str] = []
    try:
        ip("netns", "add", bridge_ns)
        made.append(bridge_ns)
        ip("-n", bridge_ns, "link", "add", bridge, "type", "bridge")
        ip("-n", bridge_ns, "link", "set", bridge, "up")
        hosts = []
        for i in range(count):
            ns = f"{base}-h{i}"
            ip("netns", "add", ns)
            made.append(ns)
            ip("-n", ns, "link", "set", "lo", "up")
            # Both ends are created inside our namespaces: no link ever exists in the root one.
            peer = ("peer", "name", f"v{i}", "netns", bridge_ns)
            ip("-n", ns, "link", "add", "eth0", "type", "veth", *peer)
            ip("-n", ns, "addr", "add", f"{subnet}.{i + 2}/24", "dev", "eth0")
            ip("-n", ns, "link", "set", "eth0", "up")
            ip("-n", ns, "route", "add", "224.0.0.0/4", "dev", "eth0")  # multicast out eth0
            ip("-n", bridge_ns, "link", "set", f"v{i}", "master", bridge)
            ip("-n", bridge_ns, "link", "set", f"v{i}", "up")
            hosts.append(ns)
        yield hosts
    finally:
        if left := delete_namespaces(made):
            print(f"WARNING: namespaces not deleted: {left}", file=sys.stderr)
