"""Benchmark the swarm across NAT routers: first job, round trips by path, relay throughput.

Real ``swarm daemon`` processes in network namespaces (scripts/netns.nat_topology,
../shared/design/NAT_TESTBED.md), fake models so that the network is what is
measured; see scripts/bench_nat_lib/nodes.py for the swarm and measure.py for
how each figure is taken. R (public: bootstrap and relay) starts first; B, C
and then A start together with ``--bootstrap R``, and the clock starts at A's
start (the last node's). This process is the client, on A's local socket.

1. The first job across two NATs: A submits for the model only B serves (and,
   in parallel, the one only C serves) until a try is answered; its time from
   the last node's start (target: within 10 s).
2. A-B relayed until DCUtR punches through: the round trips of the jobs that
   ran while it was relayed, and when it became hole-punched.
3. Round trips on four paths from A, interleaved in one run: local (A's own
   model), direct (R), hole-punched (B), relayed (C, whose router randomises
   ports so no punch works); medians and p90 (target: relayed under 2x direct).
4. Streamed generations (64 chunks) on every path: whole or not.
5. A 16 MiB float32 tensor on every path: MiB/s, the bytes the relay moved and
   its CPU (the relay's per-circuit bandwidth limit: the daemon's default
   unless ``--relay-bandwidth``).
6. What the nodes report: hole-punch attempts and successes, circuit dials,
   the jobs each server ran against the answers we got (target: every case
   answered, none lost).

Needs root, iproute2 and iptables (``scripts/setup --test``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio
from bench_nat_lib import measure as m
from bench_nat_lib.nodes import NatSwarm, nat_swarm, warnings, why_not
from bench_report import Summary, cpu_model

TARGET_FIRST_S = 10.0
TARGET_RELAYED_RATIO = 2.0
MIB = 1024 * 1024


def progress(text: str) -> None:
    print(f"... {text} (load {m.load()})", file=sys.stderr, flush=True)


async def start(swarm: NatSwarm) -> float:
    """R first, ready; then B, C and A with ``--bootstrap R``; A's start time."""
    progress("starting R (public: bootstrap, relay)")
    swarm.r.start()
    await swarm.r.wait_ready()
    for d in (swarm.b, swarm.c, swarm.a):
        d.args = (*d.args, "--bootstrap", swarm.r.addr)
        d.start()
    progress("started B, C and A")
    return swarm.a.started_at


