"""Benchmark the RPC hop: our protocol over libp2p vs bare libp2p vs plain TCP.

A server process hosts three endpoints on loopback, all answering the same small
request with the fake runner (no model cost):

- /swarm/infer/1.0.0 over libp2p (Noise + yamux): the node's real handler;
- /bench/echo/1.0.0 over the same libp2p host: bytes echoed, no protocol of ours;
- plain trio TCP carrying our framing to the same handler.

This process measures round trips (median, p99) on one reused stream and with a
new stream per call, then requests per second with 1, 8 and 64 concurrent
callers. It prints the figures and the ratios measured in this run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio
from libp2p.custom_types import TProtocol

from bootstrap.addrs import peer_info
from node.jobs.inbound import InferHandler
from node.jobs.outbound import Caller, exchange
from node.jobs.service import InferenceService
from node.net.framed import FramedStream
from node.net.host import running_host
from protocols import Request, encode
from runners.fake import FakeRunner

ECHO = TProtocol("/bench/echo/1.0.0")
REQUEST = Request("bench-0001", "echo", {"text": "hello"})


class TcpStream:
    """Gives a trio TCP stream the read/write/close surface FramedStream uses."""

    class _Conn:
        peer_id = "tcp-peer"

    muxed_conn = _Conn()

    def __init__(self, stream: trio.SocketStream) -> None:
        self._s = stream

    async def read(self, n: int) -> bytes:
        return bytes(await self._s.receive_some(n))

    async def write(self, data: bytes) -> None:
        await self._s.send_all(data)

    async def close(self) -> None:
        await self._s.aclose()

    reset = close


# --------------------------------------------------------------------------- server


async def serve() -> None:
    runner = FakeRunner("echo", concurrency=64)
    async with running_host(None, ["/ip4/127.0.0.1/tcp/0"]) as host:
        service = InferenceService({"echo": runner}, node_id="bench", max_queue=256)
        handler = InferHandler(service)
        host.set_stream_handler(TProtocol("/swarm/infer/1.0.0"), handler)

        async def echo(stream: Any) -> None:
            try:
                while data := await stream.read(65536):
                    await stream.write(data)
            except Exception:  # the client closing or resetting ends the loop
                pass

        host.set_stream_handler(ECHO, echo)

        async def tcp(stream: trio.SocketStream) -> None:
            await handler(TcpStream(stream))

        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(trio.serve_tcp, tcp, 0)
            port = listeners[0].socket.getsockname()[1]
            peer = host.get_id().to_base58()
            addr = f"{host.get_transport_addrs()[0]}/p2p/{peer}"
            print(json.dumps({"libp2p": addr, "tcp": port}), flush=True)
            await trio.to_thread.run_sync(sys.stdin.read)  # until the parent closes stdin
            nursery.cancel_scope.cancel()


# --------------------------------------------------------------------------- client


def progress(step: str) -> None:
    """Where the run is, on stderr (stdout is the report)."""
    print(f"bench_rpc: {step} ...", file=sys.stderr, flush=True)


async def timed(n: int, call: Callable[[], Awaitable[None]]) -> list[float]:
    for _ in range(min(50, n)):  # warm up
        await call()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        await call()
        times.append(time.perf_counter() - t)
    return times


def summary(times: list[float]) -> tuple[float, float]:
    ordered = sorted(times)
    return statistics.median(ordered) * 1e6, ordered[int(0.99 * (len(ordered) - 1))] * 1e6


async def measure(addresses: dict[str, Any], n: int, seconds: float) -> dict[str, Any]:
    info = peer_info(addresses["libp2p"])
    out: dict[str, Any] = {}
    async with running_host(None, ()) as host:
        await host.connect(info)
        caller = Caller(host, max_idle=128)

        async def ours_reused() -> None:
            await caller.call(info.peer_id, REQUEST)

        async def ours_new() -> None:
            await caller.call(info.peer_id, REQUEST, reuse=False)

        echo_stream = await host.new_stream(info.peer_id, [ECHO])
        payload = b"".join(encode(REQUEST))

        async def bare_echo() -> None:
            await echo_stream.write(payload)
            got = 0
            while got < len(payload):
                got += len(await echo_stream.read(65536))

        async def bare_echo_new() -> None:
            stream = await host.new_stream(info.peer_id, [ECHO])
            await stream.write(payload)
            await stream.read(65536)
            await stream.close()

        tcp = FramedStream(TcpStream(await trio.open_tcp_stream("127.0.0.1", addresses["tcp"])))

        async def ours_tcp() -> None:
            await exchange(tcp, REQUEST, None)

        progress("round trips")
        out["rtt"] = {
            "bare libp2p stream, reused": summary(await timed(n, bare_echo)),
            "bare libp2p, new stream per call": summary(await timed(n // 2, bare_echo_new)),
            "ours over libp2p, reused stream": summary(await timed(n, ours_reused)),
            "ours over libp2p, new stream per call": summary(await timed(n // 2, ours_new)),
            "ours over plain TCP": summary(await timed(n, ours_tcp)),
        }
        await echo_stream.close()
        await tcp.close()

        out["rps"] = {}
        for callers in (1, 8, 64):
            progress(f"requests per second, {callers} callers ({seconds:g} s)")
            done = 0

            async def worker(deadline: float) -> None:
                nonlocal done
                while trio.current_time() < deadline:
                    await caller.call(info.peer_id, REQUEST)
                    done += 1

            async with trio.open_nursery() as nursery:  # warm: open the pooled streams
                for _ in range(callers):
                    nursery.start_soon(worker, trio.current_time() + 0.3)
            done = 0
            start = trio.current_time()
            async with trio.open_nursery() as nursery:
                for _ in range(callers):
                    nursery.start_soon(worker, start + seconds)
            out["rps"][callers] = done / (trio.current_time() - start)
        await caller.close()
    return out


def report(r: dict[str, Any]) -> None:
    rtt = r["rtt"]
    print("Round trip of one small request on loopback (server in another process)")
    print(f"  {'path':<40} {'median':>10} {'p99':>10}")
    for name, (med, p99) in rtt.items():
        print(f"  {name:<40} {med / 1000:>8.3f}ms {p99 / 1000:>8.3f}ms")
    ours = rtt["ours over libp2p, reused stream"][0]
    bare = rtt["bare libp2p stream, reused"][0]
    tcp = rtt["ours over plain TCP"][0]
    new = rtt["ours over libp2p, new stream per call"][0]
    print()
    print(f"  ours - bare libp2p (reused stream):   {(ours - bare) / 1000:5.3f} ms added per call")
    print(f"  ours / bare libp2p (reused stream):   {ours / bare:5.2f}x   (same run)")
    print(
        f"  ours / LIBP2P.md's bare 1.6 ms:       {ours / 1600:5.2f}x   (target <= 1.25x: "
        f"{'met' if ours <= 1.25 * 1600 else 'NOT met'})"
    )
    print(f"  libp2p / plain TCP (same framing):    {ours / tcp:5.2f}x")
    print(f"  new stream per call / reused stream:  {new / ours:5.2f}x")
    print()
    print("Requests per second, fake runner, one libp2p connection, pooled streams")
    for callers, rps in r["rps"].items():
        print(f"  {callers:>3} concurrent callers: {rps:8.0f} req/s")
    print(f"  (target: 64 callers >= 1000 req/s: {'met' if r['rps'][64] >= 1000 else 'NOT met'})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--calls", type=int, default=2000, help="round trips per path")
    parser.add_argument("--seconds", type=float, default=3.0, help="per concurrency level")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    if args.serve:
        trio.run(serve)
        return 0
    server = subprocess.Popen(
        [sys.executable, __file__, "--serve"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        addresses = json.loads(server.stdout.readline())
        results = trio.run(measure, addresses, args.calls, args.seconds)
    finally:
        if server.stdin:
            server.stdin.close()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
    report(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
