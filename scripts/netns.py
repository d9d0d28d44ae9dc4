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


def iptables(ns: str, *args: str) -> None:
    done = subprocess.run(
        ["ip", "netns", "exec", ns, "iptables", *args],
        capture_output=True,
        text=True,
        timeout=IP_TIMEOUT_S,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"iptables {' '.join(args)} in {ns}: {done.stderr.strip()}")


def sysctl(ns: str, setting: str) -> None:
    done = subprocess.run(
        ["ip", "netns", "exec", ns, "sysctl", "-q", "-w", setting],
        capture_output=True,
        text=True,
        timeout=IP_TIMEOUT_S,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"sysctl {setting} in {ns}: {done.stderr.strip()}")


def why_nat_cannot_be_made(prefix: str) -> str | None:
    """None when NAT routers can be made here, else the reason (for a skip)."""
    if why := why_namespaces_cannot_be_made(prefix):
        return why
    if shutil.which("iptables") is None:
        return "no `iptables` command: install iptables (scripts/setup --test does)"
    return None


class NatTopology:
    """What ``nat_topology`` made: namespace names and addresses, by role.

    ``public`` hosts sit on the public bridge (10.88.0.0/24, .1 up); home i
    (1-based) is the LAN 192.168.i.0/24 behind router ``routers[i-1]`` whose wan
    address is 10.88.0.(10 + i); its hosts are 192.168.i.2 up.
    """

    def __init__(self) -> None:
        self.public: list[str] = []  # namespaces on the public network
        self.public_ips: list[str] = []
        self.routers: list[str] = []
        self.router_wan_ips: list[str] = []
        self.homes: list[list[str]] = []  # namespaces of each home's hosts
        self.home_ips: list[list[str]] = []

    def ip_of(self, ns: str) -> str:
        for names, ips in (
            (self.public, self.public_ips),
            *zip(self.homes, self.home_ips, strict=True),
        ):
            if ns in names:
                return ips[names.index(ns)]
        raise KeyError(ns)


def _veth(ns: str, name: str, other_ns: str, other_name: str) -> None:
    ip("-n", ns, "link", "add", name, "type", "veth", "peer", "name", other_name, "netns", other_ns)


def _up(ns: str, dev: str, cidr: str | None = None) -> None:
    if cidr:
        ip("-n", ns, "addr", "add", cidr, "dev", dev)
    ip("-n", ns, "link", "set", dev, "up")


@contextmanager
def nat_topology(
    *,
    prefix: str,
    public_hosts: int = 1,
    homes: tuple[int, ...] = (1, 1),
    random_ports: bool | tuple[bool, ...] = False,
    silent_drop: bool = True,
) -> Iterator[NatTopology]:
    """Public hosts on one bridge, and homes behind NAT routers (NAT_TESTBED.md).

    ``homes[i]`` hosts in home i+1. Each router masquerades its LAN behind its wan
    address (``random_ports``: ``--random-fully``, a new port per connection, which
    defeats hole punching), lets in only replies (RELATED,ESTABLISHED), and with
    ``silent_drop`` drops unsolicited SYNs to itself without a RST, as home routers
    do (a RST kills TCP hole punching). Everything lives in namespaces made here.
    """
    base = f"{prefix}{os.getpid()}"
    bridge_ns = f"{base}-pub"
    made: list[str] = []
    top = NatTopology()
    randoms = random_ports if isinstance(random_ports, tuple) else (random_ports,) * len(homes)
    try:
        ip("netns", "add", bridge_ns)
        made.append(bridge_ns)
        ip("-n", bridge_ns, "link", "add", "br0", "type", "bridge")
        _up(bridge_ns, "br0")
        port = 0

        def on_bridge(ns: str, dev: str, cidr: str) -> None:
            nonlocal port
            port += 1
            _veth(ns, dev, bridge_ns, f"p{port}")
            _up(ns, dev, cidr)
            ip("-n", bridge_ns, "link", "set", f"p{port}", "master", "br0")
            _up(bridge_ns, f"p{port}")

        for i in range(public_hosts):
            ns = f"{base}-r{i}"
            ip("netns", "add", ns)
            made.append(ns)
            _up(ns, "lo")
            address = f"10.88.0.{i + 1}"
            on_bridge(ns, "eth0", f"{address}/24")
            top.public.append(ns)
            top.public_ips.append(address)
        for h, count in enumerate(homes, start=1):
            router = f"{base}-n{h}"
            ip("netns", "add", router)
            made.append(router)
            _up(router, "lo")
            wan = f"10.88.0.{10 + h}"
            on_bridge(router, "wan", f"{wan}/24")
            ip("-n", router, "link", "add", "lan", "type", "bridge")
            _up(router, "lan", f"192.168.{h}.1/24")
            sysctl(router, "net.ipv4.ip_forward=1")
            masquerade = ["-t", "nat", "-A", "POSTROUTING", "-o", "wan", "-j", "MASQUERADE"]
            iptables(router, *masquerade, *(["--random-fully"] if randoms[h - 1] else []))
            iptables(router, "-A", "FORWARD", "-i", "wan", "-o", "lan", "-m", "conntrack",
                     "--ctstate", "RELATED,ESTABLISHED", "-j", "ACCEPT")  # fmt: skip
            iptables(router, "-A", "FORWARD", "-i", "wan", "-o", "lan", "-j", "DROP")
            if silent_drop:
                iptables(router, "-A", "INPUT", "-i", "wan", "-p", "tcp", "--syn", "-j", "DROP")
            top.routers.append(router)
            top.router_wan_ips.append(wan)
            names, ips = [], []
            for k in range(count):
                ns = f"{base}-h{h}x{k}"
                ip("netns", "add", ns)
                made.append(ns)
                _up(ns, "lo")
                address = f"192.168.{h}.{k + 2}"
                _veth(ns, "eth0", router, f"l{k}")
                _up(ns, "eth0", f"{address}/24")
                ip("-n", router, "link", "set", f"l{k}", "master", "lan")
                _up(router, f"l{k}")
                ip("-n", ns, "route", "add", "default", "via", f"192.168.{h}.1")
                names.append(ns)
                ips.append(address)
            top.homes.append(names)
            top.home_ips.append(ips)
        yield top
    finally:
        if left := delete_namespaces(made):
            print(f"WARNING: namespaces not deleted: {left}", file=sys.stderr)
