"""Benchmark pulling a model from peers: one provider, two, and a plain TCP copy.

Issue 16's benchmark. The content is EfficientNet-Lite0's converted IR (fp32,
~18.7 MB: model.xml + model.bin), converted here once or taken from ``--ir DIR``.

1. throughput: two providers, real ``swarm daemon`` processes on 127.0.0.1
   sharing the IR (``openvino:name=effnet,path=...``), and a puller in this
   process (``node.content.pull.Puller``, its own libp2p host, into a fresh dir
   each time: every chunk fetched, checked and written). Rounds go one provider
   (B), two (B and C), and a plain TCP copy of the same bytes (a sender process
   writing the files into a socket; this process reading them into a file): in
   another order each round, so the machine's other load falls on all alike.
   Done twice: providers uncapped, then each capped at ``--cap`` bytes a second
   (``--upload-rate``, the case multi-source pulling is for: providers whose
   uplinks are the limit). Medians over rounds; ratios from the same run.
2. first job: a node with an empty data dir started with ``--model
   openvino:name=effnet,content=ID,task=classify --peer B --peer C`` (uncapped
   providers); seconds from its start to ready, to its record listing effnet (the
   pull and load), and to the first job answered by it (local-first).

``--quick``: fewer rounds. Every wait is bounded; every process is stopped on the
way out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import trio
from bench_report import Summary, cpu_model
from bench_swarm_lib.swarm import NodeProc, start_node, stop_all

from bootstrap.addrs import peer_info
from node.client import SwarmClient
from node.content.pull import Puller
from node.net.host import running_host
from protocols.content import parse_cid
from runners.convert_efficientnet import probe_input

REPO = Path(__file__).resolve().parent.parent
SENDER = """
import socket, sys
files = sys.argv[2:]
srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen(8)
print(srv.getsockname()[1], flush=True)
while True:
    conn, _ = srv.accept()
    for f in files:
        with open(f, "rb") as fh:
            conn.sendfile(fh)
    conn.close()
"""


def convert(out: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "runners.convert_efficientnet", str(out), "fp32"],
        check=True,
        cwd=REPO,
        capture_output=True,
        timeout=900,
    )
    (out / "probe.json").unlink(missing_ok=True)


async def start_provider(root: Path, name: str, ir: Path, cap: float) -> NodeProc:
    args = ["--model", f"openvino:name=effnet,path={ir / 'model.xml'},task=classify"]
    if cap:
        args += ["--upload-rate", str(cap)]
    return await start_node(root, name, args)


async def content_id(node: NodeProc) -> str:
    async with SwarmClient.connect(node.addr) as client:
        record = await client.record()
    [model] = [m for m in record.body["models"] if m["name"] == "effnet"]
    return str(model["content"])


async def pull_once(providers: list[NodeProc], cid: str, scratch: Path) -> tuple[float, int]:
    """Seconds and bytes of one whole pull into a fresh dir."""
    root = Path(tempfile.mkdtemp(dir=scratch))
    try:
        async with running_host(None, ()) as host:
            for p in providers:
                await host.connect(peer_info(p.addr))
            puller = Puller(host, parse_cid(cid), root)
            start = time.perf_counter()
            with trio.fail_after(600):
                await puller.run([p.peer_id for p in providers])
            took = time.perf_counter() - start
            return took, puller.progress.total_bytes
    finally:
        await trio.to_thread.run_sync(shutil.rmtree, root)


async def tcp_once(port: int, scratch: Path) -> tuple[float, int]:
    """Seconds and bytes of reading the sender's bytes into a file."""
    target = scratch / f"tcp-{random.randrange(1 << 30)}"
    got = 0
    start = time.perf_counter()
    with trio.fail_after(600):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream, await trio.open_file(target, "wb") as out:
            while data := await stream.receive_some(1 << 20):
                await out.write(data)
                got += len(data)
    took = time.perf_counter() - start
    target.unlink()
    return took, got


async def throughput(
    root: Path, ir: Path, rounds: int, cap: float, port: int, rng: random.Random
) -> dict[str, Any]:
    label = f"cap{int(cap)}" if cap else "uncapped"
    nodes: list[NodeProc] = []
    try:
        for name in ("b", "c"):
            nodes.append(await start_provider(root, f"{label}-{name}", ir, cap))
        cid = await content_id(nodes[0])
        assert cid == await content_id(nodes[1])
        scratch = root / f"scratch-{label}"
        scratch.mkdir()
        rates: dict[str, list[float]] = {"one": [], "two": [], "tcp": []}
        for _ in range(rounds):
            order = list(rates)
            rng.shuffle(order)
            for kind in order:
                if kind == "tcp":
                    took, size = await tcp_once(port, scratch)
                else:
                    chosen = nodes[:1] if kind == "one" else nodes
                    took, size = await pull_once(chosen, cid, scratch)
                rates[kind].append(size / took / 1e6)
                print(f"  {label} {kind}: {size / took / 1e6:.1f} MB/s", flush=True)
        med = {k: statistics.median(v) for k, v in rates.items()}
        return {
            "cap_bytes_per_s": cap,
            "content": cid,
            "mb_per_s": med,
            "runs": rates,
            "two_over_one": med["two"] / med["one"],
            "one_over_tcp": med["one"] / med["tcp"],
        }
    finally:
        await stop_all(nodes)