async def run(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    bandwidth = None if args.relay_bandwidth is None else int(args.relay_bandwidth * MIB)
    with tempfile.TemporaryDirectory(prefix="bench-nat-") as tmp:
        root = Path(tmp)
        if args.logs is not None:  # data dirs and logs kept there
            root = args.logs
            root.mkdir(parents=True, exist_ok=False)
        async with nat_swarm(
            root, said=args.reachability == "said", relay_bandwidth=bandwidth
        ) as swarm:
            ledger = m.Ledger()
            last_start = await start(swarm)
            by_path = {t.path: t for t in m.targets(swarm)}
            first: dict[str, Any] = {}

            async def first_of(path: str) -> None:
                first[path] = await m.first_job(swarm, by_path[path], last_start, ledger)

            async with trio.open_nursery() as nursery:
                for d in (swarm.b, swarm.c, swarm.a):
                    nursery.start_soon(d.wait_ready)
                nursery.start_soon(first_of, "hole-punched")
                nursery.start_soon(first_of, "relayed")
            for row in first.values():
                if row.get("at") is not None:
                    row["from_a_ready_s"] = row["at"] - swarm.a.ready_at
                row.pop("at", None)
            out["start"] = {
                d.name: {
                    "ready_after_last_start_s": d.ready_at - last_start,
                    "peer_id": d.peer_id,
                }
                for d in swarm.all
            }
            out["first_job"] = {"B": first["hole-punched"], "C": first["relayed"]}
            progress("first jobs answered; A-B until the hole punch")
            bound = m.QUICK_PUNCH_BOUND_S if args.quick else m.PUNCH_BOUND_S
            out["until_punched"] = await m.until_punched(swarm, ledger, last_start, bound)
            out["a_c_kind"] = await m.wait_connected(swarm, swarm.c, m.RELAYED_BOUND_S)
            progress(f"round trips, {args.rounds} rounds on 4 paths")
            out["round_trips"] = await m.round_trips(swarm, ledger, args.rounds, args.warm)
            progress(f"streams, {args.streams} per path")
            out["streams"] = await m.streams(swarm, ledger, args.streams)
            progress(f"16 MiB tensors, {args.tensors} per path")
            out["tensors"] = await m.tensors(swarm, ledger, args.tensors)
            out["nodes"] = await m.reports(swarm)
            out["accounting"] = m.accounting(swarm, ledger, out["nodes"])
            out["node_warnings"] = warnings(swarm)
            out["relay_limits"] = out["nodes"]["r"]["relay_service"]["limits"]
    return out


# --------------------------------------------------------------------------- report


def ms(row: dict[str, Any], key: str) -> str:
    return f"{row[key]:.2f}" if row.get("n") else "-"


def ratio(a: dict[str, Any], b: dict[str, Any], key: str) -> float | None:
    if not a.get("n") or not b.get("n") or not b[key]:
        return None
    return float(a[key] / b[key])


def fmt(x: float | None, spec: str = ".2f", unit: str = "") -> str:
    return "-" if x is None else f"{x:{spec}}{unit}"


def note_kinds(section: dict[str, Any]) -> None:
    """Say so when a path's connection was not of its kind for the whole section."""
    odd = {**m.unexpected(section["kinds_before"]), **m.unexpected(section["kinds_after"])}
    if odd:
        names = ", ".join(f"{n.upper()} ({m.EXPECTED_KINDS[n]})" for n in odd)
        print(f"   NOTE: not of its path's kind all along: {names}; that row mixes kinds")
    section["kinds_as_expected"] = not odd


def report(r: dict[str, Any], args: argparse.Namespace) -> Summary:
    summary = Summary()
    mach = r["machine"]
    print(f"\nMachine: {mach['cpus']} CPUs ({mach['cpu']}), Python {mach['python']}")
    print(f"Load average before: {mach['load_before']}, after: {mach['load_after']}")
    print(
        "Swarm: R public (bootstrap, relay) 10.88.0.1; A, B, C each in a home of its own "
        "behind a MASQUERADE router"
    )
    print("  that drops unsolicited SYNs silently; C's router randomises ports (--random-fully).")
    print(
        f"  Reachability: {r['reachability']}; relay limits: "
        + ", ".join(f"{k} {v}" for k, v in r["relay_limits"].items())
    )
    print("  Jobs from this process on A's local socket (LocalClient), fake models, no latency.")
    print()
    print("1. Start: R ready first; B, C, A started together; times from A's start (the last)")
    for name, row in r["start"].items():
        if name != "r":
            print(f"   {name.upper()} ready after {row['ready_after_last_start_s']:.1f} s")
    for who, f in r["first_job"].items():
        if f["from_last_start_s"] is None:
            print(f"   first job for {who}'s model: NOT answered within {m.FIRST_BOUND_S:g} s")
            continue
        via = f" (forwarded by {f['via'].upper()})" if f.get("via") else ""
        print(
            f"   first job for {who}'s model answered {f['from_last_start_s']:.2f} s after the "
            f"last start ({f['from_a_ready_s']:.2f} s after A was ready), served by "
            f"{f['served_by'].upper()}{via};"
        )
        print(
            f"      A's connection to {who} then: {f['kind_after']}; {f['tries'] - 1} tries "
            f"refused before ({f['refused_before'] or 'none'}); load {f['load']}"
        )
    b_first = r["first_job"]["B"]["from_last_start_s"]
    summary.add(
        "first job across two NATs (A -> B), after the last start",
        fmt(b_first, ".2f", " s"),
        f"<= {TARGET_FIRST_S:g} s",
        b_first is not None and b_first <= TARGET_FIRST_S,
    )
    print()
    u = r["until_punched"]
    rel = u["relayed_ms"]
    print(f"2. A-B relayed until DCUtR punches through (jobs to B every {m.PACE_S * 1000:g} ms)")
    kinds = " -> ".join(f"{k} ({t:.1f} s)" for t, k in u["kinds_seen"])
    print(
        f"   hole-punched {fmt(u['punched_after_last_start_s'], '.1f', ' s')} after the last "
        f"start; A's connection to B: {kinds}"
    )
    print("   hole punches (tried/succeeded) meanwhile, as the nodes count them:")
    for t, counts in u["punch_counts"]:
        each = ", ".join(f"{n.upper()} {a}/{ok}" for n, (a, ok) in counts.items())
        print(f"      {t:5.1f} s  {each}")
    fwd = u["forwarded_ms"]
    print(
        f"   the first job to B itself (no forwarding peer) ended "
        f"{fmt(u['first_to_b_itself_after_last_start_s'], '.2f', ' s')} after the last start"
    )
    print(
        f"   {rel['n']} jobs ran wholly while relayed: median {ms(rel, 'median')} ms, p90 "
        f"{ms(rel, 'p90')} ms; {fwd['n']} forwarded by another node: median "
        f"{ms(fwd, 'median')} ms, p90 {ms(fwd, 'p90')} ms ({u['jobs']} in all; load {u['load']})"
    )
    print(f"   A-C: {r['a_c_kind']}")
    print()
    rt = r["round_trips"]
    print(
        f"3. Round trips from A, {rt['rounds']} rounds (+{rt['warm_up_rounds']} warm-up), one "
        "small job per path per round, order shuffled"
    )
    print(f"   kinds before: {rt['kinds_before']}, after: {rt['kinds_after']}")
    note_kinds(rt)
    print(f"   load {rt['load_before']} -> {rt['load_after']}")
    print(
        f"   {'path':<14} {'n':>5} {'median':>8} {'p90':>8} {'p99':>8}  {'x direct':>8} "
        f"{'p90 x':>6}  {'past local':>10} {'x direct':>8}"
    )
    direct, local = rt["ms"]["direct"], rt["ms"]["local"]
    added: dict[str, float | None] = {}
    for path, row in rt["ms"].items():
        added[path] = row["median"] - local["median"] if row["n"] and local["n"] else None
    rt["past_local_ms"] = added
    for path, row in rt["ms"].items():
        more = added[path]
        times = None if more is None or not added["direct"] else more / added["direct"]
        print(
            f"   {path:<14} {row['n']:>5} {ms(row, 'median'):>8} {ms(row, 'p90'):>8} "
            f"{ms(row, 'p99'):>8}  {fmt(ratio(row, direct, 'median')):>7}x "
            f"{fmt(ratio(row, direct, 'p90')):>5}x  {fmt(more):>10} "
            f"{fmt(None if path == 'local' else times):>7}{'' if path == 'local' else 'x'}"
        )
    print(
        "   (ms; x direct: this path's median, or p90, over the direct one's; past local: the "
        "median\n    less the local path's, what the network and the far node add)"
    )
    print(f"   the relay moved {rt['relay_bytes'] / 1024:.0f} KiB during the section")
    relayed = ratio(rt["ms"]["relayed"], direct, "median")
    # Only a figure when A-R stayed direct and A-C relayed throughout.
    valid = all(
        rt[when].get(n) == m.EXPECTED_KINDS[n] for when in ("kinds_before", "kinds_after")
        for n in ("r", "c")
    )  # fmt: skip
    summary.add(
        "relayed round trip / direct (medians)",
        fmt(relayed, ".2f", "x") if valid else "mixed kinds",
        f"< {TARGET_RELAYED_RATIO:g}x",
        valid and relayed is not None and relayed < TARGET_RELAYED_RATIO,
    )
    print()
    st = r["streams"]
    what = f"{st['reps']} generations of {st['chunks']} chunks per path"
    print(f"4. Streams: {what} (load {st['load']})")
    for path, row in st["paths"].items():
        t = row["ms"]
        print(
            f"   {path:<14} whole {row['whole']}, broken {row['broken']}; to the last chunk: "
            f"median {ms(t, 'median')} ms"
        )
    print()
    tn = r["tensors"]
    print(
        f"5. A {tn['mib']:.0f} MiB float32 tensor in, 8 floats a row back; {tn['reps']} per path "
        f"(load {tn['load_before']} -> {tn['load_after']})"
    )
    print(f"   kinds before: {tn['kinds_before']}, after: {tn['kinds_after']}")
    note_kinds(tn)
    limit = r["relay_limits"]["circuit_bandwidth"]
    print(
        "   R's limit per circuit: "
        + (f"{limit / MIB:g} MiB/s both ways, a burst of 1 s's worth" if limit else "none")
    )
    local = tn["paths"]["local"]
    for path, row in tn["paths"].items():
        s = row["s"]
        net = None
        if row["n"] and local["n"] and path != "local" and s["median"] > local["s"]["median"]:
            net = tn["mib"] / (s["median"] - local["s"]["median"])
        relay = row["relay_bytes"]
        cpu = row["r_cpu_s"]
        print(
            f"   {path:<14} median {fmt(s.get('median'), '.3f', ' s')}, "
            f"{fmt(row['mib_s'], '.1f')} MiB/s end to end, {fmt(net, '.1f')} MiB/s past A's "
            f"socket; relay moved {fmt(None if relay is None else relay / MIB, '.1f')} MiB, "
            f"R's CPU {fmt(None if cpu is None else cpu * 1000, '.0f')} ms"
        )
    print()
    print("6. What the nodes report")
    for name, n in r["nodes"].items():
        hp = n["hole_punch"]
        print(
            f"   {name.upper()} ({n['reach']}): hole punches {hp['attempts']} tried, "
            f"{hp['successes']} succeeded; circuit dials {n['circuit_dials']} "
            f"({n['circuit_dial_failures']} failed); relays held {n['relays_held'] or 'none'}"
        )
        conns = ", ".join(f"{p.upper()} {k}" for p, k in n["connections"].items())
        print(f"      connections: {conns or 'none'}; CPU {n['cpu_s']:.1f} s")
    rs = r["nodes"]["r"]["relay_service"]
    print(
        f"   R's relay: {rs['reservations']} reservations, {rs['circuits_total']} circuits "
        f"({rs['circuits_open']} open), {rs['bytes_relayed'] / MIB:.1f} MiB relayed, "
        f"closed for limits {rs['closed_for_limits'] or 'none'}, refused {rs['refused']}"
    )
    punches = {k: v["hole_punch"] for k, v in r["nodes"].items()}
    r["hole_punch"] = {
        "attempts": sum(p["attempts"] for p in punches.values()),
        "successes": sum(p["successes"] for p in punches.values()),
    }
    acc = r["accounting"]
    print(
        f"   jobs sent {acc['sent_total']} ({acc['sent']}); failed {len(acc['failed'])}, "
        f"answered by the wrong node or through another {len(acc['wrong_path'])}"
    )
    for name, row in acc["per_node"].items():
        print(f"   {name.upper()} ran {row['ran']} jobs, we got {row['answered']} answers from it")
    for f in acc["failed"][:10]:
        print(f"      failed: {f}")
    for w in acc["wrong_path"][:10]:
        print(f"      wrong path: {w}")
    answered = sum(row["answered"] for row in acc["per_node"].values())
    summary.add(
        "every case answered, none lost",
        f"{answered}/{acc['sent_total']}",
        "all; each server ran = answered",
        acc["none_lost"] and answered == acc["sent_total"],
    )
    if r.get("node_warnings"):
        print("\nWarnings the nodes logged:")
        for line in r["node_warnings"]:
            print(f"   {line}")
    print("\nSummary (targets from issue 12)")
    width = max(len(row["figure"]) for row in summary)
    for row in summary:
        print(
            f"   {row['figure']:<{width}}  {row['value']:>10}  {row['target']:<32} {row['verdict']}"
        )
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=300, help="round-trip rounds (4 jobs each)")
    parser.add_argument("--warm", type=int, default=20, help="warm-up rounds, not counted")
    parser.add_argument("--streams", type=int, default=10, help="streamed jobs per path")
    parser.add_argument("--tensors", type=int, default=3, help="16 MiB jobs per path")
    parser.add_argument(
        "--reachability",
        choices=["auto", "said"],
        default="auto",
        help="auto (the default): every node learns it from dial-backs, as a user starts "
        "them; said: R --reachability public, the homes private",
    )
    parser.add_argument(
        "--relay-bandwidth",
        type=float,
        help="R's per-circuit bandwidth limit, MiB/s (0: none); default: the daemon's",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="60 rounds, 2 streams, 1 tensor, the punch waited for 45 s at most (not 90)",
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument(
        "--logs", type=Path, help="keep the nodes' data dirs and logs in this new directory"
    )
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.warm, args.streams, args.tensors = 60, 10, 2, 1
    if why := why_not():
        print(f"bench_nat: cannot run here: {why}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks
    began = time.monotonic()
    machine = {
        "cpus": os.cpu_count(),
        "cpu": cpu_model(),
        "python": platform.python_version(),
        "load_before": m.load(),
    }
    try:
        results = trio.run(run, args)
    except KeyboardInterrupt:
        print("interrupted: every node process was stopped", file=sys.stderr)
        return 130
    machine["load_after"] = m.load()
    results["machine"] = machine
    results["reachability"] = (
        "said (R --reachability public, homes private)"
        if args.reachability == "said"
        else "auto (learnt from dial-backs)"
    )
    results["args"] = {k: str(v) for k, v in vars(args).items()}
    results["summary"] = report(results, args)
    results["total_s"] = time.monotonic() - began
    print(f"\n(total {results['total_s']:.0f} s)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
