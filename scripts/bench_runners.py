"""Benchmark the runners: OpenVINO vs torch eager, dynamic batching, OpenVINO precisions,
generation, forwarding.

Five sections, each measured in one run so the ratios compare like with like:

1. engines: per model (EfficientNet-Lite0, all-MiniLM-L6-v2) and batch size (1,
   8, 32), latency (median, p90) and rows/s of the OpenVINO runner against torch
   eager on the same inputs, both called through trio the way the node calls
   them, both on the same cores (torch.set_num_threads = the CPU count; OpenVINO's
   LATENCY hint spreads one request over all cores). The OpenVINO runners run at
   their default, auto precision; the report says what each chose and why.
2. batching: MiniLM under 32 concurrent single-text callers, BatchingRunner
   around the OpenVINO runner vs the bare runner (its own limiter queues them).
3. precision: per OpenVINO model, the auto choice with the figures it measured
   at load, and every candidate it considered (weights x arithmetic), pinned and
   timed in alternating blocks at batch 1, 8 and 32.
4. generation: tokens/s and time to first token through each text-generation
   runner's stream() vs the same server read directly over SSE. Adding a runner
   is one entry in GENERATORS.
5. forwarding: the overhead our layers add to a tiny backend request: the
   OpenAI runner's infer() vs a raw POST with the same body, and the node hop
   (client -> node over libp2p -> runner) vs calling the runner in-process.

Converted models are cached in --data-dir (default ~/.cache/swarm-bench), so
only the first run converts. Timings are printed, never asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import trio
from bench_runners_lib.common import FULL, QUICK, Budget, Figures, Targets, machine, met
from bench_runners_lib.engines import (
    bench_batching,
    bench_engines,
    bench_precision,
    report_batching,
    report_engines,
    report_precision,
)
from bench_runners_lib.llm import (
    Env,
    bench_forwarding,
    bench_generation,
    llama_server,
    report_forwarding,
    report_generation,
)

SECTIONS = ("engines", "batching", "precision", "generation", "forwarding")


def report_targets(targets: Targets, results: Figures) -> None:
    print("Targets")
    print(f"  {'figure':<48}{'measured':>10}  {'target':<8} result")
    checks: list[Figures] = []
    for name, value, target, ok in targets:
        checks.append({"figure": name, "measured": value, "target": target, "met": ok})
        print(f"  {name:<48}{value:>10}  {target:<8} {met(ok)}")
    results["targets"] = checks


STARTED = time.perf_counter()


def progress(section: str) -> None:
    """Where the run is, on stderr (stdout is the report): sections take minutes."""
    print(f"[{time.perf_counter() - STARTED:6.1f} s] {section} ...", file=sys.stderr, flush=True)


async def run(
    args: argparse.Namespace, budget: Budget, sections: list[str], url: str | None
) -> Figures:
    results: Figures = {}
    targets: Targets = []
    data_dir: Path = args.data_dir
    if "engines" in sections:
        progress("engines (first run converts the models: a minute)")
        results["engines"] = await bench_engines(data_dir, budget)
        report_engines(results["engines"], targets)
    if "batching" in sections:
        progress("batching")
        results["batching"] = await bench_batching(data_dir, budget, args.wait_ms)
        report_batching(results["batching"], targets)
    if "precision" in sections:
        progress("precision (first run converts the int8 IRs and measures)")
        results["precision"] = await bench_precision(data_dir, budget)
        report_precision(results["precision"])
    if url is not None:
        env = Env(url, data_dir)
        if "generation" in sections:
            progress("generation")
            results["generation"] = await bench_generation(env, budget)
            report_generation(results["generation"])
        if "forwarding" in sections:
            progress("forwarding")
            results["forwarding"] = await bench_forwarding(env, budget)
            report_forwarding(results["forwarding"], targets)
    report_targets(targets, results)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--only", choices=SECTIONS, action="append", help="run only this section (repeatable)"
    )
    parser.add_argument("--quick", action="store_true", help="shorter runs, noisier figures")
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=Path.home() / ".cache" / "swarm-bench",
        help="where converted models are cached across runs",
    )
    parser.add_argument("--wait-ms", type=float, default=2.0, help="batching max_wait_ms")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    budget = QUICK if args.quick else FULL
    sections = args.only or list(SECTIONS)
    info = machine()
    print(
        f"Machine: {info['cpu']}, {info['cores']} cores, {info['ram_gib']} GiB RAM, "
        f"Python {info['python']}; load average before: {info['load_before']}"
    )
    print(f"Sections: {', '.join(sections)}{' (quick)' if args.quick else ''}\n")
    args.data_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        url = None
        if {"generation", "forwarding"} & set(sections):  # started here: its wait blocks
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-llama-"))
            url = stack.enter_context(llama_server(Path(tmp)))
        results = trio.run(run, args, budget, sections, url)
    info["load_after"] = [round(x, 2) for x in os.getloadavg()]
    info["seconds"] = round(time.perf_counter() - start, 1)
    results["machine"] = info
    print(
        f"\nTook {info['seconds']} s; load average after: {info['load_after']} "
        "(the load before the run is other work on this machine)"
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
