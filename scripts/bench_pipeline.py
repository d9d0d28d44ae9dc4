"""Benchmark pipeline stages: SmolLM2-135M-Instruct split 1, 2 and 3 ways against the whole model.

1. memory: one child process per case, so each peak is its own: the whole
   model as ``runners.torch_generate`` loads it, and stages 0-29, 0-9, 10-19,
   20-29 (``runners.torch_stage``). Per case: RSS after the imports (torch and
   transformers, the same for all), peak RSS after the load, the stage's weight
   bytes, and the peak against the whole model's.
2. speed: in this process, greedy generation of the same chat through the
   whole model and through chains of 1 (0-29), 2 (0-14, 15-29) and 3 (0-9,
   10-19, 20-29) stages called in process (``pipeline_driver.runner_stage``:
   the request a peer gets, without the network; loopback over libp2p is
   ``tests/test_pipeline_nodes.py``'s, not timed here). Rounds rotate the
   cases. Per case: tokens/s and per-token latency (medians over rounds), the
   cost per stage per token against the whole model, and ``identical: yes|no``
   (the text against the whole model's).
3. stall: the 3-stage chain with its middle stage failing after the prompt and
   five tokens, replaced by another holder: the time from the failure to the
   rebuilt stage's answer, and whether the text is still identical.

``--quick``: 12 tokens, 2 rounds. Prints JSON at the end (``--json PATH`` too).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import trio

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from protocols import ErrorCode, RemoteError  # noqa: E402
from runners.generation import Message, Prompt, Request, Sampling  # noqa: E402
from runners.pipeline_driver import Chain, Stage, Tokens, Trace, runner_stage  # noqa: E402
from runners.torch_device import TorchPlacement  # noqa: E402
from runners.torch_generate import TorchGenerateConfig, TorchGenerateRunner  # noqa: E402
from runners.torch_stage import (  # noqa: E402
    LayerRange,
    StageCall,
    TorchStageConfig,
    TorchStageRunner,
)

CPU = TorchPlacement("cpu", "fp32")
QUESTION = "Write two sentences about the river Danube."
SPLITS = {1: ("0-29",), 2: ("0-14", "15-29"), 3: ("0-9", "10-19", "20-29")}
CHILD = """
import json, resource, sys, time
import psutil
proc = psutil.Process()
import torch, transformers, gguf, numpy
from transformers.models.llama import modeling_llama
base = proc.memory_info().rss
case = sys.argv[1]
t = time.perf_counter()
if case == "whole":
    import trio
    from runners.torch_device import TorchPlacement
    from runners.torch_generate import TorchGenerateConfig, TorchGenerateRunner
    r = TorchGenerateRunner(TorchGenerateConfig(placement=TorchPlacement("cpu", "fp32")))
    trio.run(r.load)
    weights = sum(p.numel() * p.element_size() for p in r._engine.model.parameters())
else:
    from runners.torch_device import TorchPlacement
    from runners.torch_stage import LayerRange, StageEngine, TorchStageConfig
    e = StageEngine.open(TorchStageConfig(LayerRange.parse(case), TorchPlacement("cpu", "fp32")))
    weights = e.weight_bytes
