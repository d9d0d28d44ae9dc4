"""Simulate a swarm of 100, 1,000 and 10,000 nodes: bounded links, churn, skewed demand.

The project's own parts run over a simulated network and clock (no libp2p, no
trio, no wall clock): each node holds a real ``bootstrap.table.PeerTable`` fed
through the real reducer (``apply``), a real ``node.jobs.router.Router`` plans
every job over that table, and the link policy is ``node.membership.link_policy``
when it imports (the simulator's stand-in otherwise; the report names the one
that ran). Around them the simulator models what each node's I/O does: links
(dial, record swap, heartbeats, sample pulls), a Kademlia DHT (routing tables,
provider records, lookups in round trips), the roster, and jobs (Poisson per
node, Zipf-skewed over the models; a model nobody linked serves is found in the
DHT and its provider linked on demand). Message sizes are measured on the real
encoders (``scripts/simulate_swarm_lib/sizes.py``).

Per size, three phases of simulated time: warm-up (links settle; not counted),
rest (no joins or leaves) and churn (5% of the nodes a minute join, as many
leave without a word). Printed per size: links per node, messages and bytes per
node per second at rest and under churn, a new node's first job (DHT round
trips, simulated seconds), the share of jobs that found a live provider, and
the issue's targets against them. One seed draws everything: the same seed and
arguments print the same report (wall times go to stderr).

    scripts/simulate_swarm [--seed N] [--sizes 100,1000,10000] [--quick]
                           [--json PATH] [--plot PATH | --no-plot]
    scripts/simulate_swarm --combine A.json B.json ... [--plot PATH]

``--combine`` prints the report and draws the plot of runs saved with ``--json``
(one size each, say, run side by side): each size's run depends only on the seed
and its own size, so the report is the one a single run of all sizes prints.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from simulate_swarm_lib.model import SimConfig
from simulate_swarm_lib.report import header, plot, report_size, summary
from simulate_swarm_lib.sizes import measure
from simulate_swarm_lib.swarm import Swarm

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SIZES = (100, 1000, 10000)
PLOT = REPO / "docs" / "plots" / "simulate_swarm.png"

# Simulated seconds (warm-up, rest, churn) per size. The cost of a simulated
# second grows with the swarm (heartbeats through the real reducer, link plans:
# 10,000 nodes took about 7.5 min of CPU for these 70 s), so larger swarms run
# shorter windows; every periodic
# task starts at a uniform random phase, so rates over a short window are still
# the long-run rates. --quick: for a test or a first look.
PHASES = {100: (60.0, 60.0, 300.0), 1000: (40.0, 30.0, 120.0), 10000: (25.0, 15.0, 30.0)}
QUICK = {100: (30.0, 20.0, 60.0), 1000: (25.0, 10.0, 30.0), 10000: (25.0, 5.0, 10.0)}


def phases_for(nodes: int, quick: bool) -> tuple[float, float, float]:
    table = QUICK if quick else PHASES
    for size in sorted(table):
        if nodes <= size:
            return table[size]
    return table[max(table)]


def config_for(nodes: int, seed: int, quick: bool, max_links: int) -> SimConfig:
    warmup, rest, churn = phases_for(nodes, quick)
    return SimConfig(
        nodes=nodes, seed=seed, warmup_s=warmup, rest_s=rest, churn_s=churn, max_links=max_links
    )


def parse_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"sizes: comma-separated node counts, not {text!r}"
        ) from None
    if not sizes or any(n < 10 for n in sizes):
        raise argparse.ArgumentTypeError("sizes: at least one, each at least 10 nodes")
    return sizes


def simulate(args: argparse.Namespace) -> list[dict[str, Any]]:
    sizes = measure()
    configs = [config_for(n, args.seed, args.quick, args.max_links) for n in args.sizes]
    print(header(configs, sizes.describe()), flush=True)
    results: list[dict[str, Any]] = []
    for config in configs:
        started, cpu = time.monotonic(), time.process_time()
        swarm = Swarm(config, sizes)
        result = swarm.run()
        result["policy"] = swarm.policy_name
        wall, cpu = time.monotonic() - started, time.process_time() - cpu
        print(f"[{config.nodes} nodes: {wall:.1f} s wall, {cpu:.1f} s CPU]", file=sys.stderr)
        print(report_size(result, config), flush=True)
        results.append(result)
    print(summary(results, configs))
    if args.json is not None:
        doc = {"seed": args.seed, "quick": args.quick, "sizes": sizes.describe(), "runs": results}
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--sizes", type=parse_sizes, default=DEFAULT_SIZES)
    parser.add_argument("--quick", action="store_true", help="shorter simulated phases")
    parser.add_argument("--max-links", type=int, default=32)
    parser.add_argument("--json", type=Path, help="write every figure here")
    parser.add_argument("--plot", type=Path, default=PLOT, help=f"PNG (default {PLOT})")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--combine", type=Path, nargs="+", help="report saved --json runs")
    args = parser.parse_args(argv)

    if args.combine:
        docs = [json.loads(path.read_text()) for path in args.combine]
        results = sorted((r for d in docs for r in d["runs"]), key=lambda r: r["nodes"])
        quick = any(d["quick"] for d in docs)
        configs = [config_for(r["nodes"], r["seed"], quick, r["max_links"]) for r in results]
        args.seed, args.quick = results[0]["seed"], quick
        print(header(configs, docs[0]["sizes"]))
        for result, config in zip(results, configs, strict=True):
            print(report_size(result, config))
        print(summary(results, configs))
    else:
        results = simulate(args)
    if not args.no_plot:
        plot(results, args.plot, seed=args.seed, quick=args.quick)
        print(
            f"plot: {args.plot.relative_to(REPO) if args.plot.is_relative_to(REPO) else args.plot}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
