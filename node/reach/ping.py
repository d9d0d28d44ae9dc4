"""Our own liveness check: one libp2p ping (``/ipfs/ping/1.0.0``) under a deadline.

A peer frozen without closing its connection (SIGSTOP, a dead link) stays
"open" to py-libp2p for 45 s and more: yamux's keepalive never closes a dead
connection. The relay manager and the circuit watcher ask this instead. A
fresh stream per ping: a ping is rare (seconds apart) and a stream that hung
once is never reused.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import trio
from libp2p.host.ping import ID as PING_PROTOCOL
from libp2p.peer.id import ID

PING_SIZE = 32


async def ping(host: Any, peer_id: ID, timeout_s: float) -> float | None:
    """The round trip to ``peer_id`` in seconds, or None when none came within
    ``timeout_s`` (or the stream failed). Never raises for a peer's fault."""
    start = trio.current_time()
    stream = None
    ok = False
    try:
        with trio.move_on_after(timeout_s):
            stream = await host.new_stream(peer_id, [PING_PROTOCOL])
            payload = os.urandom(PING_SIZE)
            await stream.write(payload)
            got = b""
            while len(got) < PING_SIZE:
                data = await stream.read(PING_SIZE - len(got))
                if not data:
                    return None
                got += data
            if got != payload:
                return None
            ok = True
            return trio.current_time() - start
        return None
    except Exception:  # libp2p raises many types for a dead peer
        return None
    finally:
        if stream is not None:
            with (
                trio.CancelScope(shield=True),
                trio.move_on_after(1.0),
                contextlib.suppress(Exception),
            ):
                await (stream.close() if ok else stream.reset())
