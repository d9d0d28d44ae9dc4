"""/swarm/caps/1.0.0: two nodes swap signed capability records on one stream.

The opener sends one signed record, the responder answers with one, and the
stream closes. What is sent depends on what the other side already holds:

- a *full* record (hardware, models, load, addresses, and its content
  ``version``) when the other side holds an older version of it, or none;
- else a *heartbeat*: a small signed record ``{"heartbeat": {...}}`` with our
  load and the version of our full record, so the other side knows whether to
  ask again.

One exchange is therefore a push, a pull and a liveness proof for both sides.
A *client* (``swarm status``, the Python client) opens with a heartbeat marked
``client``; it gets our full record plus a ``view`` of this node (peer table,
discovery problems, counters) and is not added to anyone's peer table.
Every record is verified (signature, peer id, time) and must come from the
peer at the other end of the authenticated connection.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import trio
from libp2p.custom_types import TProtocol

from capabilities.signing import RecordRejected, VerifiedRecord, sign_record, verify_record
from protocols import CAPS_PROTOCOL, CapabilityRecord, RemoteProtocolError

from .access import AccessPolicy
from .errors import ConnectionLost, PeerUnavailable
from .framed import FramedStream

log = logging.getLogger(__name__)

RECORD_TTL_S = 60
EXCHANGE_TIMEOUT_S = 10.0
CAPS = TProtocol(CAPS_PROTOCOL)


class RecordSigner:
    """Signs this node's records; seq grows with the wall clock, even across restarts.

    Every signature takes the next seq, and peers refuse a seq below one they saw,
    so a full record is re-signed whenever anything was signed after it. What a
    heartbeat announces is the full record's *version*: it changes only with the
    content (or when the record nears expiry), so peers pull it only then.
    """

    def __init__(self, key_pair: Any, full_body: Callable[[], Mapping[str, Any]]) -> None:
        self._key_pair = key_pair
        self._full_body = full_body
        self._seq = 0
        self.version = 0  # of the full record's content
        self._versioned_ms = 0
        self._full: CapabilityRecord | None = None
        self._content: Mapping[str, Any] | None = None

    def _next_seq(self) -> int:
        self._seq = max(self._seq + 1, time.time_ns() // 1_000_000)
        return self._seq

    def _sign(self, body: Mapping[str, Any]) -> CapabilityRecord:
        return sign_record(self._key_pair, body, seq=self._next_seq(), ttl_s=RECORD_TTL_S)

    def _refresh(self) -> Mapping[str, Any]:
        """The current full body; bumps ``version`` when its content changed or aged."""
        body = self._full_body()
        content = {k: v for k, v in body.items() if k != "load"}
        now_ms = time.time_ns() // 1_000_000
        if content != self._content or now_ms - self._versioned_ms > RECORD_TTL_S * 500:
            self._content, self._versioned_ms = content, now_ms
            self.version = self._next_seq()
            self._full = None
        return body

    def full(self) -> CapabilityRecord:
        """The full record: its content at ``version``, with a seq no peer has seen older."""
        body = self._refresh()
        if self._full is None or self._full.seq < self._seq:
            self._full = self._sign({**body, "version": self.version})
        return self._full

    def heartbeat(
        self, known_version: int, load: Mapping[str, Any], *, client: bool = False
    ) -> CapabilityRecord:
        """A small signed record: our load, our full record's version, and which version
        of the other side's full record we hold (0: none)."""
        self._refresh()
        beat = {"version": self.version, "known": known_version, "load": dict(load)}
        return self._sign({"heartbeat": beat, **({"client": True} if client else {})})

    def view(self, extra: Mapping[str, Any]) -> CapabilityRecord:
        """The full record with this node's own view added, for clients."""
        return self._sign({**self._refresh(), "version": self.version, "view": dict(extra)})


@dataclass(frozen=True, slots=True)
class Received:
    """A verified record from the peer at the other end of a caps stream."""

    record: VerifiedRecord

    @property
    def heartbeat(self) -> Mapping[str, Any] | None:
        beat = self.record.body.get("heartbeat")
        return beat if isinstance(beat, Mapping) else None

    @property
    def is_client(self) -> bool:
        return self.record.body.get("client") is True


class CapsHandler:
    """The responder side. ``on_record`` feeds membership; ``answer`` picks our reply."""

    def __init__(
        self,
        on_record: Callable[[Received], Awaitable[None]],
        answer: Callable[[Received], CapabilityRecord],
        access: AccessPolicy | None = None,
    ) -> None:
        self._on_record = on_record
        self._answer = answer
        self._access = access or AccessPolicy()
        self.refused_records = 0

    async def __call__(self, raw_stream: Any) -> None:
        stream = FramedStream(raw_stream)
        if not self._access.permits(stream.peer_id):
            await stream.reset()  # a stranger learns nothing, not even an error text
            return
        try:
            with trio.fail_after(EXCHANGE_TIMEOUT_S):
                received = await _receive(stream)
                await self._on_record(received)
                await stream.send(self._answer(received))
        except (RecordRejected, RemoteProtocolError) as exc:
            self.refused_records += 1
            log.info("refused a record from %s: %s", stream.peer_id, exc)
        except (ConnectionLost, trio.TooSlowError):
            pass
        finally:
            await stream.close()


async def exchange_records(host: Any, peer_id: Any, ours: CapabilityRecord) -> Received:
    """Send ``ours`` to ``peer_id`` and return its verified answer.

    Raises PeerUnavailable (could not reach it), ConnectionLost (it broke off),
    RemoteProtocolError (garbage) or RecordRejected (a record that fails checks).
    """
    try:
        with trio.fail_after(EXCHANGE_TIMEOUT_S):
            try:
                raw = await host.new_stream(peer_id, [CAPS])
            except Exception as exc:  # libp2p raises many types for an unreachable peer
                raise PeerUnavailable(f"cannot reach {peer_id}: {exc}") from exc
            stream = FramedStream(raw)
            try:
                await stream.send(ours)
                received = await _receive(stream)
            finally:
                await stream.close()
    except trio.TooSlowError as exc:
        raise PeerUnavailable(f"{peer_id} did not answer within {EXCHANGE_TIMEOUT_S} s") from exc
    if received.record.peer_id != str(peer_id):
        raise RemoteProtocolError(f"{peer_id} answered with the record of another peer")
    return received


async def _receive(stream: FramedStream) -> Received:
    message = await stream.receive()
    if not isinstance(message, CapabilityRecord):
        raise RemoteProtocolError(f"expected a capability record, got {type(message).__name__}")
    record = verify_record(message)
    if record.peer_id != stream.peer_id:
        raise RemoteProtocolError(f"{stream.peer_id} sent the record of {record.peer_id}")
    return Received(record)
