"""Benchmark the HTTP gateway: throughput, latency, streaming, and what it adds to a job.

Two `swarm daemon` processes on 127.0.0.1: a worker serving a fake embedding
model (0 ms) and the real all-MiniLM-L6-v2, plus a fake streamer; and an entry
node that serves nothing, routes to the worker, and serves the HTTP gateway.
Every job is routed entry -> worker in both paths compared, so the difference
is the gateway alone:

1. Throughput through the gateway: `wrk` (native, a process of its own) with
   1, 16, 64 and 256 keep-alive connections, `POST /v1/embeddings`, for the
   fake and the real model: requests/s, p50/p90/p99, and the CPU cores the
   gateway, the worker and wrk used. A Python load generator measured itself
   here (see bench_gateway_lib/wrk.py); there is no fallback to one, so without
   wrk (Debian package `wrk`) the benchmark stops and says so. A run with any
   non-2xx answer or socket error is reported as such, not as throughput.
2. The gateway's cost: one caller in this process, interleaved pairs of the
   same embedding job over HTTP (`/v1/embeddings`) and over libp2p
   (`SwarmClient.infer`), both to the entry node; the median difference.
   Target (issue 6): under 2 ms.
3. Streaming: a chat completion streamed as SSE through the gateway, the same
   job streamed over the gateway's WebSocket (one connection for all runs), and
   over libp2p (chunks as they come): time to first chunk and chunks per second.
   The model is the fake streamer (3 chunks over 200 ms), so what differs is
   transport, not generation.
4. The other chat APIs: the Responses API, Anthropic's Messages and Ollama's
   chat against the OpenAI route for the same job (the fake model, 0 ms), in
   rotating rounds (bench_gateway_lib/apis.py); the median of each API's
   differences to the OpenAI request of its round. Target (issue 17): each
   under 0.5 ms.

The gateway never shares a process with a load generator, but every process
here shares the machine's cores: the report prints how many each used.
Converted models are cached in ``--data-dir`` (default ~/.cache/swarm-bench)
across runs. Every wait is bounded and both processes are stopped on the way
out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import trio
from bench_gateway_lib.apis import added_by_api
from bench_gateway_lib.wrk import (
    WrkMissing,
    children_cpu_s,
    find_wrk,
    run_wrk,
    threads_for,
    write_script,
    wrk_version,
)
from bench_report import Summary, cpu_model
from bench_swarm_lib.swarm import NodeProc, machine_busy, start_node, stop_all, warnings
from trio_websocket import open_websocket_url

from node.client import SwarmClient

FAKE, REAL, STREAMER = "echo", "all-minilm-l6-v2", "streamer"
ROUTES = {  # section 4's rows
    "openai": "POST /v1/chat/completions",
    "responses": "POST /v1/responses (Responses API)",
    "anthropic": "POST /v1/messages (Anthropic)",
    "ollama": "POST /api/chat (Ollama)",
    "kserve": "POST /v2/models/M/infer (KServe)",
    "grpc": "KServe v2 gRPC ModelInfer",
}
STREAM_CHUNKS = 3  # the fake streamer's default; the gateway passes fakes no params
TARGET_ADDED_MS = 2.0
TEXT = "The quick brown fox jumps over the lazy dog."
CONNECTIONS = (1, 16, 64, 256)
WRK_THREADS = 2  # the machine this was written on has 2 cores; wrk needs few anyway
WRK_TIMEOUT_S = 30  # as the Python client's: a slow answer is a latency, not an error
WARM_S = 1  # wrk at 16 connections before a model's first point, not kept
EXPECT = '"embedding"'  # in every good /v1/embeddings answer
DRAIN_BOUND_S = 60  # after a run, the gateway answers 200 again within this


def free_port() -> int:
    """A port free now on 127.0.0.1 (the gateway binds it a moment later)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True, slots=True)
