"""/swarm/caps/1.0.0: a peer asks, the node answers with its capability record.

One record per stream, then the stream closes. Records are unsigned for now;
signing, push on change and heartbeats come with swarm membership.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import trio
from libp2p.custom_types import TProtocol

from protocols import CAPS_PROTOCOL, CapabilityRecord, RemoteProtocolError

from .access import AccessPolicy
from .errors import ConnectionLost, PeerUnavailable
from .framed import FramedStream

RECORD_TTL_S = 30
FETCH_TIMEOUT_S = 10.0


class CapsHandler:
    def __init__(
        self,
        peer_id: str,
        body: Callable[[], Mapping[str, Any]],
        access: AccessPolicy | None = None,
    ) -> None:
        self._peer_id = peer_id
        self._body = body
        self._access = access or AccessPolicy()

    def record(self) -> CapabilityRecord:
        # Wall-clock milliseconds: a restarted node's records still sort after its old ones.
        return CapabilityRecord(
            self._peer_id, time.time_ns() // 1_000_000, RECORD_TTL_S, dict(self._body())
        )

    async def __call__(self, raw_stream: Any) -> None:
        stream = FramedStream(raw_stream)
        if not self._access.permits(stream.peer_id):
            await stream.reset()  # a stranger learns nothing, not even an error text
            return
        try:
            await stream.send(self.record())
        except ConnectionLost:
            pass
        finally:
            await stream.close()


async def fetch_record(host: Any, peer_id: Any) -> CapabilityRecord:
    """Ask ``peer_id`` for its record. Raises PeerUnavailable or RemoteProtocolError."""
    try:
        with trio.fail_after(FETCH_TIMEOUT_S):
            raw = await host.new_stream(peer_id, [TProtocol(CAPS_PROTOCOL)])
            stream = FramedStream(raw)
            try:
                message = await stream.receive()
            finally:
                await stream.close()
    except trio.TooSlowError as exc:
        raise PeerUnavailable(f"{peer_id} sent no record within {FETCH_TIMEOUT_S} s") from exc
    except (ConnectionLost, RemoteProtocolError):
        raise
    except Exception as exc:  # libp2p raises many types for an unreachable peer
        raise PeerUnavailable(f"cannot reach {peer_id}: {exc}") from exc
    if not isinstance(message, CapabilityRecord) or message.peer_id != str(peer_id):
        raise RemoteProtocolError(
            f"{peer_id} answered with {type(message).__name__}, not its record"
        )
    return message
