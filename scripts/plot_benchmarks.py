"""Draw docs/BENCHMARKS.md's plots from the figures the benchmarks wrote with --json.

    .venv/bin/python scripts/plot_benchmarks.py [--figures docs/bench] [--out docs/plots]

Reads (each optional; a plot whose figures are missing is skipped, and said so):
  bench_swarm.json     -> swarm_scaling.png: jobs/s by workers, ideal and efficiency
  bench_swarm.json, bench_runners_forwarding.json
                       -> latency_by_hop.png: a job run locally vs one hop away
  bench_runners_engines.json
                       -> openvino_vs_torch.png: rows/s by batch, both engines, two models
Every figure drawn comes from one run of one script; the plots say which file.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # after the backend is chosen

REPO = Path(__file__).resolve().parents[1]


def load(path: Path) -> Any:
    return json.loads(path.read_text()) if path.exists() else None


def swarm_scaling(swarm: Any, out: Path) -> None:
    rows = list(swarm["throughput"])
    n = [r["n"] for r in rows]
    got = [r["jobs_per_s"] for r in rows]
    ideal = [k * rows[0]["jobs_per_s"] for k in n]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(n, ideal, "--", color="grey", label="N x throughput at 1")
    left.plot(n, got, "o-", label="least-loaded (measured)")
    rr = swarm.get("round_robin")
    if rr:
        left.plot([rr["n"]], [rr["jobs_per_s"]], "s", label="round-robin (measured)")
    left.set(xlabel="workers", ylabel="jobs/s", title="Throughput at the entry node")
    left.set_xticks(n)
    left.legend()
    right.plot(n, [r["efficiency"] for r in rows], "o-")
    right.axhline(0.8, color="red", linestyle=":", label="target at 8 workers (0.8)")
    right.set(xlabel="workers", ylabel="efficiency", ylim=(0, 1.1), title="Scaling efficiency")
    right.set_xticks(n)
    right.legend()
    fig.suptitle("bench_swarm: fake model of 20 ms, 4 callers per worker (bench_swarm.json)")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def latency_by_hop(swarm: Any, forwarding: Any, out: Path) -> None:
    labels, local, routed = [], [], []
    hops = {h["model"]: h for h in swarm["hop"]} if swarm else {}
    for key, name in (("z1", "0 ms model"), ("s1", "20 ms model")):
        hop = hops.get(key)
        if hop:
            labels.append(f"fake, {name}\n(bench_swarm)")
            local.append(hop["local_p50_ms"])
            routed.append(hop["routed_p50_ms"])
    if forwarding:
        e2e = forwarding["end_to_end"]
        labels.append("llama.cpp, 1 token\n(bench_runners)")
        local.append(e2e["raw_ms"])
        routed.append(e2e["node_ms"])
    fig, ax = plt.subplots(figsize=(8, 4))
    x = range(len(labels))
    ax.bar([i - 0.2 for i in x], local, 0.4, label="run directly")
    ax.bar([i + 0.2 for i in x], routed, 0.4, label="through a node (one hop)")
    for i, (a, b) in enumerate(zip(local, routed, strict=True)):
        ax.annotate(f"+{b - a:.2f} ms", (i + 0.2, b), ha="center", va="bottom")
    ax.set_xticks(list(x), labels)
    ax.set(ylabel="median latency (ms)", title="Latency a routed hop adds")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def openvino_vs_torch(engines: Any, out: Path) -> None:
    models = engines["models"]
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4))
    for ax, (model, rows) in zip(axes, models.items(), strict=True):
        for engine, style in (("openvino", "o-"), ("torch", "s-")):
            batches = sorted(rows[engine]["batches"], key=int)
            ax.plot(
                [int(b) for b in batches],
                [rows[engine]["batches"][b]["rows_per_s"] for b in batches],
                style,
                label=engine if engine == "torch" else "OpenVINO",
            )
        ax.set(xlabel="batch", ylabel="rows/s", title=model, xscale="log")
        ax.set_xticks([1, 8, 32], ["1", "8", "32"])
        ax.legend()
    fig.suptitle("bench_runners: OpenVINO vs torch eager on CPU (bench_runners_engines.json)")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--figures", type=Path, default=REPO / "docs" / "bench")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "plots")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    swarm = load(args.figures / "bench_swarm.json")
    runners = load(args.figures / "bench_runners_forwarding.json")
    engines = load(args.figures / "bench_runners_engines.json")
    forwarding = runners.get("forwarding") if runners else None
    drawn = []
    if swarm:
        swarm_scaling(swarm, args.out / "swarm_scaling.png")
        drawn.append("swarm_scaling.png")
    if swarm or forwarding:
        latency_by_hop(swarm, forwarding, args.out / "latency_by_hop.png")
        drawn.append("latency_by_hop.png")
    if engines and engines.get("engines"):
        openvino_vs_torch(engines["engines"], args.out / "openvino_vs_torch.png")
        drawn.append("openvino_vs_torch.png")
    print(f"drew {', '.join(drawn) or 'nothing'} in {args.out}")
    missing = 3 - len(drawn)
    if missing:
        print(f"{missing} plot(s) skipped: their --json figures are not in {args.figures}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