class Cpu:
    """CPU seconds so far of the roles in a throughput run, and of the whole machine."""

    at: float
    gateway: float  # the entry node's process: the gateway and the routing hop
    worker: float
    wrk: float  # reaped children: wrk, once a run has exited
    machine: tuple[float, float]  # busy, total

    @classmethod
    def take(cls, entry: NodeProc, worker: NodeProc) -> Cpu:
        return cls(
            time.perf_counter(), entry.cpu_s(), worker.cpu_s(), children_cpu_s(), machine_busy()
        )

    def cores_since(self, a: Cpu) -> dict[str, float]:
        wall = self.at - a.at
        busy, total = self.machine[0] - a.machine[0], self.machine[1] - a.machine[1]
        return {
            "gateway": (self.gateway - a.gateway) / wall,
            "worker": (self.worker - a.worker) / wall,
            "wrk": (self.wrk - a.wrk) / wall,
            "machine": busy / total * (os.cpu_count() or 1) if total else 0.0,
        }


async def throughput(
    args: argparse.Namespace, url: str, entry: NodeProc, worker: NodeProc, model: str, tmp: Path
) -> list[dict[str, Any]]:
    """wrk at each connection count, POSTing one embedding body for ``args.seconds``."""
    body = {"model": model, "input": TEXT}
    script = write_script(tmp / f"{model}.lua", body, EXPECT)
    target = f"{url}/v1/embeddings"

    async def wrk(connections: int, seconds: int) -> Any:
        threads = threads_for(connections, args.wrk_threads)
        return await run_wrk(
            args.wrk,
            target,
            script,
            connections,
            threads=threads,
            seconds=seconds,
            timeout_s=WRK_TIMEOUT_S,
        )

    rows = []
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        (await http.post("/v1/embeddings", json=body)).raise_for_status()
        await wrk(16, WARM_S)
        await drain(http, body)
        for connections in args.connections:
            before = Cpu.take(entry, worker)
            run = await wrk(connections, args.seconds)
            row = run.row()
            after = Cpu.take(entry, worker)
            row["cpu_cores"] = after.cores_since(before)
            answered = max(1, run.raw["requests"])  # CPU per answer, good or not
            row["cpu_ms_per_request"] = {
                "gateway": 1000 * (after.gateway - before.gateway) / answered,
                "worker": 1000 * (after.worker - before.worker) / answered,
            }
            row["after"] = await drain(http, body)
            rows.append(row)
            progress(
                f"    {connections:>4} connections: {row['req_per_s']:.1f} req/s, "
                f"p99 {row['p99_ms']:.1f} ms, {row['errors']} errors"
                f"{'' if row['clean'] else ' (' + row['last_bad_body'][:120] + ')'}"
            )
    return rows


async def drain(http: httpx.AsyncClient, body: dict[str, Any]) -> dict[str, Any]:
    """Until one request is answered 200: what the last run left queued is done by then.

    Returns how long that took and what the gateway answered meanwhile (a run that
    overloaded the worker can leave the entry refusing it for a while).
    """
    t, refused = time.perf_counter(), list[str]()
    with trio.fail_after(DRAIN_BOUND_S):
        while (answer := await http.post("/v1/embeddings", json=body)).status_code != 200:
            if len(refused) < 5:
                refused.append(f"{answer.status_code} {answer.text[:160]}")
            await trio.sleep(0.2)
    return {"s": time.perf_counter() - t, "refused": refused}


async def added(url: str, swarm: SwarmClient, pairs: int) -> dict[str, Any]:
    """Interleaved pairs of one embedding job: HTTP to the gateway vs libp2p to the node."""
    via_http: list[float] = []
    via_p2p: list[float] = []
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        body = {"model": FAKE, "input": TEXT}
        for _ in range(20):  # warm both paths
            await http.post("/v1/embeddings", json=body)
            await swarm.infer(FAKE, {"text": TEXT})
        for i in range(2 * pairs):
            t = time.perf_counter()
            if i % 2:
                (await http.post("/v1/embeddings", json=body)).raise_for_status()
                via_http.append(time.perf_counter() - t)
            else:
                await swarm.infer(FAKE, {"text": TEXT})
                via_p2p.append(time.perf_counter() - t)
    http_ms, p2p_ms = 1000 * statistics.median(via_http), 1000 * statistics.median(via_p2p)
    return {"pairs": pairs, "http_ms": http_ms, "p2p_ms": p2p_ms, "added_ms": http_ms - p2p_ms}


