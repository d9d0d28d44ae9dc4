"""Constants and helpers every section of the discovery benchmark uses."""

from __future__ import annotations

import logging
import re
import statistics
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from bootstrap.table import live_peers
from node.config import NodeConfig
from node.daemon import Node
from node.membership.config import MembershipConfig
from node.observe import logs

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "bench_discovery.py"  # re-run in namespaces as a child
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
    if not node.serving:
        return set()
    return {p.peer_id for p in live_peers(node.services.membership.table)}


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


def sizes_of(text: str) -> list[int]:
    return [int(n) for n in text.split(",") if n]
