"""/swarm/dialback/1.0.0: a peer dials us back over a fresh connection.

Why our own: AutoNAT v1 in py-libp2p 0.8.1 "dials back" through the swarm,
which reuses the connection the request came on, so any address with the right
IP passes, even a wrong port (../shared/design/LIBP2P.md, "Behind NAT").

One request, one answer, then the stream closes::

    X (asks)                                P (dials back)
      DialRequest(addrs) ---------------->
                                             for each addr whose IP is the one X's
                                             connection comes from: a new TCP
                                             socket, then a Noise handshake that
                                             must prove X's peer id
                         <----------------  DialAnswer(observed IP, ok/failed/refused
                                             per address)

Soundness: the dial opens its own socket (``trio.open_tcp_stream``) and runs
the security upgrade on it alone, outside the host's swarm, so nothing can reuse
a connection X already has to P; it needs no listener of ours either. A NAT that
lets in only replies drops that SYN, since no connection of X's matches it,
while a TCP answer alone proves nothing (another machine may own that port):
only a Noise handshake that authenticates X's key counts. The upgrade stops
after security (no muxer): a handshake is all the proof needed, and X's swarm
drops the half-made connection by itself. Our side of the handshake uses a
throwaway identity made per server, so the dial never registers as a second
connection of ours at X (py-libp2p keeps one per peer). Measured on loopback:
a fresh dial of this kind takes ~4 ms; a throwaway libp2p host ~210 ms.

Bounds (a peer must not turn us into a port scanner, nor a flood of ids into a
dialling engine):

- we dial only addresses whose IP is the one the request's connection comes
  from (the AutoNAT rule), ports as claimed, at most ``MAX_DIALS`` of them, and
  refuse the request outright on a relayed connection (no IP to go by);
- a per-peer token bucket (a burst of ``per_peer_burst``, then one request per
  ``per_peer_every_s``), a global one (``global_per_minute``), and at most
  ``max_concurrent`` requests being dialled at once; over any of these the
  answer is a refusal with ``retry_after_s``;
- frames are at most ``MAX_FRAME`` bytes and every field is checked; each
  dial and each read has a timeout.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import trio
from libp2p import generate_new_ed25519_identity
from libp2p.crypto.x25519 import create_new_key_pair as new_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.io.trio import TrioTCPStream
from libp2p.network.connection.raw_connection import RawConnection
from libp2p.peer.id import ID
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.security.pnet.protector import new_protected_conn
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_ID
from libp2p.stream_muxer.yamux.yamux import Yamux
from libp2p.transport.exceptions import SecurityUpgradeFailure
from libp2p.transport.upgrader import TransportUpgrader

from node.errors import NodeError
from node.net.access import AccessPolicy
from protocols.errors import ConfigError, RemoteProtocolError
from protocols.frames import Frames, frame

from .addresses import MAX_CANDIDATES, Endpoint, endpoint
from .reachability import DialResult, Outcome

log = logging.getLogger(__name__)

DIALBACK_PROTOCOL = TProtocol("/swarm/dialback/1.0.0")
MAX_FRAME = 4096  # bytes of one message, after the 4-byte length
MAX_ADDRS = MAX_CANDIDATES  # addresses one request may name
MAX_DIALS = 4  # of those, dialled
MAX_ADDR_LEN = 256
MAX_WHY = 160
IO_TIMEOUT_S = 5.0  # reading the request, writing the answer


class DialBackUnavailable(NodeError):
    """The peer gave no dial-back answer (no such protocol, timed out, garbage)."""


# -- the wire: two messages, sans-IO -----------------------------------------------------


@dataclass(frozen=True, slots=True)
class DialRequest:
    addrs: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class DialAnswer:
    observed: str | None  # the IP the request's connection came from, as the peer saw it
    results: tuple[DialResult, ...] = ()
    refused: str | None = None  # the whole request was refused (and why)
    retry_after_s: float = 0.0


Message = DialRequest | DialAnswer


def encode(message: Message) -> bytes:
    """One frame: a 4-byte big-endian length and a msgpack map. Raises
    ``ConfigError`` for a message over the limits (our own mistake)."""
    if isinstance(message, DialRequest):
        body: dict[str, Any] = {"t": "dial", "addrs": list(message.addrs)}
    else:
        body = {
            "t": "answer",
            "observed": message.observed,
            "results": [[r.addr, str(r.outcome), r.why[:MAX_WHY]] for r in message.results],
            "refused": None if message.refused is None else message.refused[:MAX_WHY],
            "retry_after_s": float(message.retry_after_s),
        }
    payload: bytes = msgpack.packb(body, use_bin_type=True)
    if len(payload) > MAX_FRAME:
        raise ConfigError(f"a dial-back message of {len(payload)} bytes is over {MAX_FRAME}")
    return frame(payload)


class Decoder:
    """Bytes in, messages out; any bytes give a message or a RemoteProtocolError."""

    def __init__(self) -> None:
        self._frames = Frames(MAX_FRAME, "dial-back")

    def feed(self, data: bytes) -> None:
        self._frames.feed(data)

    def next_message(self) -> Message | None:
        payload = self._frames.next_frame()
        return None if payload is None else decode(payload)


def decode(payload: bytes) -> Message:
    try:
        body = msgpack.unpackb(
            payload,
            raw=False,
            strict_map_key=True,
            max_str_len=MAX_FRAME,
            max_bin_len=0,
            max_array_len=3 * MAX_ADDRS,
            max_map_len=8,
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises several types for bad bytes
        raise RemoteProtocolError(f"not a dial-back message: {exc}") from None
    if not isinstance(body, dict):
        raise RemoteProtocolError("a dial-back message must be a map")
    kind = body.get("t")
    if kind == "dial":
        addrs = body.get("addrs")
        if not isinstance(addrs, list) or len(addrs) > MAX_ADDRS:
            raise RemoteProtocolError(f"a dial request names up to {MAX_ADDRS} addresses")
        if not all(isinstance(a, str) and 0 < len(a) <= MAX_ADDR_LEN for a in addrs):
            raise RemoteProtocolError("dial request addresses must be short strings")
        return DialRequest(tuple(addrs))
    if kind == "answer":
        return _answer(body)
    raise RemoteProtocolError(f"unknown dial-back message {kind!r}")


def _answer(body: dict[str, Any]) -> DialAnswer:
    observed, refused, wait = body.get("observed"), body.get("refused"), body.get("retry_after_s")
    rows = body.get("results")
    if observed is not None and not (isinstance(observed, str) and len(observed) <= 64):
        raise RemoteProtocolError("a dial answer's observed IP must be a short string")
    if refused is not None and not isinstance(refused, str):
        raise RemoteProtocolError("a dial answer's refusal must be a string")
    if isinstance(wait, bool) or not isinstance(wait, int | float) or not 0 <= wait <= 3600:
        raise RemoteProtocolError("a dial answer's retry_after_s must be 0-3600")
    if not isinstance(rows, list) or len(rows) > MAX_ADDRS:
        raise RemoteProtocolError(f"a dial answer has up to {MAX_ADDRS} results")
    results = []
    for row in rows:
        if not (isinstance(row, list) and len(row) == 3 and all(isinstance(x, str) for x in row)):
            raise RemoteProtocolError("a dial result is [address, outcome, why]")
        try:
            outcome = Outcome(row[1])
        except ValueError:
            raise RemoteProtocolError(f"unknown dial outcome {row[1]!r}") from None
        results.append(DialResult(row[0][:MAX_ADDR_LEN], outcome, row[2][:MAX_WHY]))
    return DialAnswer(observed, tuple(results), refused, float(wait))


async def _receive(stream: Any) -> Message:
    """The one message on ``stream`` (libp2p), within the caller's timeout."""
    decoder = Decoder()
    while (message := decoder.next_message()) is None:
        try:
            data = await stream.read(MAX_FRAME + 4)
        except EOFError:
            data = b""
        if not data:
            raise RemoteProtocolError("the dial-back stream ended before a whole message")
        decoder.feed(data)
    return message