async def streamed(url: str, swarm: SwarmClient, runs: int) -> dict[str, Any]:
    """Time to first chunk and chunks/s: SSE and WebSocket through the gateway, libp2p."""
    sse: list[tuple[float, float]] = []
    p2p: list[tuple[float, float]] = []
    ws: list[tuple[float, float]] = []
    body = {"model": STREAMER, "messages": [{"role": "user", "content": TEXT}], "stream": True}
    ws_url = url.replace("http://", "ws://") + "/ws/bench"
    async with (
        httpx.AsyncClient(base_url=url, timeout=30) as http,
        open_websocket_url(ws_url) as socket,
    ):
        for i in range(runs):
            t, first, n = time.perf_counter(), 0.0, 0
            async with http.stream("POST", "/v1/chat/completions", json=body) as answer:
                async for line in answer.aiter_lines():
                    if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                        continue
                    delta = json.loads(line[5:])["choices"][0].get("delta", {})
                    if delta.get("content"):  # not the role-only or the closing chunk
                        n += 1
                        first = first or time.perf_counter() - t
            sse.append((first, (n - 1) / (time.perf_counter() - t - first) if n > 1 else 0.0))
            seen = _Seen(time.perf_counter())
            await swarm.infer(STREAMER, {"text": TEXT}, on_chunk=seen.chunk)
            p2p.append(seen.figures())
            seen = _Seen(time.perf_counter())
            job = {"type": "inference", "id": f"r{i}", "model": STREAMER, "inputs": TEXT}
            await socket.send_message(json.dumps({**job, "stream": True}))
            with trio.fail_after(30):
                while (frame := json.loads(await socket.get_message()))["type"] == "chunk":
                    await seen.chunk(frame)
            if frame["type"] != "result":
                raise RuntimeError(f"the WebSocket answered {frame}")
            ws.append(seen.figures())

    def summary(rows: list[tuple[float, float]]) -> dict[str, float]:
        return {
            "first_chunk_ms": 1000 * statistics.median(r[0] for r in rows),
            "chunks_per_s": statistics.median(r[1] for r in rows),
        }

    return {"runs": runs, "sse": summary(sse), "websocket": summary(ws), "libp2p": summary(p2p)}


class _Seen:
    """Chunks of one libp2p stream as they arrive."""

    def __init__(self, start: float) -> None:
        self.start, self.first, self.n = start, 0.0, 0

    async def chunk(self, _: Any) -> None:
        self.n += 1
        self.first = self.first or time.perf_counter() - self.start

    def figures(self) -> tuple[float, float]:
        rest = time.perf_counter() - self.start - self.first
        return self.first, (self.n - 1) / rest if self.n > 1 else 0.0


