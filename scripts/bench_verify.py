"""Benchmark verification: what spot checks cost, and how soon they catch a liar.

The verification half of issue 14's benchmark. (scripts/bench_fairness, the fair
share half, leaves ``--only verification`` to this script until the two meet.)

1. load: the extra load of spot checks at 0 (none), 1%, 10% and 100% of routed
   jobs, in the same run. Real ``swarm daemon`` processes on 127.0.0.1 (no mDNS,
   no DHT, no gateway): two workers serving ``fake:emb:MS`` (a ``trio.sleep``
   of MS ms, one job at a time), and one routing node per check rate
   (``--no-models``, ``[verify] rate`` in its config.toml, the caps on checks
   raised so the rate is what runs: ``max_in_flight`` 64, ``per_minute`` 10^6)
   linked to both. One ``SwarmClient`` per router keeps ``--callers`` jobs in
   flight for a window; the windows go round the rates, in another order each
   round, so the machine's other load falls on all alike. Per rate: jobs per
   second, CPU milliseconds per job of every daemon and this process together
   (from /proc, the checks' runs and the drain after the window included), the
   checks the router made, and both figures against no checks (medians over
   rounds).
2. caught: how many jobs a routing node sends before it holds back a peer that
   lies in a share of its answers (``LyingFakeRunner``: wrong but well-formed
   embeddings 20% of the time, the issue's "right ones 80% of the time"). In one
   process: the router (serving nothing, round-robin) and three peers, two
   honest; four callers; the default reputation policy (two strikes). Trials
   with seeds 1..N per rate (1%, 10%, 100%): median, 90th percentile and most
   jobs until held back, the liar's lies by then, and strikes on honest peers
   (must be none). The expected count, from the rule: a job leads to a strike
   with p = rate x 2/3 x 0.2 (the liar ran it, or was the second node asked),
   so two strikes take about 2 / p jobs.

``--only load,caught`` picks sections. Every wait is bounded; every process is
stopped on the way out, Ctrl-C included.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import statistics
import sys
import tempfile
import time
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import trio
from bench_report import Summary, load_now
from bench_report import machine as bench_machine
from bench_swarm_lib.swarm import NodeProc, start_node, stop_all

from node.client import SwarmClient
from node.config import NodeConfig
from node.daemon import Node
from node.jobs.router import RouterConfig, Strategy
from node.jobs.verify import VerifyConfig
from runners.fake import LyingFakeRunner

SECTIONS = ("load", "caught")
RATES = (0.0, 0.01, 0.1, 1.0)
CAUGHT_RATES = (0.01, 0.1, 1.0)
LIE_RATE = 0.2
TARGET_EXTRA_CPU_AT_10 = 0.25  # CPU per job at a 10% check rate within 25% of none
MAX_CAUGHT_JOBS = 1000  # the test's bound at 10% (tests/test_verify.py)
DRAIN_BOUND_S = 30.0


# --------------------------------------------------------------------------- 1. load


def _config_toml(rate: float) -> str:
    return f"[verify]\nrate = {rate}\nmax_in_flight = 64\nper_minute = 1000000\n"


async def _checks(client: SwarmClient) -> tuple[int, int]:
    """(checks judged so far, checks in flight now) at the router ``client`` talks to."""
    record = await client.record()
    v = record.body.get("view", {}).get("verification", {})
    return int(v.get("checks", 0)), int(v.get("in_flight", 0))


async def _window(client: SwarmClient, callers: int, seconds: float, tag: str) -> int:
    """Jobs answered while ``callers`` keep one each in flight for ``seconds``."""
    done = 0
    deadline = trio.current_time() + seconds

    async def caller(i: int) -> None:
        nonlocal done
        n = 0
        while trio.current_time() < deadline:
            await client.infer("emb", {"text": f"{tag} {i} {n}"})
            n += 1
            done += 1

    async with trio.open_nursery() as nursery:
        for i in range(callers):
            nursery.start_soon(caller, i)
    return done


async def load(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    nodes: list[NodeProc] = []
    rows: dict[float, list[dict[str, float]]] = {r: [] for r in RATES}
    await trio.Path(root).mkdir(parents=True, exist_ok=True)
    try:
        common = ["--heartbeat", "1", "--dead-after", "4"]
        workers = []
        for i in range(2):
            workers.append(
                await start_node(
                    root, f"w{i}", ["--model", f"fake:emb:{args.service_ms:g}", *common]
                )
            )
        nodes += workers
        routers: dict[float, NodeProc] = {}
        for rate in RATES:
            name = f"rate{rate:g}"
            (root / name).mkdir(parents=True)
            (root / name / "config.toml").write_text(_config_toml(rate))
            peers = [a for w in workers for a in ("--peer", w.addr)]
            routers[rate] = await start_node(root, name, ["--no-models", *peers, *common])
            nodes.append(routers[rate])
        async with AsyncExitStack() as stack:
            clients = {
                r: await stack.enter_async_context(SwarmClient.connect(n.addr))
                for r, n in routers.items()
            }
            for rate, client in clients.items():  # linked, streams open, code paths warm
                await _window(client, args.callers, args.warm, f"warm{rate}")
            for round_ in range(args.rounds):
                order = list(RATES) if round_ % 2 == 0 else list(reversed(RATES))
                order = order[round_ % len(order) :] + order[: round_ % len(order)]
                for rate in order:
                    client = clients[rate]
                    checks0, _ = await _checks(client)
                    cpu0 = sum(n.cpu_s() for n in nodes) + time.process_time()
                    jobs = await _window(client, args.callers, args.window, f"r{round_}")
                    with trio.move_on_after(DRAIN_BOUND_S):  # its checks finish in its account
                        while (await _checks(client))[1]:  # noqa: ASYNC110 (another process)
                            await trio.sleep(0.05)
                    cpu1 = sum(n.cpu_s() for n in nodes) + time.process_time()
                    checks1, _ = await _checks(client)
                    row = {
                        "jobs_per_s": jobs / args.window,
                        "cpu_ms_per_job": 1000 * (cpu1 - cpu0) / max(1, jobs),
                        "checks": checks1 - checks0,
                        "jobs": jobs,
                    }
                    rows[rate].append(row)
                    print(
                        f"   round {round_} rate {rate:>5.0%}: {row['jobs_per_s']:7.1f} jobs/s, "
                        f"{row['cpu_ms_per_job']:6.2f} ms CPU/job, {row['checks']} checks",
                        flush=True,
                    )
    finally:
        await stop_all(nodes)
    out: dict[str, Any] = {"callers": args.callers, "window_s": args.window, "rates": {}}
    base = {k: statistics.median(r[k] for r in rows[0.0]) for k in ("jobs_per_s", "cpu_ms_per_job")}
    for rate, runs in rows.items():
        jobs_s = statistics.median(r["jobs_per_s"] for r in runs)
        cpu = statistics.median(r["cpu_ms_per_job"] for r in runs)
        checked = sum(r["checks"] for r in runs) / max(1, sum(r["jobs"] for r in runs))
        out["rates"][f"{rate:g}"] = {
            "runs": runs,
            "jobs_per_s": jobs_s,
            "cpu_ms_per_job": cpu,
            "checked_share": checked,
            "throughput_vs_none": jobs_s / base["jobs_per_s"] if base["jobs_per_s"] else 0.0,
            "cpu_per_job_vs_none": cpu / base["cpu_ms_per_job"] if base["cpu_ms_per_job"] else 0.0,
        }
    return out


# --------------------------------------------------------------------------- 2. caught


@asynccontextmanager
async def _node(root: Path, name: str, **settings: Any) -> Any:
    runners = settings.pop("runners", ())
    config = NodeConfig(
        data_dir=root / name,
        listen=("/ip4/127.0.0.1/tcp/0",),
        probe_cuda=False,
        shutdown_grace_s=1.0,
        mdns=False,
        dht=False,
        http=None,
        **settings,
    )
    node = Node(config, runners=runners)
    async with trio.open_nursery() as nursery:
        with trio.fail_after(60):
            await nursery.start(node.run)
        try:
            yield node
        finally:
            node.stop()


def _serving(node: Node) -> set[str]:
    return {p.peer_id for p in node.services.membership.table.peers.values() if p.models}


def _checking(node: Node) -> bool:
    return bool(node.services.verifier.describe()["in_flight"])


async def _one_trial(root: Path, rate: float, seed: int, limit: int) -> dict[str, Any]:
    liar = LyingFakeRunner("emb", LIE_RATE, seed=seed)
    async with (
        _node(root, "b", models=("fake:emb",)) as b,
        _node(root, "c", models=("fake:emb",)) as c,
        _node(root, "liar", models=(), runners=(liar,)) as lying,
    ):
        verify = VerifyConfig(rate=rate, max_in_flight=4, per_minute=10**6, seed=seed)
        router = RouterConfig(strategy=Strategy.ROUND_ROBIN)
        peers = (b.addrs[0], c.addrs[0], lying.addrs[0])
        async with _node(root, "a", models=(), peers=peers, router=router, verify=verify) as a:
            reputation = a.services.verifier.reputation
            with trio.fail_after(30):
                while len(_serving(a)) < 3:  # noqa: ASYNC110 (polling node state)
                    await trio.sleep(0.02)
            jobs = 0
            async with SwarmClient.connect(a.addrs[0]) as client:

                async def worker() -> None:
                    nonlocal jobs
                    while jobs < limit and lying.peer_id not in reputation.held_back():
                        jobs += 1
                        await client.infer("emb", {"text": f"{seed} {jobs}"})

                async with trio.open_nursery() as nursery:
                    for _ in range(4):
                        nursery.start_soon(worker)
                with trio.move_on_after(10):  # the last checks may still be running
                    while lying.peer_id not in reputation.held_back() and _checking(a):  # noqa: ASYNC110
                        await trio.sleep(0.02)
            rows = a.services.verifier.describe()["peers"]
            held = lying.peer_id in reputation.held_back()
            honest_strikes = sum(rows.get(p.peer_id, {}).get("strikes", 0) for p in (b, c))
    return {
        "seed": seed,
        "held_back": held,
        "jobs": jobs,
        "lies": liar.lies,
        "answers": liar.answers,
        "honest_strikes": honest_strikes,
    }


async def caught(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"lie_rate": LIE_RATE, "rates": {}}
    for rate in CAUGHT_RATES:
        trials = []
        limit = max(200, int(40 / (rate * 2 / 3 * LIE_RATE)))  # 20x the expected count
        for seed in range(1, args.trials + 1):
            trial = await _one_trial(root / f"caught-{rate:g}-{seed}", rate, seed, limit)
            trials.append(trial)
            print(
                f"   rate {rate:>5.0%} seed {seed}: "
                + (
                    f"held back after {trial['jobs']} jobs"
                    if trial["held_back"]
                    else f"NOT held back in {trial['jobs']} jobs"
                )
                + f" ({trial['lies']} lies in {trial['answers']} answers; "
                + f"honest strikes {trial['honest_strikes']})",
                flush=True,
            )
        counts = sorted(t["jobs"] for t in trials)
        out["rates"][f"{rate:g}"] = {
            "trials": trials,
            "expected_jobs": 2 / (rate * 2 / 3 * LIE_RATE),
            "median_jobs": statistics.median(counts),
            "p90_jobs": counts[min(len(counts) - 1, int(0.9 * len(counts)))],
            "max_jobs": counts[-1],
            "all_held_back": all(t["held_back"] for t in trials),
            "honest_strikes": sum(t["honest_strikes"] for t in trials),
        }
    return out


# --------------------------------------------------------------------------- report


def report(results: dict[str, Any]) -> Summary:
    summary = Summary()
    if "load" in results:
        print("\nLoad of spot checks (medians over rounds; CPU of every daemon and the caller)")
        for rate, r in results["load"]["rates"].items():
            print(
                f"   rate {float(rate):>5.0%}: {r['jobs_per_s']:7.1f} jobs/s "
                f"({r['throughput_vs_none']:.3f}x none), {r['cpu_ms_per_job']:6.2f} ms CPU/job "
                f"({r['cpu_per_job_vs_none']:.3f}x none), {100 * r['checked_share']:.1f}% checked"
            )
        ten = results["load"]["rates"]["0.1"]["cpu_per_job_vs_none"]
        summary.add(
            "CPU per job at a 10% check rate vs none",
            f"{ten:.3f}x",
            f"<= {1 + TARGET_EXTRA_CPU_AT_10:g}x",
            ten <= 1 + TARGET_EXTRA_CPU_AT_10,
        )
    if "caught" in results:
        print(f"\nJobs until a peer that lies in {LIE_RATE:.0%} of its answers is held back")
        for rate, r in results["caught"]["rates"].items():
            print(
                f"   rate {float(rate):>5.0%}: median {r['median_jobs']:g}, p90 {r['p90_jobs']}, "
                f"max {r['max_jobs']} (expected ~{r['expected_jobs']:.0f}); "
                f"{'all' if r['all_held_back'] else 'NOT all'} held back; "
                f"honest strikes {r['honest_strikes']}"
            )
        ten = results["caught"]["rates"]["0.1"]
        summary.add(
            "jobs until held back at 10%, most of the trials",
            str(ten["max_jobs"]),
            f"<= {MAX_CAUGHT_JOBS} (the test's bound)",
            ten["all_held_back"] and ten["max_jobs"] <= MAX_CAUGHT_JOBS,
        )
        honest = sum(r["honest_strikes"] for r in results["caught"]["rates"].values())
        summary.add("strikes on honest peers", str(honest), "0", honest == 0)
    if summary:
        print("\nSummary")
        width = max(len(row["figure"]) for row in summary)
        for row in summary:
            value, target = row["value"], row["target"]
            print(f"   {row['figure']:<{width}}  {value:>8}  {target:<26} {row['verdict']}")
    return summary


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-verify-") as tmp:
        root = Path(tmp)
        if "load" in args.only:
            print(
                f"1. load: 2 workers (fake {args.service_ms:g} ms), {args.callers} callers, "
                f"{args.rounds} rounds of {args.window:g} s per rate",
                flush=True,
            )
            results["load"] = await load(root / "load", args)
        if "caught" in args.only:
            print(
                f"2. caught: a peer lying in {LIE_RATE:.0%} of answers, "
                f"{args.trials} trials per rate",
                flush=True,
            )
            results["caught"] = await caught(root / "caught", args)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", default=",".join(SECTIONS), help="sections: load,caught")
    parser.add_argument("--window", type=float, default=8.0, help="seconds per rate per round")
    parser.add_argument("--warm", type=float, default=1.0, help="seconds of load before measuring")
    parser.add_argument("--rounds", type=int, default=4, help="rounds over the rates")
    parser.add_argument("--callers", type=int, default=8, help="jobs in flight per router")
    parser.add_argument("--service-ms", type=float, default=2.0, help="the workers' fake model")
    parser.add_argument("--trials", type=int, default=10, help="caught: seeds per rate")
    parser.add_argument("--quick", action="store_true", help="short windows, 2 rounds, 3 trials")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    args.only = {s.strip() for s in args.only.split(",") if s.strip()}
    if not args.only <= set(SECTIONS):
        parser.error(f"--only takes {', '.join(SECTIONS)}")
    if args.quick:
        args.window, args.warm, args.rounds, args.trials = 2.0, 0.5, 2, 3
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks
    logging.getLogger("node").setLevel(logging.ERROR)  # the caught section's nodes: no warnings
    began = time.monotonic()
    machine = bench_machine()
    try:
        results = trio.run(measure, args)
    except KeyboardInterrupt:
        print("interrupted: every node process was stopped", file=sys.stderr)
        return 130
    machine["load_after"] = load_now()
    results["machine"] = machine
    results["summary"] = report(results)
    results["total_s"] = time.monotonic() - began
    print(
        f"\n{machine['cpu']}, {machine['cpus']} CPUs, load {machine['load_before']} before, "
        f"{machine['load_after']} after (total {results['total_s']:.0f} s)"
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