async def _close(stream: Any) -> None:
    with (
        trio.CancelScope(shield=True),
        trio.move_on_after(IO_TIMEOUT_S),
        contextlib.suppress(Exception),
    ):
        await stream.close()


# -- rate limits, pure -------------------------------------------------------------------


class TokenBuckets:
    """One token bucket per key: ``burst`` tokens, one more every ``every_s``.

    At most ``max_keys`` buckets are kept: the least recently used goes first
    (a forgotten key starts full again, which only ever errs towards answering).
    """

    def __init__(self, burst: int, every_s: float, max_keys: int = 1024) -> None:
        if burst < 1 or every_s <= 0 or max_keys < 1:
            raise ConfigError("token buckets need burst >= 1, every_s > 0, max_keys >= 1")
        self._burst, self._every_s, self._max = burst, every_s, max_keys
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)

    def take(self, key: str, now: float) -> float:
        """0 when a token was taken, else the seconds until one is there."""
        tokens, at = self._buckets.pop(key, (float(self._burst), now))
        tokens = min(float(self._burst), tokens + max(0.0, now - at) / self._every_s)
        wait = 0.0
        if tokens >= 1.0:
            tokens -= 1.0
        else:
            wait = (1.0 - tokens) * self._every_s
        self._buckets[key] = (tokens, now)
        while len(self._buckets) > self._max:
            del self._buckets[next(iter(self._buckets))]
        return wait