async def measure(args: argparse.Namespace, data: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-gateway-") as tmp:
        nodes: list[NodeProc] = []
        try:
            models = [f"fake:{FAKE}:0", f"fake:{STREAMER}:200", REAL]
            worker_args = [a for m in models for a in ("--model", m)]
            if args.max_queue is not None:
                worker_args += ["--max-queue", str(args.max_queue)]
            # The worker keeps its data dir (the converted model) in the cache dir.
            worker = await start_node(data, "gateway-worker", worker_args)
            nodes.append(worker)
            port, grpc_port = free_port(), free_port()
            entry = await start_node(
                Path(tmp),
                "entry",
                [
                    *("--no-models", "--peer", worker.addr),
                    *("--http", f"127.0.0.1:{port}", "--grpc", f"127.0.0.1:{grpc_port}"),
                ],
            )
            nodes.append(entry)
            url = f"http://127.0.0.1:{port}"
            async with SwarmClient.connect(entry.addr) as swarm:
                with trio.fail_after(60):  # the entry links the worker
                    while True:
                        try:
                            await swarm.infer(FAKE, {"text": "ready?"})
                            break
                        except Exception:
                            await trio.sleep(0.2)
                out["throughput"] = {}
                for model in (FAKE, REAL):
                    progress(f"... throughput through the gateway (wrk), {model}")
                    out["throughput"][model] = await throughput(
                        args, url, entry, worker, model, Path(tmp)
                    )
                progress("... the gateway's cost per job")
                out["added"] = await added(url, swarm, args.pairs)
                progress("... streaming")
                out["streaming"] = await streamed(url, swarm, args.runs)
                progress("... the other chat APIs against the OpenAI route")
                out["apis"] = await added_by_api(
                    url, FAKE, args.pairs, grpc=f"127.0.0.1:{grpc_port}"
                )
        finally:
            await stop_all(nodes)
            out["node_warnings"] = warnings(Path(tmp)) + warnings(data)
    return out


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def flaws(row: dict[str, Any]) -> list[str]:
    """Why a wrk run is not a throughput figure (req/s counts good answers only)."""
    out = []
    if row["starved"]:
        out.append(
            f"{row['answers']} answers to {row['clients']} connections in {row['seconds']} s"
            " (requests still waiting when wrk stops are counted nowhere)"
        )
    if row["non_2xx"]:
        out.append(f"{row['non_2xx']} non-2xx answers")
    if row["malformed"]:
        out.append(f"{row['malformed']} 2xx answers without {EXPECT}")
    errors = [f"{k} {n}" for k, n in row["socket_errors"].items() if n]
    if errors:
        out.append(f"socket errors: {', '.join(errors)}")
    return out


def report(r: dict[str, Any]) -> Summary:
    summary = Summary()
    m = r["machine"]
    print(f"\nMachine: {m['cpus']} CPUs ({m['cpu']}), Python {m['python']}")
    print(f"Load average before: {m['load_before']}, after: {m['load_after']}")
    print(f"Processes: each its own; all share the machine's {m['cpus']} cores (none is pinned)")
    print("   entry: a `swarm daemon` serving no model: the gateway and the routing hop")
    queue = r["max_queue"] if r["max_queue"] is not None else "the default, 64"
    print(f"   worker: a `swarm daemon` serving the models, --max-queue {queue}")
    print(f"   load: {m['wrk']}, -t{r['wrk_threads']} at most (-t1 for one connection)")
    print("   this process: the paired HTTP/libp2p calls and the streams; idle while wrk runs")
    print()
    print(
        f"1. Throughput through the gateway, POST /v1/embeddings (entry -> worker), "
        f"wrk, {r['seconds']} s per point"
    )
    print(
        f"   {'model':<17}{'conns':>6}{'req/s':>8}{'p50':>10}{'p90':>10}{'p99':>10}"
        f"  {'CPU ms/req: gw':>14}{'worker':>7}  {'cores: gw':>9}{'worker':>7}{'wrk':>5}"
        f"{'machine':>8}"
    )
    runs = bad = 0
    for model, rows in r["throughput"].items():
        for row in rows:
            c, per = row["cpu_cores"], row["cpu_ms_per_request"]
            runs += 1
            print(
                f"   {model:<17}{row['clients']:>6}{row['req_per_s']:>8.1f}"
                f"{row['p50_ms']:>8.1f}ms{row['p90_ms']:>8.1f}ms{row['p99_ms']:>8.1f}ms"
                f"  {per['gateway']:>14.2f}{per['worker']:>7.2f}"
                f"  {c['gateway']:>9.2f}{c['worker']:>7.2f}{c['wrk']:>5.2f}{c['machine']:>8.2f}"
            )
            if not row["clean"]:
                bad += 1
                print(f"      NOT a throughput figure: {'; '.join(flaws(row))}")
                if row["non_2xx"]:
                    print(f"      last: {row['last_bad_status']} {row['last_bad_body'][:150]}")
            if row["after"]["refused"]:
                print(
                    f"      after it: {row['after']['s']:.1f} s to a 200; meanwhile "
                    f"{row['after']['refused'][0][:140]}"
                )
    print("   (conns: wrk's keep-alive connections, each one request at a time; CPU ms/req:")
    print("   CPU of the entry (gw: gateway + routing) and of the worker per answer; cores:")
    print("   CPU seconds per second of the entry, the worker, wrk and the whole machine)")
    summary.add(
        "wrk runs clean (all 2xx, no socket errors)",
        f"{runs - bad} of {runs}",
        "all",
        not bad,
    )
    a = r["added"]
    print(f"2. The gateway's cost, one caller, {a['pairs']} interleaved pairs (fake model, 0 ms)")
    print(f"   HTTP /v1/embeddings to the entry      {a['http_ms']:8.3f} ms median")
    print(f"   SwarmClient.infer to the entry        {a['p2p_ms']:8.3f} ms median")
    print(f"   added by the gateway                  {a['added_ms']:8.3f} ms")
    summary.add(
        "gateway adds to a routed job (median)",
        f"{a['added_ms']:.3f} ms",
        f"< {TARGET_ADDED_MS:g} ms",
        a["added_ms"] < TARGET_ADDED_MS,
    )
    s = r["streaming"]
    print(f"3. Streaming ({STREAM_CHUNKS} chunks over 200 ms, fake streamer), {s['runs']} runs")
    for path, label in (
        ("sse", "SSE through the gateway"),
        ("websocket", "WebSocket, the gateway"),
        ("libp2p", "libp2p, chunks"),
    ):
        f = s[path]
        print(
            f"   {label:<26} first chunk {f['first_chunk_ms']:7.2f} ms, "
            f"{f['chunks_per_s']:6.1f} chunks/s"
        )
    p = r["apis"]
    print(
        f"4. The other chat APIs vs POST /v1/chat/completions, the same job (fake model, "
        f"0 ms), {p['rounds']} rotating rounds"
    )
    print(f"   {'route':<34}{'median':>10}{'added (paired median)':>24}")
    for name, route in ROUTES.items():
        if name not in p:
            continue
        row = p[name]
        extra = f"{row['added_ms']:+10.3f} ms" if "added_ms" in row else ""
        print(f"   {route:<34}{row['median_ms']:7.3f} ms{extra:>24}")
        if "added_ms" in row:
            summary.add(
                f"{route} adds over /v1/chat/completions (median)",
                f"{row['added_ms']:.3f} ms",
                f"< {p['target_ms']:g} ms",
                row["added_ms"] < p["target_ms"],
            )
    if r.get("node_warnings"):
        print("\nWarnings the nodes logged:")
        for line in r["node_warnings"]:
            print(f"   {line}")
    print("\nSummary (targets from issue 6; clean runs: issue 11; other APIs: issue 17)")
    width = max(len(row["figure"]) for row in summary)
    for row in summary:
        print(
            f"   {row['figure']:<{width}}  {row['value']:>10}  {row['target']:<10} {row['verdict']}"
        )
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=int, default=5, help="wrk run per throughput point")
    parser.add_argument(
        "--connections",
        type=lambda t: tuple(int(x) for x in t.split(",")),
        default=CONNECTIONS,
        help="wrk connection counts, comma-separated (default 1,16,64,256)",
    )
    parser.add_argument("--wrk-threads", type=int, default=WRK_THREADS, help="wrk -t at most")
    parser.add_argument(
        "--max-queue",
        type=int,
        help="the worker's --max-queue (default: the daemon's, 64 waiting per model; more "
        "connections than that plus the running jobs get 429s, which are reported)",
    )
    parser.add_argument(
        "--pairs", type=int, default=300, help="HTTP/libp2p pairs; rounds of the API comparison"
    )
    parser.add_argument("--runs", type=int, default=10, help="streamed runs per path")
    parser.add_argument("--quick", action="store_true", help="2 s points, 100 pairs, 5 runs")
    parser.add_argument("--data-dir", default="~/.cache/swarm-bench", help="model cache")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    if args.quick:
        args.seconds, args.pairs, args.runs = 2, 100, 5
    if args.seconds < 1 or args.wrk_threads < 1 or min(args.connections) < 1:
        parser.error("--seconds, --wrk-threads and every connection count must be at least 1")
    try:
        args.wrk = find_wrk()
    except WrkMissing as exc:
        print(f"bench_gateway: {exc}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks
    data = Path(args.data_dir).expanduser()
    data.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    load_before = os.getloadavg()
    machine = {
        "cpus": os.cpu_count(),
        "cpu": cpu_model(),
        "python": platform.python_version(),
        "wrk": wrk_version(args.wrk),
        "load_before": " ".join(f"{x:.2f}" for x in load_before),
    }
    try:
        results = trio.run(measure, args, data)
    except KeyboardInterrupt:
        print("interrupted: both node processes were stopped", file=sys.stderr)
        return 130
    load_after = os.getloadavg()
    machine["load_after"] = " ".join(f"{x:.2f}" for x in load_after)
    results = {
        "load_before": load_before,  # kept as the earlier figures had them
        "machine": machine,
        "load_generator": "wrk",
        "wrk_threads": args.wrk_threads,
        "max_queue": args.max_queue,
        "seconds": args.seconds,
        **results,
        "load_after": load_after,
    }
    results["summary"] = report(results)
    results["total_s"] = time.monotonic() - began
    print(f"\n(total {results['total_s']:.0f} s)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