async def first_job(root: Path, ir: Path) -> dict[str, Any]:
    nodes: list[NodeProc] = []
    try:
        for name in ("fj-b", "fj-c"):
            nodes.append(await start_provider(root, name, ir, 0.0))
        cid = await content_id(nodes[0])
        spec = f"openvino:name=effnet,content={cid},task=classify"
        start = time.perf_counter()
        a = await start_node(
            root, "fj-a", ["--model", spec, "--peer", nodes[0].addr, "--peer", nodes[1].addr]
        )
        nodes.append(a)
        ready = time.perf_counter() - start
        pixels = np.ascontiguousarray(probe_input()[:1])
        async with SwarmClient.connect(a.addr) as client:
            with trio.fail_after(600):
                while True:
                    record = await client.record()
                    if any(m["name"] == "effnet" for m in record.body["models"]):
                        break
                    await trio.sleep(0.05)
                served = time.perf_counter() - start
                result = await client.infer(
                    "effnet", {"pixel_values": pixels}, strategy="local-first"
                )
        answered = time.perf_counter() - start
        return {
            "content": cid,
            "start_to_ready_s": ready,
            "start_to_serving_s": served,
            "start_to_first_job_s": answered,
            "served_by_a": result.meta.get("served_by") == a.peer_id,
        }
    finally:
        await stop_all(nodes)


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    print(f"seed {args.seed}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-pull-") as tmp:
        root = Path(tmp)
        ir = args.ir
        if ir is None:
            ir = root / "ir"
            ir.mkdir()
            print("converting EfficientNet-Lite0 to IR ...", flush=True)
            await trio.to_thread.run_sync(convert, ir)
        files = [str(ir / "model.xml"), str(ir / "model.bin")]
        sender = await trio.lowlevel.open_process(
            [sys.executable, "-c", SENDER, "x", *files], stdout=subprocess.PIPE
        )
        try:
            assert sender.stdout is not None
            port = int((await sender.stdout.receive_some(64)).split()[0])
            rounds = 3 if args.quick else 7
            sections = {
                "uncapped": await throughput(root, ir, rounds, 0.0, port, rng),
                "capped": await throughput(root, ir, rounds, args.cap, port, rng),
            }
        finally:
            sender.kill()
            await sender.wait()
        sections["first_job"] = await first_job(root, ir)
    return sections


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="3 rounds instead of 7")
    p.add_argument("--ir", type=Path, help="a dir holding model.xml + model.bin (else converted)")
    p.add_argument("--cap", type=float, default=3e6, help="bytes/s per provider when capped")
    p.add_argument("--seed", type=int, default=random.SystemRandom().randrange(1 << 30))
    p.add_argument("--json", type=Path, help="write the figures here too")
    args = p.parse_args()
    load_before = os.getloadavg()
    sections = trio.run(main_async, args)
    load_after = os.getloadavg()
    summary = Summary()
    for key in ("uncapped", "capped"):
        s = sections[key]
        summary.add(
            f"two providers / one ({key})",
            f"{s['two_over_one']:.2f}x",
            ">= 1.6x",
            s["two_over_one"] >= 1.6,
        )
        summary.add(
            f"one provider / plain TCP ({key})",
            f"{s['one_over_tcp']:.3f}x",
            ">= 0.5x",
            s["one_over_tcp"] >= 0.5,
        )
    fj = sections["first_job"]
    report = {
        "machine": {
            "cpu": cpu_model(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
        },
        "load_before": load_before,
        "load_after": load_after,
        "seed": args.seed,
        "quick": args.quick,
        **sections,
        "targets": summary,
    }
    print(json.dumps(report, indent=2))
    print()
    for key in ("uncapped", "capped"):
        m = sections[key]["mb_per_s"]
        print(
            f"{key:9s} one {m['one']:7.1f} MB/s  two {m['two']:7.1f} MB/s  tcp {m['tcp']:8.1f} MB/s"
        )
    ready, serving = fj["start_to_ready_s"], fj["start_to_serving_s"]
    print(
        f"first job: ready {ready:.1f} s, serving {serving:.1f} s,"
        f" answered {fj['start_to_first_job_s']:.1f} s (by A: {fj['served_by_a']})"
    )
    for row in summary:
        print(f"{row['figure']:40s} {row['value']:>8s}  target {row['target']:8s} {row['verdict']}")
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
