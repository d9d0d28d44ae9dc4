"""One libp2p host with mDNS discovery and a caps handler, for test_mdns_netns.py.

Run inside a network namespace: ``python tests/_mdns_host.py --listen
/ip4/10.77.0.2/tcp/0 --name h0``. Prints JSON lines on stdout:

- ``{"event": "ready", "peer_id": ..., "addrs": [...]}`` once announced;
- ``{"event": "discovered", "peer_id": ..., "addrs": [...]}`` per mDNS find;
- ``{"event": "problem", "problem": ...}`` for a DiscoveryProblem;
- ``{"event": "caps", "peer_id": ..., "body": {...}}`` once it fetched the
  signed capability record of a found peer over libp2p and verified it (or
  ``caps_error``).

Runs until SIGTERM or SIGINT; then it stops cleanly and prints
``{"event": "stopped", "threads": [...]}``: the threads still alive besides the
main one and trio's idle worker cache (zeroconf's must all be gone).
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from typing import Any

import multiaddr
import trio
from libp2p import generate_new_ed25519_identity
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo

from bootstrap.events import Discovered, DiscoveryProblem
from bootstrap.mdns import MdnsDiscovery
from node.membership.caps import CapsHandler, Received, RecordSigner, exchange_records
from node.net.host import running_host
from protocols import CAPS_PROTOCOL

FETCH_TIMEOUT_S = 10.0


def emit(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


async def fetch_caps(host: Any, signer: RecordSigner, event: Discovered) -> None:
    peer = ID.from_base58(event.peer_id)
    try:
        with trio.fail_after(FETCH_TIMEOUT_S):
            await host.connect(PeerInfo(peer, [multiaddr.Multiaddr(a) for a in event.addrs]))
            hello = signer.heartbeat(0, {}, client=True)
            record = (await exchange_records(host, peer, hello)).record  # signature verified
    except Exception as exc:  # report anything: the test decides
        emit(event="caps_error", peer_id=event.peer_id, error=repr(exc))
        return
    emit(event="caps", peer_id=record.peer_id, body=dict(record.body))


async def main(args: argparse.Namespace) -> None:
    key_pair = generate_new_ed25519_identity()
    async with running_host(key_pair, [args.listen]) as host:
        peer_id = host.get_id().to_base58()
        signer = RecordSigner(key_pair, lambda: {"name": args.name})

        async def ignore(_: Received) -> None:
            pass

        caps = CapsHandler(ignore, lambda _: signer.full())
        host.set_stream_handler(TProtocol(CAPS_PROTOCOL), caps)
        send, receive = trio.open_memory_channel[Discovered | DiscoveryProblem](16)
        mdns = MdnsDiscovery.for_host(
            host, send, service_type=args.service_type, no_answer_after_s=args.no_answer_s
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(mdns.run)
            emit(event="ready", peer_id=peer_id, addrs=list(mdns.announcement.addrs))
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                nursery.start_soon(_cancel_on_signal, signals, nursery.cancel_scope)
                async for event in receive:
                    if isinstance(event, DiscoveryProblem):
                        emit(event="problem", problem=event.problem)
                        continue
                    emit(event="discovered", peer_id=event.peer_id, addrs=list(event.addrs))
                    nursery.start_soon(fetch_caps, host, signer, event)


async def _cancel_on_signal(signals: Any, scope: trio.CancelScope) -> None:
    async for _ in signals:
        scope.cancel()
        return


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--listen", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--service-type", default="_p2p._udp.local.")
    parser.add_argument("--no-answer-s", type=float, default=10.0)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    trio.run(main, parser.parse_args())
    left = [
        t.name
        for t in threading.enumerate()
        if t is not threading.main_thread() and not t.name.startswith("Trio thread")
    ]
    emit(event="stopped", threads=left)
