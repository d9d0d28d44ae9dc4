"""Benchmark streams that survive their producer, and hedged requests (issue 15).

In one process, real libp2p nodes on 127.0.0.1 (no mDNS, no DHT): two peers
serving a streamed model and an entry node serving nothing, linked to both, with
one ``SwarmClient`` at the entry.

1. stall: the producer of a streamed answer is cut off at a seeded random chunk
   (its side of the connection to the entry dropped: what the entry sees of a
   SIGKILLed peer, whose socket the kernel closes). Per trial: the stall the
   client sees (its last chunk before the death to its first chunk after), the
   median gap between chunks of the same stream as the same-run baseline, and
   the tokens the continuing peer reads again (the answer's start it continues
   from, ``continue_tokens``: prefill, not generation). ``--model fake`` (the
   default) streams the fake's words, ``--chunk-ms`` apart; ``--model smollm2``
   greedy SmolLM2-135M chats on OpenVINO GenAI (f32 numerics on both peers, a
   one-off conversion first), its text checked against the uninterrupted one.
2. hedge: time to first chunk of streamed jobs when one of the two peers stalls
   ``--stall-ms`` on 5% of its jobs (``FakeRunner`` ``stall_rate``, seeded), the
   entry sending round-robin: without hedging and with ``hedge_ms``
   ``--hedge-ms``, in alternating windows of ``--jobs`` jobs. p50, p99 and max
   per mode, the p99 ratio, and the hedges sent, won and cancelled.

``--only stall,hedge`` picks sections; ``--quick`` makes both short. Every wait
is bounded.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import random
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import trio
from bench_report import Summary, load_now
from bench_report import machine as bench_machine
from libp2p.peer.id import ID

from node.client import SwarmClient
from node.config import NodeConfig
from node.daemon import Node
from node.jobs.router import RouterConfig, Strategy
from protocols import Chunk, Result
from runners.base import Runner
from runners.fake import FakeRunner

SECTIONS = ("stall", "hedge")
STALL_RATE = 0.05
JOB_WAIT_S = 120.0
LINK_WAIT_S = 60.0
TARGET_STALL_X = 20.0  # a resumed stream's stall within 20x its usual chunk gap
SMOLLM2 = "smollm2-135m-instruct"


@asynccontextmanager
async def _node(root: Path, name: str, **settings: Any) -> AsyncIterator[Node]:
    runners = settings.pop("runners", ())
    config = NodeConfig(
        data_dir=root / name,
        listen=("/ip4/127.0.0.1/tcp/0",),
        probe_cuda=False,
        shutdown_grace_s=1.0,
        mdns=False,
        dht=False,
        http=None,
        models=(),
        **settings,
    )
    node = Node(config, runners=runners)
    async with trio.open_nursery() as nursery:
        with trio.fail_after(120):
            await nursery.start(node.run)
        try:
            yield node
        finally:
            node.stop()


async def _swarm(
    stack: AsyncExitStack, root: Path, runners: Sequence[Runner], router: RouterConfig
) -> tuple[Node, list[Node]]:
    servers = [
        await stack.enter_async_context(_node(root, f"s{i}", runners=(r,)))
        for i, r in enumerate(runners)
    ]
    peers = tuple(s.addrs[0] for s in servers)
    entry = await stack.enter_async_context(_node(root, "entry", peers=peers, router=router))
    await _linked(entry, servers)
    return entry, servers


async def _linked(entry: Node, servers: Sequence[Node]) -> None:
    want = {s.peer_id for s in servers}
    with trio.fail_after(LINK_WAIT_S):
        while not want <= {  # noqa: ASYNC110 (polling node state)
            p.peer_id for p in entry.services.membership.table.peers.values() if p.models
        }:
            await trio.sleep(0.05)


def _pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


# --------------------------------------------------------------------------- 1. stall


async def _one_stream(
    client: SwarmClient,
    entry: Node,
    servers: Sequence[Node],
    model: str,
    inputs: dict[str, Any],
    params: dict[str, Any],
    cut: int | None,
) -> tuple[Result, list[float], list[str], str | None]:
    """One streamed job; with ``cut``, its producer is cut off at that chunk (by a task
    of its own, so the chunks' arrival times are not held up by the cut)."""
    times: list[float] = []
    texts: list[str] = []
    killed: list[str] = []

    async def kill(victim: Node) -> None:
        await victim.services.host.disconnect(ID.from_base58(entry.peer_id))

    async with trio.open_nursery() as nursery:

        async def on_chunk(chunk: Chunk) -> None:
            times.append(time.perf_counter())
            texts.append(str(chunk.outputs.get("text", "")))
            if cut is not None and len(times) == cut and not killed:
                busy = [s for s in servers if entry.services.dispatcher.in_flight.get(s.peer_id)]
                if len(busy) == 1:
                    killed.append(busy[0].peer_id)
                    nursery.start_soon(kill, busy[0])

        with trio.fail_after(JOB_WAIT_S):
            result = await client.infer(model, inputs, params=params, on_chunk=on_chunk)
    return result, times, texts, killed[0] if killed else None


async def stall(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    if args.model == "smollm2":
        from runners.openvino_genai import GenAIConfig, OpenVINOGenAIRunner

        exact = GenAIConfig(
            inference_precision="f32", kv_cache_precision="f32", dynamic_quantization=False
        )
        models = root / "models"
        first = OpenVINOGenAIRunner(models, exact)
        await first.load()  # the one-off conversion, outside the timed part
        await first.close()
        runners: list[Runner] = [OpenVINOGenAIRunner(models, exact) for _ in range(2)]
        model = SMOLLM2
        messages = [{"role": "user", "content": "Tell a story about a painter."}]
        inputs: dict[str, Any] = {"messages": json.dumps(messages)}
        params: dict[str, Any] = {"temperature": 0.0, "max_new_tokens": args.tokens}
    else:
        latency = args.chunk_ms * args.tokens / 1000
        runners = [FakeRunner("gen", latency_s=latency) for _ in range(2)]
        model, inputs, params = "gen", {"text": "a story"}, {"chunks": args.tokens}
    trials: list[dict[str, Any]] = []
    router = RouterConfig(strategy=Strategy.ROUND_ROBIN)
    async with AsyncExitStack() as stack:
        entry, servers = await _swarm(stack, root / "stall", runners, router)
        async with SwarmClient.connect(entry.addrs[0]) as client:
            whole, _, reference, _ = await _one_stream(
                client, entry, servers, model, inputs, params, None
            )
            chunks = len(reference)
            for trial in range(args.trials):
                cut = rng.randrange(2, max(3, chunks - 2))
                await _linked(entry, servers)
                result, times, texts, killed = await _one_stream(
                    client, entry, servers, model, inputs, params, cut
                )
                meta = result.meta
                if killed is None or "takeover_chunks" not in meta:
                    print(f"   trial {trial}: no producer was cut (it had finished)", flush=True)
                    continue
                took = int(str(meta["takeover_chunks"]).split(",")[-1])
                tokens = int(str(meta["takeover_tokens"]).split(",")[-1])
                gaps = [b - a for a, b in itertools.pairwise(times)]
                stalled = times[took] - times[took - 1]
                usual = statistics.median(gaps[: took - 1] + gaps[took:])
                row = {
                    "cut_at": cut,
                    "took_over_at": took,
                    "stall_ms": 1000 * stalled,
                    "usual_gap_ms": 1000 * usual,
                    "tokens_recomputed": tokens,
                    "same_text": "".join(texts) == "".join(reference),
                    "same_usage": result.outputs.get("completion_tokens")
                    == whole.outputs.get("completion_tokens"),
                }
                trials.append(row)
                print(
                    f"   trial {trial}: cut at chunk {cut}, taken over at {took}: stall "
                    f"{row['stall_ms']:.1f} ms (usual gap {row['usual_gap_ms']:.1f} ms), "
                    f"{tokens} tokens read again, same text {row['same_text']}",
                    flush=True,
                )
    stalls = [t["stall_ms"] for t in trials]
    gaps = [t["usual_gap_ms"] for t in trials]
    return {
        "model": model,
        "chunks": chunks,
        "trials": trials,
        "median_stall_ms": statistics.median(stalls) if stalls else None,
        "max_stall_ms": max(stalls) if stalls else None,
        "median_usual_gap_ms": statistics.median(gaps) if gaps else None,
        "median_tokens_recomputed": (
            statistics.median(t["tokens_recomputed"] for t in trials) if trials else None
        ),
        "all_same_text": all(t["same_text"] for t in trials),
    }


# --------------------------------------------------------------------------- 2. hedge


async def hedge(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    latency = args.service_ms / 1000
    stalling = FakeRunner(
        "gen",
        latency_s=latency,
        stall_rate=STALL_RATE,
        stall_s=args.stall_ms / 1000,
        seed=args.seed,
    )
    steady = FakeRunner("gen", latency_s=latency)
    ttft: dict[str, list[float]] = {"off": [], "on": []}
    router = RouterConfig(strategy=Strategy.ROUND_ROBIN)
    async with AsyncExitStack() as stack:
        entry, _ = await _swarm(stack, root / "hedge", [stalling, steady], router)
        async with SwarmClient.connect(entry.addrs[0]) as client:
            job = 0
            for window in range(2 * args.windows):
                mode = ("off", "on")[window % 2]
                hedge_ms = 0 if mode == "off" else args.hedge_ms
                for _ in range(args.jobs):
                    job += 1
                    started = time.perf_counter()
                    first: list[float] = []

                    async def on_chunk(chunk: Chunk, into: list[float] = first) -> None:
                        if not into:
                            into.append(time.perf_counter())

                    with trio.fail_after(JOB_WAIT_S):
                        await client.infer(
                            "gen",
                            {"text": f"job {job}"},
                            params={"chunks": 4},
                            on_chunk=on_chunk,
                            hedge_ms=hedge_ms,
                        )
                    ttft[mode].append(1000 * (first[0] - started))
            hedges = entry.services.dispatcher.hedges.describe()
    out: dict[str, Any] = {
        "stall_rate": STALL_RATE,
        "stall_ms": args.stall_ms,
        "service_ms": args.service_ms,
        "hedge_ms": args.hedge_ms,
        "jobs_per_mode": len(ttft["off"]),
        "stalled_jobs": stalling.stalled,
        "hedges": hedges,
    }
    for mode, values in ttft.items():
        out[mode] = {
            "p50_ms": _pct(values, 0.5),
            "p99_ms": _pct(values, 0.99),
            "max_ms": max(values),
        }
    out["p99_off_vs_on"] = out["off"]["p99_ms"] / out["on"]["p99_ms"]
    return out


# --------------------------------------------------------------------------- report


def report(results: dict[str, Any]) -> Summary:
    summary = Summary()
    if "stall" in results and results["stall"]["trials"]:
        r = results["stall"]
        ratio = r["median_stall_ms"] / r["median_usual_gap_ms"]
        print(f"\nStall when the producer dies ({r['model']}, {r['chunks']} chunks a stream)")
        print(
            f"   median {r['median_stall_ms']:.1f} ms, max {r['max_stall_ms']:.1f} ms; usual gap "
            f"{r['median_usual_gap_ms']:.1f} ms ({ratio:.1f}x); tokens read again: median "
            f"{r['median_tokens_recomputed']:g}; text as uninterrupted: {r['all_same_text']}"
        )
        summary.add(
            "median stall vs usual chunk gap",
            f"{ratio:.1f}x",
            f"<= {TARGET_STALL_X:g}x",
            ratio <= TARGET_STALL_X,
        )
        summary.add(
            "resumed text equals uninterrupted", str(r["all_same_text"]), "True", r["all_same_text"]
        )
    if "hedge" in results:
        r = results["hedge"]
        print(
            f"\nTime to first chunk, one of two peers stalling {r['stall_ms']:g} ms on "
            f"{r['stall_rate']:.0%} of its jobs ({r['jobs_per_mode']} jobs per mode, "
            f"{r['stalled_jobs']} stalled)"
        )
        for mode in ("off", "on"):
            m = r[mode]
            label = "no hedging" if mode == "off" else f"hedge_ms {r['hedge_ms']}"
            print(
                f"   {label:>12}: p50 {m['p50_ms']:7.1f} ms, p99 {m['p99_ms']:7.1f} ms, "
                f"max {m['max_ms']:7.1f} ms"
            )
        print(f"   p99 without / with hedging: {r['p99_off_vs_on']:.2f}x; hedges {r['hedges']}")
        summary.add(
            "p99 TTFT without / with hedging",
            f"{r['p99_off_vs_on']:.2f}x",
            "> 1x",
            r["p99_off_vs_on"] > 1,
        )
    if summary:
        print("\nSummary")
        width = max(len(row["figure"]) for row in summary)
        for row in summary:
            print(
                f"   {row['figure']:<{width}}  {row['value']:>8}  "
                f"{row['target']:<10} {row['verdict']}"
            )
    return summary


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-resume-") as tmp:
        root = Path(tmp)
        if "stall" in args.only:
            print(
                f"1. stall: {args.trials} streams of {args.tokens} tokens ({args.model}), "
                f"each producer cut at a random chunk (seed {args.seed})",
                flush=True,
            )
            results["stall"] = await stall(root / "stall", args)
        if "hedge" in args.only:
            print(
                f"2. hedge: {args.windows} windows of {args.jobs} jobs per mode, one peer "
                f"stalling {args.stall_ms:g} ms on {STALL_RATE:.0%} of its jobs (seed {args.seed})",
                flush=True,
            )
            results["hedge"] = await hedge(root / "hedge", args)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", default=",".join(SECTIONS), help="sections: stall,hedge")
    parser.add_argument("--model", choices=("fake", "smollm2"), default="fake")
    parser.add_argument("--trials", type=int, default=20, help="stall: streams cut")
    parser.add_argument("--tokens", type=int, default=64, help="stall: tokens a stream")
    parser.add_argument("--chunk-ms", type=float, default=10.0, help="stall: the fake's pace")
    parser.add_argument("--jobs", type=int, default=100, help="hedge: jobs per window")
    parser.add_argument("--windows", type=int, default=4, help="hedge: windows per mode")
    parser.add_argument("--service-ms", type=float, default=10.0, help="hedge: the fake's time")
    parser.add_argument("--stall-ms", type=float, default=1000.0, help="hedge: a stall's length")
    parser.add_argument("--hedge-ms", type=int, default=150)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="5 streams, 2x60 jobs per mode")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    args.only = {s.strip() for s in args.only.split(",") if s.strip()}
    if not args.only <= set(SECTIONS):
        parser.error(f"--only takes {', '.join(SECTIONS)}")
    if args.quick:
        args.trials, args.tokens, args.jobs, args.windows = 5, 32, 60, 2
    logging.getLogger("node").setLevel(logging.ERROR)
    began = time.monotonic()
    machine = bench_machine()
    try:
        results = trio.run(measure, args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
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