print(json.dumps({"case": case, "base_rss": base, "load_s": time.perf_counter() - t,
    "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "weights": weights}))
"""


def memory() -> list[dict[str, Any]]:
    rows = []
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    for case in ("whole", "0-29", "0-9", "10-19", "20-29"):
        out = subprocess.run(
            [sys.executable, "-c", CHILD, case],
            capture_output=True,
            text=True,
            timeout=600,
            env=env,
            check=True,
        )
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    whole = rows[0]["peak_rss"]
    print("\n1. memory (one process per case, MB)")
    print(f"{'case':>8} {'imports':>8} {'peak':>7} {'weights':>8} {'peak/whole':>10} {'load s':>7}")
    for row in rows:
        row["peak_vs_whole"] = row["peak_rss"] / whole
        print(
            f"{row['case']:>8} {row['base_rss'] / 2**20:8.0f} {row['peak_rss'] / 2**20:7.0f} "
            f"{row['weights'] / 2**20:8.0f} {row['peak_vs_whole']:10.2f} {row['load_s']:7.1f}"
        )
    return rows


def _request(new: int) -> Request:
    return Request(Prompt(messages=(Message("user", QUESTION),)), Sampling(max_new_tokens=new))


async def speed(new: int, rounds: int) -> dict[str, Any]:
    whole = TorchGenerateRunner(TorchGenerateConfig(placement=CPU))
    await whole.load()
    ranges = sorted({r for split in SPLITS.values() for r in split} | {"10-19"})
    stages = {r: TorchStageRunner(TorchStageConfig(LayerRange.parse(r), CPU)) for r in ranges}
    spare = TorchStageRunner(TorchStageConfig(LayerRange.parse("10-19"), CPU))
    for runner in (*stages.values(), spare):
        await runner.load()
    tokens = await trio.to_thread.run_sync(Tokens.open)
    chat = {"messages": json.dumps([{"role": "user", "content": QUESTION}])}
    times: dict[str, list[float]] = {"whole": [], **{str(n): [] for n in SPLITS}}
    texts: dict[str, str] = {}
    counts: dict[str, int] = {}
    cases = ["whole", *(str(n) for n in SPLITS)]
    for i in range(rounds):
        for case in cases[i % len(cases) :] + cases[: i % len(cases)]:
            began = time.perf_counter()
            if case == "whole":
                out = await whole.infer(chat, {"max_new_tokens": new})
                made = out["completion_tokens"]
                assert isinstance(made, int)
                text, count = str(out["text"]), made
            else:
                chain = Chain([runner_stage(stages[r]) for r in SPLITS[int(case)]])
                done = await chain.generate(tokens, _request(new), lambda _: True)
                text, count = done.text, done.completion_tokens
            times[case].append((time.perf_counter() - began) / count)
            texts[case], counts[case] = text, count
    per_token = {case: statistics.median(v) for case, v in times.items()}
    base = per_token["whole"]
    print(f"\n2. speed (in process, {new} new tokens, medians of {rounds} rounds)")
    print(f"{'case':>8} {'tok/s':>7} {'ms/token':>9} {'+ms/stage/token':>16} identical")
    rows = []
    for case in cases:
        n = 0 if case == "whole" else int(case)
        added = (per_token[case] - base) * 1000 / n if n else 0.0
        same = texts[case] == texts["whole"]
        label = "whole" if case == "whole" else f"{case} stage"
        rows.append(
            {
                "case": label,
                "tokens_per_s": 1 / per_token[case],
                "ms_per_token": per_token[case] * 1000,
                "added_ms_per_stage_token": added,
                "identical": same,
                "tokens": counts[case],
            }
        )
        print(
            f"{label:>8} {1 / per_token[case]:7.1f} {per_token[case] * 1000:9.1f} "
            f"{added:16.2f} identical: {'yes' if same else 'no'}"
        )

    # 3. stall: the middle stage fails after the prompt and five tokens.
    middle = runner_stage(stages["10-19"])
    calls = 0

    async def dying(call: StageCall) -> np.ndarray[Any, Any]:
        nonlocal calls
        calls += 1
        if calls >= 7:
            raise RemoteError(ErrorCode.OUTCOME_UNKNOWN, "the stage's peer is gone")
        return await middle(call)

    async def replace(index: int, error: BaseException) -> Stage:
        return runner_stage(spare)

    split = [runner_stage(stages[r]) for r in SPLITS[3]]
    trace = Trace()
    chain = Chain([split[0], dying, split[2]], replace=replace)
    done = await chain.generate(tokens, _request(new), lambda _: True, trace)
    stall = trace.recoveries[0] if trace.recoveries else None
    same = done.text == texts["whole"]
    print("\n3. stall (3 stages, the middle one fails after the prompt and 5 tokens)")
    if stall is not None:
        print(
            f"replaced in {stall.seconds * 1000:.0f} ms, {stall.positions} positions replayed; "
            f"a round takes {per_token['3'] * 1000:.0f} ms; identical: {'yes' if same else 'no'}"
        )
    await whole.close()
    for stage in (*stages.values(), spare):
        await stage.close()
    return {
        "speed": rows,
        "stall": None
        if stall is None
        else {"ms": stall.seconds * 1000, "positions": stall.positions, "identical": same},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="12 tokens, 2 rounds")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", default="memory,speed", help="sections: memory,speed")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    new, rounds = (12, 2) if args.quick else (args.tokens, args.rounds)
    only = set(args.only.split(","))
    print(f"load average {os.getloadavg()[0]:.1f} {os.getloadavg()[1]:.1f}; cpus {os.cpu_count()}")
    report: dict[str, Any] = {"load_average": os.getloadavg(), "tokens": new, "rounds": rounds}
    if "memory" in only:
        report["memory"] = memory()
    if "speed" in only:
        report.update(trio.run(speed, new, rounds))
    report["load_average_after"] = os.getloadavg()
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text)


if __name__ == "__main__":
    main()
