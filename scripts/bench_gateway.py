"""Benchmark the HTTP gateway: throughput, latency, streaming, and what it adds to a job.

Two `swarm daemon` processes on 127.0.0.1: a worker serving a fake embedding
model (0 ms) and the real all-MiniLM-L6-v2, plus a fake streaming model; and an
entry node that serves nothing, routes to the worker, and serves the HTTP
gateway. The load generator is this process (httpx and the swarm client on
trio). Every job is routed entry -> worker in both paths compared, so the
difference is the gateway alone:

1. Throughput through the gateway with 1, 16 and 64 concurrent HTTP clients,
   `POST /v1/embeddings`, for the fake and the real model: requests/s, p50, p99.
2. The gateway's cost: one caller, interleaved pairs of the same embedding job
   over HTTP (`/v1/embeddings`) and over libp2p (`SwarmClient.infer`), both to
   the entry node; the median difference. Target (issue 6): under 2 ms.
3. Streaming: a chat completion streamed as SSE through the gateway, the same
   job streamed over the gateway's WebSocket (one connection for all runs), and
   over libp2p (chunks as they come): time to first chunk and chunks per second.
   The model is the fake streamer (3 chunks over 200 ms), so what differs is
   transport, not generation.

Converted models are cached in ``--data-dir`` (default ~/.cache/swarm-bench)
across runs. Every wait is bounded and both processes are stopped on the way
out.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import trio
from bench_swarm_lib.swarm import NodeProc, start_node, stop_all
from trio_websocket import open_websocket_url

from node.client import SwarmClient

FAKE, REAL, STREAMER = "echo", "all-minilm-l6-v2", "streamer"
STREAM_CHUNKS = 3  # the fake streamer's default; the gateway passes fakes no params
TARGET_ADDED_MS = 2.0
TEXT = "The quick brown fox jumps over the lazy dog."


def free_port() -> int:
    """A port free now on 127.0.0.1 (the gateway binds it a moment later)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def load(url: str, model: str, clients: int, seconds: float) -> dict[str, Any]:
    """``clients`` concurrent HTTP clients posting embeddings for ``seconds``."""
    times: list[float] = []
    errors = 0
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as http:
        body = {"model": model, "input": TEXT}
        await http.post("/v1/embeddings", json=body)  # warm

        async def one() -> None:
            nonlocal errors
            end = time.perf_counter() + seconds
            while time.perf_counter() < end:
                t = time.perf_counter()
                answer = await http.post("/v1/embeddings", json=body)
                if answer.status_code == 200:
                    times.append(time.perf_counter() - t)
                else:
                    errors += 1

        started = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for _ in range(clients):
                nursery.start_soon(one)
        took = time.perf_counter() - started
    return {
        "clients": clients,
        "requests": len(times),
        "errors": errors,
        "req_per_s": len(times) / took,
        "p50_ms": 1000 * statistics.median(times),
        "p99_ms": 1000 * pct(times, 0.99),
    }


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
    out: dict[str, Any] = {"load_before": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="bench-gateway-") as tmp:
        nodes: list[NodeProc] = []
        try:
            models = [f"fake:{FAKE}:0", f"fake:{STREAMER}:200", REAL]
            worker_args = [a for m in models for a in ("--model", m)]
            # The worker keeps its data dir (the converted model) in the cache dir.
            worker = await start_node(data, "gateway-worker", worker_args)
            nodes.append(worker)
            port = free_port()
            entry = await start_node(
                Path(tmp),
                "entry",
                ["--no-models", "--peer", worker.addr, "--http", f"127.0.0.1:{port}"],
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
                progress("... throughput through the gateway")
                out["throughput"] = {
                    model: [await load(url, model, n, args.seconds) for n in (1, 16, 64)]
                    for model in (FAKE, REAL)
                }
                progress("... the gateway's cost per job")
                out["added"] = await added(url, swarm, args.pairs)
                progress("... streaming")
                out["streaming"] = await streamed(url, swarm, args.runs)
        finally:
            await stop_all(nodes)
    out["load_after"] = os.getloadavg()
    return out


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def report(r: dict[str, Any]) -> None:
    print(f"\nMachine: {os.cpu_count()} CPUs; load average before {r['load_before']}")
    print("1. Throughput through the gateway, POST /v1/embeddings (entry -> worker)")
    print(f"   {'model':<18}{'clients':>8}{'req/s':>9}{'p50':>10}{'p99':>10}{'errors':>8}")
    for model, rows in r["throughput"].items():
        for row in rows:
            print(
                f"   {model:<18}{row['clients']:>8}{row['req_per_s']:>9.1f}"
                f"{row['p50_ms']:>8.2f}ms{row['p99_ms']:>8.2f}ms{row['errors']:>8}"
            )
    a = r["added"]
    print(f"2. The gateway's cost, one caller, {a['pairs']} interleaved pairs (fake model, 0 ms)")
    print(f"   HTTP /v1/embeddings to the entry      {a['http_ms']:8.3f} ms median")
    print(f"   SwarmClient.infer to the entry        {a['p2p_ms']:8.3f} ms median")
    print(f"   added by the gateway                  {a['added_ms']:8.3f} ms")
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
    ok = a["added_ms"] < TARGET_ADDED_MS
    print("\nTargets (issue 6)")
    verdict = "met" if ok else "NOT met"
    print(f"   gateway adds to a routed job (median)  {a['added_ms']:.3f} ms  < 2 ms  {verdict}")
    print(f"(load average after {r['load_after']})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=4.0, help="per throughput point")
    parser.add_argument("--pairs", type=int, default=300, help="HTTP/libp2p pairs")
    parser.add_argument("--runs", type=int, default=10, help="streamed runs per path")
    parser.add_argument("--data-dir", default="~/.cache/swarm-bench", help="model cache")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    data = Path(args.data_dir).expanduser()
    data.mkdir(parents=True, exist_ok=True)
    results = trio.run(measure, args, data)
    report(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