# -- the side that dials back ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DialBackLimits:
    per_peer_burst: int = 3
    per_peer_every_s: float = 20.0  # three a minute per peer, after the burst
    global_per_minute: int = 60
    max_concurrent: int = 4  # requests being dialled at once
    dial_timeout_s: float = 4.0  # one dial: TCP connect and the Noise handshake
    max_peers_tracked: int = 1024

    def __post_init__(self) -> None:
        if min(self.per_peer_burst, self.global_per_minute, self.max_concurrent) < 1:
            raise ConfigError("dial-back limits must be at least 1")
        if not (self.per_peer_every_s > 0 and self.dial_timeout_s > 0):
            raise ConfigError("dial-back times must be positive")


class DialBackServer:
    """The /swarm/dialback/1.0.0 handler: dials requesters back (see the module
    docstring). Counters for status: ``requests``, ``refused``, ``dials_ok``,
    ``dials_failed``."""

    def __init__(
        self,
        *,
        psk: str | None = None,
        access: AccessPolicy | None = None,
        limits: DialBackLimits = DialBackLimits(),
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        self._psk = psk
        self._access = access or AccessPolicy()
        self.limits = limits
        self._clock = clock
        self._per_peer = TokenBuckets(
            limits.per_peer_burst, limits.per_peer_every_s, limits.max_peers_tracked
        )
        self._global = TokenBuckets(limits.global_per_minute, 60.0 / limits.global_per_minute)
        self._dialling = trio.CapacityLimiter(limits.max_concurrent)
        key_pair = generate_new_ed25519_identity()  # throwaway: see the module docstring
        noise = NoiseTransport(key_pair, noise_privkey=new_x25519_key_pair().private_key)
        self._upgrader = TransportUpgrader(
            {TProtocol(NOISE_ID): noise}, {TProtocol(YAMUX_ID): Yamux}
        )
        self.requests = 0
        self.refused = 0
        self.dials_ok = 0
        self.dials_failed = 0

    def describe(self) -> dict[str, int]:
        return {
            "requests": self.requests,
            "refused": self.refused,
            "dials_ok": self.dials_ok,
            "dials_failed": self.dials_failed,
        }

    async def __call__(self, stream: Any) -> None:
        peer = str(stream.muxed_conn.peer_id)
        try:
            if not self._access.permits(peer):
                await stream.reset()
                return
            with trio.fail_after(IO_TIMEOUT_S):
                request = await _receive(stream)
            if not isinstance(request, DialRequest):
                raise RemoteProtocolError("expected a dial request")
            self.requests += 1
            answer = await self.answer(peer, _remote_ip(stream), request)
            if answer.refused is not None:
                self.refused += 1
            with trio.fail_after(IO_TIMEOUT_S):
                await stream.write(encode(answer))
        except (RemoteProtocolError, trio.TooSlowError) as exc:
            log.info("dial-back request from %s dropped: %s", peer, exc)
            with contextlib.suppress(Exception):
                await stream.reset()
        except Exception as exc:  # the stream broke under us: libp2p raises many types
            log.debug("dial-back stream from %s broke: %s", peer, exc)
        finally:
            await _close(stream)

    async def answer(self, peer: str, remote: str | None, request: DialRequest) -> DialAnswer:
        """What we answer ``peer``, whose connection comes from IP ``remote`` (None:
        relayed or unknown), dialling what may be dialled."""
        if remote is None:
            return DialAnswer(None, (), "relayed connection: no IP to dial back")
        now = self._clock()
        for bucket, key in ((self._per_peer, peer), (self._global, "")):
            wait = bucket.take(key, now)
            if wait:
                return DialAnswer(remote, (), "rate limited", round(wait, 3))
        results: dict[str, DialResult] = {}
        dials: dict[str, Endpoint] = {}
        for addr in request.addrs:
            if addr in results or addr in dials:
                continue
            point = endpoint(addr)
            owner = addr.rpartition("/p2p/")[2] if "/p2p/" in addr else peer
            if point is None:
                results[addr] = DialResult(addr, Outcome.REFUSED, "not a /ip4|ip6/.../tcp/PORT")
            elif owner != peer:
                results[addr] = DialResult(addr, Outcome.REFUSED, "another peer's address")
            elif str(point.ip) != remote:
                why = f"not the IP you connect from ({remote})"
                results[addr] = DialResult(addr, Outcome.REFUSED, why)
            elif len(dials) >= MAX_DIALS:
                results[addr] = DialResult(addr, Outcome.REFUSED, f"over {MAX_DIALS} dials")
            else:
                dials[addr] = point
        if dials:
            try:
                self._dialling.acquire_nowait()
            except trio.WouldBlock:
                return DialAnswer(remote, (), "busy dialling others back", 5.0)
            try:
                await self._dial_all(peer, dials, results)
            finally:
                self._dialling.release()
        return DialAnswer(remote, tuple(results[a] for a in request.addrs if a in results))

    async def _dial_all(
        self, peer: str, dials: dict[str, Endpoint], results: dict[str, DialResult]
    ) -> None:
        peer_id = ID.from_base58(peer)

        async def one(addr: str, point: Endpoint) -> None:
            why = await self.dial(point, peer_id)
            if why is None:
                self.dials_ok += 1
                results[addr] = DialResult(addr, Outcome.OK)
            else:
                self.dials_failed += 1
                results[addr] = DialResult(addr, Outcome.FAILED, why)

        async with trio.open_nursery() as nursery:
            for addr, point in dials.items():
                nursery.start_soon(one, addr, point)

    async def dial(self, point: Endpoint, peer_id: ID) -> str | None:
        """A fresh connection to ``point`` that must authenticate ``peer_id``:
        None when it did, else why not."""
        timeout = self.limits.dial_timeout_s
        raw: RawConnection | None = None
        try:
            with trio.fail_after(timeout):
                tcp = await trio.open_tcp_stream(str(point.ip), point.port)
                raw = RawConnection(TrioTCPStream(tcp), True)
                conn = raw if self._psk is None else new_protected_conn(raw, self._psk)
                secured = await self._upgrader.upgrade_security(conn, True, peer_id)
                with contextlib.suppress(Exception):
                    await secured.close()
            return None
        except trio.TooSlowError:
            return f"no answer within {timeout:g} s"
        except OSError as exc:
            return f"cannot connect: {exc.strerror or exc}"
        except SecurityUpgradeFailure as exc:
            return f"the handshake did not prove the peer id: {exc}"
        except Exception as exc:  # libp2p's negotiation raises many types
            return f"{type(exc).__name__}: {exc}"
        finally:
            if raw is not None:
                with trio.CancelScope(shield=True), contextlib.suppress(Exception):
                    await raw.close()


def _remote_ip(stream: Any) -> str | None:
    """The IP the stream's connection comes from; None when relayed or unknown."""
    conn = stream.muxed_conn
    # Each may fail on its own: py-libp2p's private-network connection never sets
    # the attributes behind the first two (a relayed one always has them).
    with contextlib.suppress(Exception):
        if str(conn.get_connection_type().value) == "relayed":
            return None
    with contextlib.suppress(Exception):
        if any("/p2p-circuit" in str(a) for a in conn.get_transport_addresses() or ()):
            return None
    try:
        remote = conn.get_remote_address()
    except Exception:  # a connection without an address: say nothing
        return None
    if not remote:
        return None
    try:
        ip = ipaddress.ip_address(str(remote[0]))
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip)


# -- the side that asks ------------------------------------------------------------------


async def ask(host: Any, peer_id: str, addrs: Sequence[str], *, timeout_s: float) -> DialAnswer:
    """Ask ``peer_id`` to dial ``addrs`` back. Raises DialBackUnavailable when no
    answer comes (the peer lacks the protocol, is gone, is slow, or talks garbage)."""
    request = encode(DialRequest(tuple(addrs[:MAX_ADDRS])))
    try:
        with trio.fail_after(timeout_s):
            stream = await host.new_stream(ID.from_base58(peer_id), [DIALBACK_PROTOCOL])
            try:
                await stream.write(request)
                message = await _receive(stream)
            finally:
                await _close(stream)
    except trio.TooSlowError:
        raise DialBackUnavailable(
            f"{peer_id} gave no dial-back answer in {timeout_s:g} s"
        ) from None
    except RemoteProtocolError as exc:
        raise DialBackUnavailable(f"{peer_id} answered garbage: {exc}") from exc
    except Exception as exc:  # libp2p raises many types (no protocol, no connection)
        raise DialBackUnavailable(f"cannot ask {peer_id}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(message, DialAnswer):
        raise DialBackUnavailable(f"{peer_id} sent a request where an answer belonged")
    return message
