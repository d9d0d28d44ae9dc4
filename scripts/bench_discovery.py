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
import signal
import sys
import time
from pathlib import Path

import trio
from bench_discovery_lib.common import WarningLog, sizes_of
from bench_discovery_lib.loopback import in_process, loopback_sections
from bench_discovery_lib.mdns import mdns_section, serve_one
from bench_discovery_lib.report import report

from node.observe import logs


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
