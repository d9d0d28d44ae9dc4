"""/swarm/caps/1.0.0: two nodes swap signed capability records on one stream.

The opener sends one signed record and the responder answers with one; the
opener may then send another on the same stream, and so on. A linked pair keeps
one such stream open and sends every heartbeat on it: a new stream per beat
costs a yamux open and close and a multistream negotiation, several times the
bytes of the records themselves. The responder closes a stream that stays idle
for ``IDLE_TIMEOUT_S``; the opener then opens a new one.

What is sent depends on what the other side already holds:

- a *full* record (hardware, models, load, addresses, and its content
  ``version``) when the other side holds an older version of it, or none;
- else a *heartbeat*: a small signed record ``{"heartbeat": {...}}`` with our
  load and the version of our full record, so the other side knows whether to
  ask again (and, while the version stands, that the record it holds is current).

One exchange is therefore a push, a pull and a liveness proof for both sides.
A *client* (``swarm status``, the Python client) opens with a heartbeat marked
``client``; it gets our full record plus a ``view`` of this node (peer table,
discovery problems, counters) and is not added to anyone's peer table.
Every record is verified (signature, peer id, time) and must come from the
peer at the other end of the authenticated connection.

A CLI on the daemon's own machine asks on the local socket instead
(``answer_client``): no record of its own to verify there, since the kernel
vouches for the connecting user, but the same allow-list check and the same
record in answer.
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
from node.errors import ConnectionLost, PeerUnavailable
from node.net.access import AccessPolicy
from node.net.framed import FramedStream
from node.net.frames import Framed
from protocols import CAPS_PROTOCOL, CapabilityRecord, Error, ErrorCode, RemoteProtocolError

log = logging.getLogger(__name__)

RECORD_TTL_S = 60
EXCHANGE_TIMEOUT_S = 10.0
IDLE_TIMEOUT_S = 60.0  # longer than any heartbeat interval a swarm would use
# Parts of the full record that change without changing its version: load travels
# in heartbeats, and the peer sample only helps newcomers find the swarm.
VOLATILE = frozenset({"load", "peers"})
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
        self._full: CapabilityRecord | None = None
        self._full_signed_ms = 0
        self._content: Mapping[str, Any] | None = None

    def _next_seq(self) -> int:
        self._seq = max(self._seq + 1, time.time_ns() // 1_000_000)
        return self._seq

    def _sign(self, body: Mapping[str, Any]) -> CapabilityRecord:
        return sign_record(self._key_pair, body, seq=self._next_seq(), ttl_s=RECORD_TTL_S)

    def _refresh(self) -> Mapping[str, Any]:
        """The current full body; bumps ``version`` when its content changed.

        Age alone does not bump it: peers holding this version have its expiry
        renewed by every heartbeat that names it, so they need not pull it again.
        """
        body = self._full_body()
        content = {k: v for k, v in body.items() if k not in VOLATILE}
        if content != self._content:
            self._content = content
            self.version = self._next_seq()
            self._full = None
        return body

    def full(self) -> CapabilityRecord:
        """The full record: its content at ``version``, with a seq no peer has seen older
        and most of its TTL left."""
        body = self._refresh()
        now_ms = time.time_ns() // 1_000_000
        if (
            self._full is None
            or self._full.seq < self._seq
            or now_ms - self._full_signed_ms > RECORD_TTL_S * 250
        ):
            self._full = self._sign({**body, "version": self.version})
            self._full_signed_ms = now_ms
        return self._full

    def heartbeat(
        self,
        known_version: int,
        load: Mapping[str, Any],
        *,
        client: bool = False,
        peers: int | None = None,
        want: bool = False,
        unlink: bool = False,
        sample: list[Any] | None = None,
    ) -> CapabilityRecord:
        """A small signed record: our load, our full record's version, which version
        of the other side's full record we hold (0: none) and, for members, how many
        peers we link (a peer that links fewer pulls our record's peer sample).
        ``want``: we need this link (it serves a model we forward to, or relays for
        us); ``unlink``: we let the link go, or will not take it (no room), with
        ``sample``: some peers we link, where a newcomer may find room."""
        self._refresh()
        beat: dict[str, Any] = {"version": self.version, "known": known_version, "load": dict(load)}
        if peers is not None:
            beat["peers"] = peers
        if want:
            beat["want"] = True
        if unlink:
            beat["unlink"] = True
            if sample:
                beat["sample"] = sample
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
        self.streams = 0  # inbound caps streams accepted
        self.exchanges = 0  # records answered on them

    async def __call__(self, raw_stream: Any) -> None:
        stream = FramedStream(raw_stream)
        if not self._access.permits(stream.peer_id):
            await stream.reset()  # a stranger learns nothing, not even an error text
            return
        self.streams += 1
        try:
            wait_s = EXCHANGE_TIMEOUT_S  # for the first record; then the idle bound
            while True:
                with trio.fail_after(wait_s):
                    received = await _next(stream)
                if received is None:
                    return  # the opener is done with this stream
                with trio.fail_after(EXCHANGE_TIMEOUT_S):
                    await self._on_record(received)
                    await stream.send(self._answer(received))
                self.exchanges += 1
                if received.is_client:
                    return  # clients ask once
                wait_s = IDLE_TIMEOUT_S
        except (RecordRejected, RemoteProtocolError) as exc:
            self.refused_records += 1
            log.info("refused a record from %s: %s", stream.peer_id, exc)
        except (ConnectionLost, trio.TooSlowError):
            pass
        finally:
            await stream.close()


class CapsStreams:
    """The opener side: one caps stream per peer, reused for every exchange with it."""

    def __init__(self, host: Any, *, max_idle: int = 1024) -> None:
        self._host = host
        self._max_idle = max_idle
        self._idle: dict[str, FramedStream] = {}

    async def exchange(self, peer_id: Any, ours: CapabilityRecord) -> Received:
        """Send ``ours`` to ``peer_id`` and return its verified answer.

        Raises PeerUnavailable (could not reach it), ConnectionLost (it broke off),
        RemoteProtocolError (garbage) or RecordRejected (a record that fails checks).
        """
        key = str(peer_id)
        stream = self._idle.pop(key, None)
        if stream is not None:
            try:
                return await self._on(key, stream, ours)
            except (ConnectionLost, PeerUnavailable):
                # The peer closed an idle stream, or restarted. Records are safe to send
                # twice (a repeat is ignored as late), so try once on a fresh stream.
                log.debug("caps stream to %s was gone; opening a new one", key)
        try:
            with trio.fail_after(EXCHANGE_TIMEOUT_S):
                raw = await self._host.new_stream(peer_id, [CAPS])
        except trio.TooSlowError as exc:
            raise PeerUnavailable(f"no stream to {peer_id} within {EXCHANGE_TIMEOUT_S} s") from exc
        except Exception as exc:  # libp2p raises many types for an unreachable peer
            raise PeerUnavailable(f"cannot reach {peer_id}: {exc}") from exc
        return await self._on(key, FramedStream(raw), ours)

    async def _on(self, key: str, stream: FramedStream, ours: CapabilityRecord) -> Received:
        clean = False
        try:
            with trio.fail_after(EXCHANGE_TIMEOUT_S):
                await stream.send(ours)
                received = await _next(stream)
            if received is None:
                raise ConnectionLost(f"{key} closed the caps stream without answering")
            if received.record.peer_id != key:
                raise RemoteProtocolError(f"{key} answered with the record of another peer")
            clean = True
            return received
        except trio.TooSlowError as exc:
            raise PeerUnavailable(f"{key} did not answer within {EXCHANGE_TIMEOUT_S} s") from exc
        finally:
            if clean and not stream.closed and len(self._idle) < self._max_idle:
                old = self._idle.pop(key, None)
                self._idle[key] = stream
                if old is not None:  # two exchanges ran at once: keep one stream
                    await old.close()
            else:
                await stream.close()

    async def forget(self, peer_id: str) -> None:
        """Close the stream to a peer that left the table."""
        stream = self._idle.pop(peer_id, None)
        if stream is not None:
            await stream.close()

    async def close(self) -> None:
        idle, self._idle = list(self._idle.values()), {}
        for stream in idle:
            await stream.close()


async def answer_client(
    stream: Framed, peer_id: str, access: AccessPolicy, view: Callable[[], CapabilityRecord]
) -> None:
    """Send ``view()``, this node's record for clients, to ``peer_id`` on ``stream``,
    an already authenticated one (the local socket). Refused by the allow-list: a
    typed UNAUTHORIZED, as /swarm/infer answers."""
    if not access.permits(peer_id):
        await stream.send(Error("", ErrorCode.UNAUTHORIZED, "not allowed"))
        return
    with trio.fail_after(EXCHANGE_TIMEOUT_S):
        await stream.send(view())


async def exchange_records(host: Any, peer_id: Any, ours: CapabilityRecord) -> Received:
    """One exchange on a new stream that is closed after it (for one-off callers)."""
    return await CapsStreams(host, max_idle=0).exchange(peer_id, ours)


async def _next(stream: FramedStream) -> Received | None:
    """The next verified record on ``stream``; None when the other side ended it."""
    message = await stream.receive()
    if message is None:
        return None
    if not isinstance(message, CapabilityRecord):
        raise RemoteProtocolError(f"expected a capability record, got {type(message).__name__}")
    record = verify_record(message)
    if record.peer_id != stream.peer_id:
        raise RemoteProtocolError(f"{stream.peer_id} sent the record of {record.peer_id}")
    return Received(record)
